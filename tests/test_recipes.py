"""Every recipe in recipes/ runs end to end on generated data (servers on loopback)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import mmtools, read_dataset, reject_reasons, tiny_clip
from llm_server import LLMServer
from test_recipes_filter import run_recipe

from mmtools import columns as C
from mmtools.demo import synth

SHAPES = pytest.importorskip("mmtools.models.shapes")
needs_model = pytest.mark.skipif(
    not SHAPES.weights_path().exists(), reason="mmtools-shapes weights not built"
)
OFFLINE = {"MODEL": "mmtools-shapes", "PRETRAINED": ""}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """An ingested dataset of 40 generated shape images, 8 of them exact copies."""
    root = tmp_path_factory.mktemp("recipes")
    folder = root / "imgs"
    folder.mkdir()
    for i, s in enumerate(synth.generate(32, seed=7)):
        buf = io.BytesIO()
        s.image.save(buf, "JPEG", quality=90)
        (folder / f"s{i:03d}.jpg").write_bytes(buf.getvalue())
        (folder / f"s{i:03d}.txt").write_text(s.caption)
        if i < 8:
            (folder / f"s{i:03d}_copy.jpg").write_bytes(buf.getvalue())
            (folder / f"s{i:03d}_copy.txt").write_text(s.caption)
    mmtools("ingest", folder, "-o", root / "ds", "-q")
    return root


@needs_model
def test_semdedup_recipe_removes_the_copies(shapes, tmp_path):
    proc = run_recipe("semdedup.sh", shapes / "ds", tmp_path / "out", "--eps", "0.001", **OFFLINE)
    assert proc.returncode == 0, proc.stderr.decode()
    ids = set(read_dataset(tmp_path / "out").column("id").to_pylist())
    assert len(ids) == 32  # 40 rows less the 8 copies, and nothing else
    assert all(f"s{i:03d}.jpg" in ids or f"s{i:03d}_copy.jpg" in ids for i in range(8))
    # Its embed | dedup pipe runs under pipefail: rerun on the finished output, it exits 0
    # (the embed stage, whose reader left, included) and writes nothing.
    manifest = (tmp_path / "out" / "_manifest.json").read_bytes()
    again = run_recipe("semdedup.sh", shapes / "ds", tmp_path / "out", "--eps", "0.001", **OFFLINE)
    assert again.returncode == 0, again.stderr.decode()
    assert "already complete" in again.stderr.decode()
    assert (tmp_path / "out" / "_manifest.json").read_bytes() == manifest


def test_mixgen_recipe_adds_a_quarter_of_mixed_rows(shapes, tmp_path):
    proc = run_recipe("mixgen.sh", shapes / "ds", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = read_dataset(tmp_path / "out").to_pylist()
    mixed = [r for r in rows if r["mixup_parents"]]
    assert len(rows) - len(mixed) == 40 and len(mixed) == 10
    assert all(r["mixup_lambda"] == 0.5 for r in mixed)


def test_laclip_recipe_rewrites_through_an_openai_server(shapes, tmp_path):
    with LLMServer() as server:
        proc = run_recipe(
            "laclip_rewrite.sh", shapes / "ds", tmp_path / "out", BASE_URL=server.url, MODEL="tiny"
        )
        assert proc.returncode == 0, proc.stderr.decode()
        assert server.requests == 40
    rows = read_dataset(tmp_path / "out").to_pylist()
    assert all(r["text_synthetic"] and r["text_original"] for r in rows)
    assert {r["text"] == r["text_original"] for r in rows} == {True, False}


def test_alt_synthetic_recipe_offline(shapes, tmp_path):
    proc = run_recipe("alt_synthetic_mix.sh", shapes / "ds", tmp_path / "out", BACKEND="template")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = read_dataset(tmp_path / "out").to_pylist()
    assert all(r["text_synthetic"] for r in rows)


def _tar(path, start: int, n: int, again: int = 0) -> None:
    """n generated samples keyed from `start`, then `again` of the first shard's (seed 0)."""
    samples = list(synth.generate(n, seed=start)) + list(synth.generate(again, seed=0))
    with tarfile.open(path, "w") as tar:
        for i, s in enumerate(samples):
            buf = io.BytesIO()
            s.image.save(buf, "JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", s.caption.encode())):
                info = tarfile.TarInfo(f"{start + i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@needs_model
def test_cron_recipe_curates_only_new_shards(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    _tar(inbox / "00000.tar", 0, 12)
    env = {**OFFLINE, "WHERE": "clip_score > -1", "DEDUP": "-m exact"}
    assert run_recipe("cron_incremental.sh", inbox, out, **env).returncode == 0
    _tar(inbox / "00001.tar", 100, 10, again=4)  # 4 images that came with the first shard
    first = (out / "curated" / "00000" / "_manifest.json").read_bytes()
    assert run_recipe("cron_incremental.sh", inbox, out, **env).returncode == 0
    assert (out / "curated" / "00000" / "_manifest.json").read_bytes() == first
    second = json.loads((out / "curated" / "00001" / "_manifest.json").read_text())
    assert (second["rows"], second["summary"]["dropped"]) == (10, {"exact": 4})
    assert read_dataset(out / "curated" / "00001")["id"].to_pylist() == [
        f"00001/{k:09d}" for k in range(100, 110)
    ]
    seen = json.loads(mmtools("info", out / "seen", "--json").stdout)
    assert seen["rows"] == 22 and [r["rows"] for r in seen["runs"]] == [12, 10]
    log = (out / "cron.log").read_text().splitlines()
    assert len(log) == 2 and "curated 1 new shard(s), 0 failed" in log[1]


def test_recipes_print_usage_without_arguments():
    for name in (
        "semdedup.sh",
        "mixgen.sh",
        "laclip_rewrite.sh",
        "alt_synthetic_mix.sh",
        "cron_incremental.sh",
    ):
        proc = run_recipe(name)
        assert proc.returncode == 2 and b"usage:" in proc.stderr


def test_audio_curation_recipe_with_a_local_clap(tmp_path):
    from conftest import wav_bytes
    from test_embed import tiny_clap

    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(4):
        (clips / f"tone{i}.wav").write_bytes(wav_bytes(2.0, freq=300 + 100 * i))
        (clips / f"tone{i}.txt").write_text(f"a tone number {i}")
    (clips / "short.wav").write_bytes(wav_bytes(0.3))
    (clips / "short.txt").write_text("too short")
    (clips / "silent.wav").write_bytes(wav_bytes(2.0, freq=0.0))
    (clips / "silent.txt").write_text("silence")
    model = tiny_clap(tmp_path / "clap")
    proc = run_recipe(
        "audio_curation.sh", clips, tmp_path / "out", AUDIO_MODEL=str(model), MIN_SCORE="-1"
    )
    assert proc.returncode == 0, proc.stderr.decode()
    rows = read_dataset(tmp_path / "out").to_pylist()
    assert sorted(r["id"] for r in rows) == [f"tone{i}.wav" for i in range(4)]
    assert all(-1 <= r["audio_text_score"] <= 1 for r in rows)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["lineage"][1]["dropped"] == {"duration": 1, "silence": 1}


@pytest.mark.parametrize(
    "model",
    [
        "tiny-clip",
        pytest.param(
            "mmtools-shapes",
            marks=needs_model,
        ),
    ],
)
def test_a_stage_that_trips_a_fail_safe_stops_the_recipe_with_exit_7(shapes, tmp_path, model):
    """Every reference image is corrupt: the embed stage commits its rejects and exits 7, and
    set -e stops the recipe there: neither the centres nor the filtered pool are written."""
    env = OFFLINE
    if model == "tiny-clip":
        env = {"MODEL": str(tiny_clip(tmp_path)), "PRETRAINED": "none"}
    n = 4
    reference = pa.table(
        {
            C.ID: [f"ref{i}" for i in range(n)],
            C.IMAGE: C.media_array([b"not an image at all"] * n, [None] * n),
            C.TEXT: [f"reference {i}" for i in range(n)],
        }
    )
    pq.write_table(reference, tmp_path / "reference.parquet")
    out = tmp_path / "out"
    proc = run_recipe(
        "datacomp_image_filter.sh", shapes / "ds", tmp_path / "reference.parquet", out, **env
    )
    assert proc.returncode == 7, proc.stderr.decode()
    assert proc.stderr.decode().strip().splitlines()[-1] == (
        f"mmtools embed: error: {n} of {n} input rows (100.0%) were rejected (not_image {n}); "
        f"the output is committed to {out}.reference: check the input and the options, or "
        "pass --max-reject-rate 1 to accept such a run"
    )
    assert read_dataset(f"{out}.reference").num_rows == 0
    assert reject_reasons(f"{out}.reference") == {f"ref{i}": "not_image" for i in range(n)}
    assert not Path(f"{out}.centroids").exists() and not out.exists()
