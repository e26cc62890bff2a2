"""A file-size limit (`ulimit -f`) hit mid-run: a clear error, no manifest, and a rerun resumes.

Python ignores SIGXFSZ, so the write that crosses the limit fails with EFBIG, as a write to a
full disk fails with ENOSPC. Every output shard here is about 15 KB except the one holding a
large image, which crosses the 64 KB limit after several shards are committed.
"""

from __future__ import annotations

import io
import os
import resource
import subprocess

import numpy as np
import pytest
from conftest import MMTOOLS, mmtools, write_shards
from forked import summary
from harness import (
    INPUT_SHARDS,
    THREADS,
    Inputs,
    check_complete,
    command,
    corpus_table,
    image_folder,
    one_line,
    rows,
    tiny_clip,
)
from PIL import Image

from mmtools import columns as C

LIMIT = 64 << 10
BIG_ROW = 250


def _noise_png(seed: int = 0, side: int = 200) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    """The usual inputs, with one image larger than LIMIT at row BIG_ROW."""
    root = tmp_path_factory.mktemp("inputs")
    table = corpus_table()
    big = _noise_png()
    assert len(big) > LIMIT
    images = table.column(C.IMAGE).combine_chunks()
    data = images.field("bytes").to_pylist()
    data[BIG_ROW] = big
    table = table.set_column(1, C.IMAGE, C.media_array(data, [None] * len(data)))
    folder = image_folder(root / "folder")
    (folder / f"img{BIG_ROW:05d}.jpg").write_bytes(big)  # PNG bytes under a .jpg name
    return Inputs(write_shards(root / "corpus", table, INPUT_SHARDS), folder, tiny_clip(root))


def _limited():
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.parametrize("kind", ["ingest", "dedup", "mixup"])
def test_file_size_limit_fails_clearly_without_manifest_and_rerun_resumes(kind, inputs, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    mmtools(*command(kind, inputs, ref), env=THREADS)
    proc = subprocess.run(
        [*MMTOOLS, *command(kind, inputs, out)],
        preexec_fn=_limited,
        capture_output=True,
        timeout=300,
        env={**os.environ, **THREADS},
    )
    err = proc.stderr.decode()
    assert proc.returncode == 4, err  # partial: the committed shards are kept
    assert one_line(err)
    assert err.startswith(f"mmtools {kind}: error: ") and "File too large" in err
    assert not (out / "_manifest.json").exists()
    assert not list(out.rglob(".tmp-*"))
    if kind != "mixup":  # mixup hits the limit earlier, spooling partner rows to a temp file
        assert len(list((out / "_progress").glob("*.json"))) >= 3  # it failed mid-run
    # Space freed: the same command resumes after the committed shards.
    done = summary(mmtools(*command(kind, inputs, out, "--json"), env=THREADS).stderr.decode())
    assert done["resumed_from"] > 0 or kind == "mixup"
    assert check_complete(out, ref) == rows(ref)


def test_disk_full_is_reported_as_partial_with_what_to_do(inputs, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [*MMTOOLS, *command("dedup", inputs, out)],
        preexec_fn=_limited,
        capture_output=True,
        timeout=300,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 4
    assert str(out) in err and "rerun" in err
