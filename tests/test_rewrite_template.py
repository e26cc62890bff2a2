"""`mmtools rewrite --backend template`: offline, deterministic captions, and `--mix`."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import mmtools, read_dataset

from mmtools import columns as C
from mmtools.steps.rewrite.step import Rewrite, RewriteConfig, mix_choice

ALT = [
    "A small dog running on the beach, at sunset",
    "old house near the sea",
    "photo of a beautiful woman walking in the street",
    "red car parked on a road, city, night",
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """200 rows of id and alt-text."""
    path = tmp_path_factory.mktemp("template") / "in.parquet"
    n = 200
    pq.write_table(
        pa.table(
            {C.ID: [f"row{i:04d}" for i in range(n)], C.TEXT: [ALT[i % len(ALT)] for i in range(n)]}
        ),
        path,
    )
    return path


def run(tmp_path, name, *args) -> pa.Table:
    mmtools("rewrite", *args, "--backend", "template", "-o", tmp_path / name, "-q")
    return read_dataset(tmp_path / name)


def test_same_seed_same_captions_whatever_the_batch_layout(tmp_path, rows):
    a = run(tmp_path, "a", rows, "--seed", 1)
    b = run(tmp_path, "b", rows, "--seed", 1, "--batch-size", 7)
    c = run(tmp_path, "c", rows, "--seed", 2)
    assert a[C.TEXT_SYNTHETIC].to_pylist() == b[C.TEXT_SYNTHETIC].to_pylist()
    assert a[C.TEXT_SYNTHETIC].to_pylist() != c[C.TEXT_SYNTHETIC].to_pylist()
    assert a[C.TEXT].to_pylist() == [ALT[i % 4] for i in range(200)]  # alt-text kept as is
    assert set(a[C.CAPTION_SOURCE].to_pylist()) == {"rewrite:template"}
    synthetic = a[C.TEXT_SYNTHETIC].to_pylist()
    # Rows with the same alt-text get varied rewrites (the row id seeds the choices).
    assert len(set(synthetic[0::4])) > 10
    assert sum(s != ALT[i % 4] for i, s in enumerate(synthetic)) > 150
    assert all(s and s == s.strip() and len(s) <= 300 for s in synthetic)


def test_mix_picks_per_row_by_seed_and_id(tmp_path, rows):
    a = run(tmp_path, "a", rows, "--mix", 0.3, "--seed", 5)
    b = run(tmp_path, "b", rows, "--mix", 0.3, "--seed", 5, "--batch-size", 13)
    assert a.to_pydict() == b.to_pydict()
    assert a.schema.names[-2:] == [C.CAPTION_SOURCE, C.TEXT_ORIGINAL]
    assert a[C.TEXT_ORIGINAL].to_pylist() == [ALT[i % 4] for i in range(200)]
    picked = 0
    for row in a.to_pylist():
        if row[C.CAPTION_SOURCE] == "alt":
            assert row[C.TEXT] == row[C.TEXT_ORIGINAL]
        else:
            assert row[C.CAPTION_SOURCE] == "rewrite:template"
            assert row[C.TEXT] == row[C.TEXT_SYNTHETIC]
            picked += 1
        assert (row[C.CAPTION_SOURCE] != "alt") == (mix_choice(5, row[C.ID]) < 0.3)
    assert 30 <= picked <= 90  # about 30% of 200
    assert set(run(tmp_path, "none", rows, "--mix", 0)[C.CAPTION_SOURCE].to_pylist()) == {"alt"}


def solid(colour, size) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_caption_mode_describes_what_it_measures(tmp_path):
    (tmp_path / "blue.png").write_bytes(solid((30, 60, 210), (30, 90)))
    images = [solid((220, 20, 20), (90, 30)), None, b"\x89PNG broken", None]
    paths = [None, str(tmp_path / "blue.png"), None, str(tmp_path / "gone.png")]
    table = {
        C.ID: ["red", "blue", "broken", "gone"],
        C.IMAGE: C.media_array(images, paths),
        C.TEXT: ["a red thing", "a blue thing", "x", "y"],
    }
    pq.write_table(pa.table(table), tmp_path / "in.parquet")
    t = run(tmp_path, "out", tmp_path / "in.parquet", "--mode", "caption")
    captions = dict(zip(t[C.ID].to_pylist(), t[C.TEXT_SYNTHETIC].to_pylist(), strict=True))
    assert "red" in captions["red"]
    assert "blue" in captions["blue"]
    assert sorted(captions) == ["blue", "red"]  # blue read from its path
    hinted = run(
        tmp_path, "hint", tmp_path / "in.parquet", "--mode", "caption", "--prompt", "caption_hint"
    )
    assert hinted[C.TEXT_SYNTHETIC][0].as_py().endswith("showing a red thing")
    rejects = pq.read_table(tmp_path / "out" / "_rejects").to_pydict()
    reasons = dict(zip(rejects[C.ID], rejects[C.REJECT_REASON], strict=True))
    assert reasons["broken"] in ("corrupt", "truncated", "not_image")
    assert reasons["gone"] == "missing_file"


def test_the_step_runs_from_python_with_row_accounting():
    batch = pa.record_batch({C.ID: ["a", "b", "c"], C.TEXT: ["a photo of a cat", None, "dog"]})
    step = Rewrite(RewriteConfig(backend="template", seed=3))
    assert step.output_schema(batch.schema).names == [
        C.ID,
        C.TEXT,
        C.TEXT_SYNTHETIC,
        C.CAPTION_SOURCE,
    ]
    step.setup()
    try:
        results = list(step.run([batch, batch.slice(0, 1)]))
    finally:
        step.close()
    assert [r.batch.num_rows for r in results] == [2, 1]
    results[0].check(3, step.name)
    assert results[0].rejects[C.REJECT_REASON].to_pylist() == ["missing_text"]
    first = results[0].batch[C.TEXT_SYNTHETIC][0].as_py()
    assert first == results[1].batch[C.TEXT_SYNTHETIC][0].as_py()
    assert "kitten" in first or "kitty" in first or "cat" in first
    assert np.isclose(np.mean([mix_choice(0, str(i)) < 0.25 for i in range(4000)]), 0.25, atol=0.03)
