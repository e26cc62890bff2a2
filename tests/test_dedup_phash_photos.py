"""`dedup -m phash` on real photographs: flipped copies (--phash-flip) and the default radius.

The photos and their edited copies are those of tests/bench/bench_phash_curve.py, whose
curve set the default --max-distance (10): 48 non-overlapping tiles of three real
photographs, each resized, re-encoded, brightness-shifted, cropped by 2% and 5% and mirrored.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import mmtools, read_dataset
from test_dedup import assert_ray_buckets_give_local_groups, write_dataset

from mmtools import columns as C
from mmtools.steps.dedup.step import DedupConfig

sys.path.insert(0, str(Path(__file__).parent / "bench"))
import bench_phash_curve as curve

# Copies the default radius misses, per edit, of the 48 (the curve at radius 10, flip off).
MISSED_AT_DEFAULT = {"jpeg30": 1, "darker15": 1, "brighter15": 2, "crop5_corner": 2}


@pytest.fixture(scope="module")
def photos() -> tuple[list[bytes], np.ndarray, list[str]]:
    return curve.corpus()


def photo_table(photos, edits: set[str]) -> pa.Table:
    """Each photo then its copies made by `edits`, ids `p07-crop5_centre`."""
    blobs, photo, edit = photos
    at = [k for k, e in enumerate(edit) if e == "original" or e in edits]
    ids = [f"p{photo[k]:02d}-{edit[k]}" for k in at]
    images = C.media_array([blobs[k] for k in at], [None] * len(at))
    return pa.table({C.ID: ids, C.IMAGE: images})


def marked(tmp_path: Path, table: pa.Table, *flags: str) -> pa.Table:
    src = write_dataset(tmp_path / "in", table, shards=2, row_group=50)
    mmtools("dedup", str(src), "-m", "phash", "--mark", *flags, "-o", str(tmp_path / "out"))
    return read_dataset(tmp_path / "out")


def marks(out: pa.Table):
    """(id, is_duplicate, dup_kept_id) of each output row."""
    return zip(*(out[c].to_pylist() for c in (C.ID, C.IS_DUPLICATE, C.DUP_KEPT_ID)), strict=True)


def test_default_radius_is_the_one_the_curve_sets():
    assert DedupConfig().max_distance == 10


def test_flipped_copies_are_found_with_phash_flip_and_not_without(photos, tmp_path):
    table = photo_table(photos, {"flip"})
    plain = marked(tmp_path / "plain", table)
    assert plain[C.IS_DUPLICATE].to_pylist() == [False] * table.num_rows
    out = marked(tmp_path / "flip", table, "--phash-flip")
    dup = {i: k for i, d, k in marks(out) if d}
    # Every mirrored copy, each a duplicate of its own photo; no photo merged into another.
    assert dup == {f"p{p:02d}-flip": f"p{p:02d}-original" for p in range(48)}
    # How close each is: its mirror's pHash against the photo's, not the ~32 bits unmirrored.
    value = dict(zip(out[C.ID].to_pylist(), out[C.DUP_VALUE].to_pylist(), strict=True))
    assert sorted(value[i] for i in dup) == [0.0] * 45 + [2.0] * 3


def test_default_radius_catches_edited_copies_at_the_curves_rate_and_merges_no_photos(
    photos, tmp_path
):
    edits = set(curve.EDITS) - {"flip"}
    out = marked(tmp_path, photo_table(photos, edits))
    missed = {e: 0 for e in edits}
    for row_id, duplicate, kept in marks(out):
        photo, edit = row_id.split("-", 1)
        if edit == "original":
            assert not duplicate, row_id  # no photo is a duplicate of another
        elif duplicate:
            assert kept.split("-")[0] == photo, (row_id, kept)  # of its own photo only
        else:
            missed[edit] += 1
    assert {e: n for e, n in missed.items() if n} == MISSED_AT_DEFAULT


def test_flip_buckets_for_ray_give_the_local_groups(photos):
    """The Ray path indexes both hashes of a row by chunk: the same groups as locally."""
    from mmtools.steps.dedup.phash import ERROR, KEY, MIRROR, PHash

    h, m = curve.hashes(photos[0])
    keys = pa.table({KEY: h, MIRROR: m, ERROR: pa.array([None] * len(h), pa.string())})
    assert_ray_buckets_give_local_groups(lambda: PHash(10, flip=True), keys, min_groups=48)


@pytest.mark.ray
def test_flip_dedup_on_ray_equals_local(photos, tmp_path):
    """Both engines, the flipped copies of 12 photos, through Ray's groupby."""
    pytest.importorskip("ray")
    from test_ray import assert_same, run_both

    from mmtools.engines.ray import executor as ray_engine
    from mmtools.io.source import Source
    from mmtools.steps.dedup.step import Dedup

    table = photo_table(photos, {"flip"}).slice(0, 24)
    write_dataset(tmp_path / "in", table, shards=2, row_group=5)
    config = DedupConfig(methods=("phash",), phash_flip=True)
    old, ray_engine.SHUFFLE_MIN_ROWS = ray_engine.SHUFFLE_MIN_ROWS, 0
    try:
        manifests = run_both(
            tmp_path, "dedup", lambda src: [Dedup(config)], lambda: Source([str(tmp_path / "in")])
        )
    finally:
        ray_engine.SHUFFLE_MIN_ROWS = old
    out = assert_same(tmp_path, manifests)
    assert manifests["ray"]["dropped"] == {"phash": 12}
    assert out[C.ID].to_pylist() == [f"p{p:02d}-original" for p in range(12)]


@pytest.mark.parametrize("radius", [0, 4, 10])
def test_flip_groups_are_the_components_of_any_hash_within_the_radius(radius):
    """Against brute force: rows link when any of their four hash pairs is within the radius."""
    from mmtools.steps.dedup.groups import components
    from mmtools.steps.dedup.phash import ERROR, KEY, MIRROR, PHash, popcount

    rng = np.random.default_rng(radius)
    n = 300
    h = rng.integers(0, 2**63, n, dtype=np.uint64) | (rng.integers(0, 2, n, dtype=np.uint64) << 63)
    m = rng.integers(0, 2**63, n, dtype=np.uint64)
    near = rng.choice(n, 60, replace=False)
    flips = rng.integers(0, 2, (60, 64)).astype(bool) & (rng.random((60, 64)) < radius / 64)
    noise = np.packbits(flips, axis=1).view(">u8").ravel().astype(np.uint64)
    h[near[30:]] = m[near[:30]] ^ noise[:30]  # a mirrored copy of another row
    h[near[:30][::3]] = h[near[:30][1::3]]  # equal hashes
    m[5] = h[5]  # an image symmetric under the mirror
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    i, j = np.array(pairs).T
    hashes = np.stack([h, m])
    d = np.min([popcount(hashes[x][i] ^ hashes[y][j]) for x in (0, 1) for y in (0, 1)], axis=0)
    want = components(n, i[d <= radius], j[d <= radius])
    method = PHash(radius, flip=True)
    keys = {KEY: pa.array(h), MIRROR: pa.array(m), ERROR: pa.array([None] * n, pa.string())}
    method.scan(pa.RecordBatch.from_pydict(keys), 0)
    got = method.labels(np.arange(n))
    size = np.bincount(want)[want]
    assert ((got >= 0) == (size > 1)).all()
    linked = np.flatnonzero(size > 1)
    for a in linked:  # the same partition
        assert set(np.flatnonzero(got == got[a])) == set(np.flatnonzero(want == want[a]))
    assert len(linked) >= 30
