"""`mmtools explain`: a row's fate through ingest | embed | score | filter | dedup, run as
separate commands with -o and as one pipe, with the bundled model."""

from __future__ import annotations

import json
import os
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
