"""`mmtools explain`: a row's fate through ingest | embed | score | filter | dedup, run as
separate commands with -o and as one pipe, with the bundled model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import MMTOOLS, image_bytes, make_image_folder, mmtools, read_dataset

from mmtools.errors import EXIT_DATA

CHAIN = ["ingest", "embed", "score", "filter", "dedup"]
IDS = ["img00002.jpg", "bad.jpg", "small.jpg", "zcopy.jpg"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """8 captioned JPEGs, an exact copy of one (zcopy), a 30 px wide one and a corrupt one."""
    root = make_image_folder(tmp_path_factory.mktemp("explain") / "imgs", 8)
    (root / "zcopy.jpg").write_bytes((root / "img00001.jpg").read_bytes())
    (root / "zcopy.txt").write_text("the same photo again")
    (root / "small.jpg").write_bytes(image_bytes(50, size=(30, 30)))
    (root / "small.txt").write_text("a small photo")
    (root / "bad.jpg").write_bytes(b"not a jpeg at all")
    (root / "bad.txt").write_text("a broken file")
    return root


@pytest.fixture(scope="module")
def separate(folder) -> dict[str, Path]:
    """The chain as separate commands, each writing a dataset."""
    d = {n: folder.parent / n for n in ("ds", "emb", "scored", "filtered", "final")}
    mmtools("ingest", folder, "-o", d["ds"], "-q")
    mmtools("embed", d["ds"], "--model", "mmtools-shapes", "-o", d["emb"], "-q")
    mmtools("score", d["emb"], "-o", d["scored"], "-q")
    mmtools("filter", d["scored"], "--where", "width >= 40", "-o", d["filtered"], "-q")
    mmtools("dedup", d["filtered"], "-m", "exact", "-o", d["final"], "-q")
    return d


@pytest.fixture(scope="module")
def piped(folder) -> Path:
    """The same chain as one shell pipe into one dataset."""
    out = folder.parent / "piped"
    mm = " ".join(MMTOOLS)
    commands = [
        f"{mm} ingest {folder} -q",
        f"{mm} embed --model mmtools-shapes -q",
        f"{mm} score -q",
        f"{mm} filter --where 'width >= 40' -q",
        f"{mm} dedup -m exact -o {out} -q",
    ]
    proc = subprocess.run(
        ["bash", "-c", "set -o pipefail; " + " | ".join(commands)],
        capture_output=True,
        timeout=300,
        env=os.environ,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return out


def explain_json(dataset: Path, *ids: str) -> dict[str, dict]:
    proc = mmtools("explain", dataset, *ids, "--json")
    return {r["id"]: r for r in map(json.loads, proc.stdout.decode().splitlines())}


def decisions(report: dict) -> list[tuple[str, str]]:
    return [(s["command"], s["decision"]) for s in report["steps"]]


def test_explain_follows_each_row_through_separate_commands(separate, folder):
    final = separate["final"]
    found = explain_json(final, *IDS)

    kept = found["img00002.jpg"]
    assert kept["fate"] == "kept" and decisions(kept) == [(c, "kept") for c in CHAIN]
    row = read_dataset(final)["id"].to_pylist().index("img00002.jpg")
    assert kept["output"] == {"dataset": str(final), "shard": "part-00000.parquet", "row": row}
    assert kept["source"] == str(folder / "img00002.jpg")
    added = [s["added"] for s in kept["steps"]]
    assert added[1:] == [["image_embedding", "text_embedding"], ["clip_score"], [], []]
    assert "image_sha256" in added[0]
    assert [s["output"] for s in kept["steps"]] == [str(p) for p in separate.values()]

    bad = found["bad.jpg"]
    assert bad["fate"] == "rejected" and decisions(bad) == [("ingest", "rejected")]
    assert (bad["steps"][0]["reason"], bad["source"]) == ("not_image", str(folder / "bad.jpg"))
    assert bad["steps"][0]["record"] == str(separate["ds"] / "_rejects")

    small = found["small.jpg"]
    assert decisions(small) == [*[(c, "kept") for c in CHAIN[:3]], ("filter", "dropped")]
    step = small["steps"][-1]
    assert (step["rule"], step["value"], step["kept_id"]) == ("where", 30.0, None)
    assert step["record"] == str(separate["filtered"] / "_dropped")
    assert step["argv"][-4:] == ["width >= 40", "-o", str(separate["filtered"]), "-q"]

    twin = found["zcopy.jpg"]
    assert twin["fate"] == "dropped" and decisions(twin)[-1] == ("dedup", "dropped")
    step = twin["steps"][-1]
    assert (step["rule"], step["value"], step["kept_id"]) == ("exact", None, "img00001.jpg")
    assert twin["output"] is None


def test_explain_through_a_pipe_finds_the_rows_in_the_final_dataset(piped, folder):
    found = explain_json(piped, *IDS)
    assert {i: r["fate"] for i, r in found.items()} == {
        "img00002.jpg": "kept",
        "bad.jpg": "rejected",
        "small.jpg": "dropped",
        "zcopy.jpg": "dropped",
    }
    small = found["small.jpg"]["steps"]
    assert [s["output"] for s in small] == ["-", "-", "-", "-"]
    assert (small[-1]["rule"], small[-1]["value"]) == ("where", 30.0)
    assert small[-1]["record"] == str(piped / "_dropped")
    twin = found["zcopy.jpg"]["steps"][-1]
    assert (twin["command"], twin["kept_id"], twin["record"]) == (
        "dedup",
        "img00001.jpg",
        str(piped / "_dropped"),
    )
    assert found["zcopy.jpg"]["source"] == str(folder / "zcopy.jpg")
    assert found["bad.jpg"]["steps"][0]["record"] == str(piped / "_rejects")
    assert found["img00002.jpg"]["steps"][-1]["output"] == str(piped)


def test_explain_for_people_and_an_unknown_id(separate):
    proc = mmtools("explain", separate["final"], "small.jpg", "zcopy.jpg", "nope", check=False)
    assert proc.returncode == EXIT_DATA
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "small.jpg: dropped by filter, rule where, value 30"
    assert lines[1].startswith("  from ") and lines[1].endswith("imgs/small.jpg")
    assert lines[2].startswith("  1. ingest  kept; added id, image, text")
    assert lines[5] == (
        f"  4. filter  DROPPED by filter, rule where, value 30  -> {separate['filtered']}"
    )
    assert lines[6].startswith("     by:     mmtools filter ") and "'width >= 40'" in lines[6]
    twin = lines.index("zcopy.jpg: dropped by dedup, rule exact, a duplicate of img00001.jpg")
    assert lines[twin + 1].endswith("imgs/zcopy.jpg")
    assert lines[-1] == f"nope: not found in {separate['final']} or the datasets it was made from"


def test_a_run_without_the_ledger_leaves_the_drop_unexplained(separate, tmp_path):
    out = tmp_path / "bare"
    mmtools("filter", separate["scored"], "--where", "width >= 40", "-o", out, "--no-ledger")
    report = explain_json(out, "small.jpg")["small.jpg"]
    assert report["fate"] == "unknown" and report["missing_from"] == str(out)
    assert decisions(report) == [(c, "kept") for c in CHAIN[:3]]


def _as_made_before_lineage_and_ledger(dataset: Path) -> None:
    """Edit a dataset into what mmtools wrote before the drop ledger: lineage entries without
    steps, added columns or inputs, and no ledger (no `ledger` in the manifest, no _dropped/)."""
    path = dataset / "_manifest.json"
    manifest = json.loads(path.read_text())
    for entry in (*manifest["lineage"], manifest["summary"]):
        for key in ("steps", "added", "inputs", "upstream_dropped"):
            entry.pop(key, None)
    del manifest["ledger"], manifest["position"]["upstream_drops"]
    path.write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(dataset / "_dropped", ignore_errors=True)


def test_explain_follows_datasets_made_before_lineage_and_ledger(folder, tmp_path):
    """Old manifests name no inputs: each run's fingerprint gives the directory it read, so the
    chain still reaches the ingest; a drop without a ledger row is `unknown`."""
    ds, filtered, final = tmp_path / "ds", tmp_path / "filtered", tmp_path / "final"
    mmtools("ingest", folder, "-o", ds, "-q")
    mmtools("filter", ds, "--where", "width >= 40", "-o", filtered, "-q")
    mmtools("dedup", filtered, "-m", "exact", "-o", final, "-q")
    assert (filtered / "_dropped").is_dir() and (final / "_dropped").is_dir()
    for dataset in (ds, filtered, final):
        _as_made_before_lineage_and_ledger(dataset)

    found = explain_json(final, "img00002.jpg", "small.jpg", "zcopy.jpg", "bad.jpg")
    kept = found["img00002.jpg"]
    row = read_dataset(final)["id"].to_pylist().index("img00002.jpg")
    assert kept["fate"] == "kept" and kept["source"] == str(folder / "img00002.jpg")
    assert kept["output"] == {"dataset": str(final), "shard": "part-00000.parquet", "row": row}
    assert [(s["command"], s["decision"], s["output"], s["added"]) for s in kept["steps"]] == [
        ("ingest", "kept", str(ds), None),
        ("filter", "kept", str(filtered), None),
        ("dedup", "kept", str(final), None),
    ]
    for rid, missing_from, steps in (
        ("small.jpg", filtered, ["ingest"]),
        ("zcopy.jpg", final, ["ingest", "filter"]),
    ):
        report = found[rid]
        assert (report["fate"], report["missing_from"]) == ("unknown", str(missing_from))
        assert decisions(report) == [(c, "kept") for c in steps]
    bad = found["bad.jpg"]
    assert bad["fate"] == "rejected" and decisions(bad) == [("ingest", "rejected")]
    assert bad["steps"][0]["reason"] == "not_image"

    text = mmtools("explain", final, "img00002.jpg", "small.jpg").stdout.decode()
    assert text.splitlines() == [
        f"img00002.jpg: in the output: {final}/part-00000.parquet, row {row}",
        f"  from {folder / 'img00002.jpg'}",
        f"  1. ingest  kept  -> {ds}",
        f"  2. filter  kept  -> {filtered}",
        f"  3. dedup   kept  -> {final}",
        f"small.jpg: not in {filtered}, and no reject or ledger row says why "
        "(was that run made with --no-ledger?)",
        f"  from {folder / 'small.jpg'}",
        f"  1. ingest  kept  -> {ds}",
    ]
