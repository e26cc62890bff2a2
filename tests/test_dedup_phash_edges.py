"""pHash dedup at its edges, in this process: the missing-extra hint, max_pixels, media
failures and their reject details, empty inputs, Ray's bucket rows, and an index's rows at
the radius and one bit past it, each against a brute-force answer."""

from __future__ import annotations

import io
import math
import sys

import imagehash
import numpy as np
import pyarrow as pa
import pytest
from conftest import encode, image_bytes, read_dataset, read_rejects, write_shards
from PIL import Image

from mmtools import columns as C
from mmtools import engines
from mmtools.errors import MissingDependencyError
from mmtools.io.dataset import DatasetSink
from mmtools.io.source import Source
from mmtools.media import MediaError
from mmtools.step import BUCKET, POSITION
from mmtools.steps.dedup import phash as P
from mmtools.steps.dedup.step import Dedup, DedupConfig

HINT = "this needs the optional package 'imagehash'; install it with pip install 'mmtools[dedup]'"


def images(*cells) -> pa.RecordBatch:
    """An image column of {bytes, path} cells (None: a null cell)."""
    rows = [None if c is None else {"bytes": c[0], "path": c[1]} for c in cells]
    return pa.record_batch([pa.array(rows, C.MEDIA_TYPE)], names=[C.IMAGE])


def reference_phash(blob: bytes) -> int:
    """imagehash's own pHash of an encoded image, as an integer."""
    return int(str(imagehash.phash(Image.open(io.BytesIO(blob)))), 16)


def hash_keys(hashes, failed=()) -> pa.RecordBatch:
    """pHash key rows as `PHash.keys` makes them; rows in `failed` could not be hashed."""
    errors = [f"not_image{P._SEP}junk" if k in failed else None for k in range(len(hashes))]
    return pa.record_batch(
        [pa.array(np.asarray(hashes, np.uint64), pa.uint64()), pa.array(errors, pa.string())],
        names=[P.KEY, P.ERROR],
    )


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance of every hash of `a` to every hash of `b`, by Python's int.bit_count."""
    return np.array([[(int(x) ^ int(y)).bit_count() for y in b] for x in a], np.int64)


def flipped(h: int, bits) -> int:
    """`h` with `bits` flipped."""
    for b in bits:
        h ^= 1 << int(b)
    return h


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    """The groups of two or more rows that `labels` makes (-1: a row in none)."""
    groups: dict[int, set[int]] = {}
    for row, label in enumerate(labels.tolist()):
        if label >= 0:
            groups.setdefault(label, set()).add(row)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def linked(n: int, edges) -> set[frozenset[int]]:
    """The groups of two or more of `n` nodes that `edges` connect (union-find)."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        parent[root(int(a))] = root(int(b))
    groups: dict[int, set[int]] = {}
    for x in range(n):
        groups.setdefault(root(x), set()).add(x)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


# -- the missing extra, max_pixels, media failures -------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: P.image_phash(image_bytes(0)),
        lambda: P.image_phashes(image_bytes(0)),
        lambda: P.PHash(4).bind(pa.schema([(C.IMAGE, C.MEDIA_TYPE)])),
    ],
    ids=["image_phash", "image_phashes", "bind"],
)
def test_without_imagehash_the_error_names_the_dedup_extra(monkeypatch, call):
    monkeypatch.setitem(sys.modules, "imagehash", None)
    with pytest.raises(MissingDependencyError) as e:
        call()
    assert str(e.value) == HINT


def test_an_image_over_max_pixels_is_a_decompression_bomb_and_one_at_it_is_hashed():
    blob = image_bytes(3, size=(64, 48))
    for hash_of in (P.image_phash, P.image_phashes):
        with pytest.raises(MediaError) as e:
            hash_of(blob, 64 * 48 - 1)
        assert (e.value.reason, e.value.detail) == (
            "decompression_bomb",
            "64x48 exceeds the limit of 3071 pixels",
        )
    assert P.image_phash(blob, 64 * 48) == reference_phash(blob)
    mirror = encode(Image.open(io.BytesIO(blob)).transpose(Image.FLIP_LEFT_RIGHT), "PNG")
    assert P.image_phashes(blob, 64 * 48) == (reference_phash(blob), reference_phash(mirror))


@pytest.mark.parametrize("flip", [False, True])
def test_keys_reject_images_over_max_pixels_and_cells_without_media(flip):
    big, small = image_bytes(1, size=(40, 30)), image_bytes(2, size=(20, 10))
    keys = P.PHash(2, max_pixels=20 * 10, flip=flip).keys(
        images((big, None), (small, None), None, (None, None))
    )
    no_media = f"no_media{P._SEP}the row holds no image bytes and no path"
    assert keys[P.ERROR].to_pylist() == [
        f"decompression_bomb{P._SEP}40x30 exceeds the limit of 200 pixels",
        None,
        no_media,
        no_media,
    ]
    assert keys[P.KEY].to_pylist() == [0, reference_phash(small), 0, 0]


def test_keys_error_column_is_string_typed_when_every_image_hashes():
    keys = P.PHash(2).keys(images((image_bytes(1), None), (image_bytes(2), None)))
    assert keys[P.ERROR].type == pa.string() and keys[P.ERROR].null_count == 2


def dedup_run(tmp_path, table: pa.Table, config: DedupConfig, name: str, batch_size: int = 1024):
    """`Dedup` through the local engine over `table` as Parquet; the kept rows and the step."""
    src = write_shards(tmp_path / f"{name}-in", table, 1, row_group=2)
    step = Dedup(config)
    out = tmp_path / name
    engines.run(
        "dedup",
        Source([str(src)]),
        [step],
        DatasetSink(str(out)),
        batch_size=batch_size,
        quiet=True,
    )
    return read_dataset(out), step


def test_a_missing_file_whose_path_holds_the_separator_is_rejected_with_the_whole_path(
    tmp_path,
):
    """The reject detail is everything after the first separator: a path may hold one too."""
    a, b = image_bytes(1, size=(64, 48)), image_bytes(2, size=(64, 48))
    a_png = encode(Image.open(io.BytesIO(a)), "PNG")
    gone = str(tmp_path / f"gone{P._SEP}x.png")
    table = pa.table(
        {
            C.ID: ["r0", "r1", "r2", "r3"],
            C.IMAGE: C.media_array([a, a_png, None, b], [None, None, gone, None]),
        }
    )
    kept, _ = dedup_run(tmp_path, table, DedupConfig(methods=("phash",), max_distance=4), "out")
    assert kept[C.ID].to_pylist() == ["r0", "r3"]
    rejects = read_rejects(tmp_path / "out")
    assert rejects.select([C.ID, C.REJECT_REASON, C.REJECT_DETAIL]).to_pylist() == [
        {
            C.ID: "r2",
            C.REJECT_REASON: "missing_file",
            C.REJECT_DETAIL: f"{gone}: No such file or directory",
        }
    ]


def test_an_index_run_whose_first_batches_all_hash_keeps_and_indexes_the_good_rows(tmp_path):
    """Key rows of every batch are staged in the index together: a batch without a failure
    must key its errors with the same type as a batch with one."""
    blobs = [image_bytes(k, size=(32, 32)) for k in range(4)] + [b"junk"]
    ids = [f"r{k}" for k in range(5)]
    table = pa.table({C.ID: ids, C.IMAGE: C.media_array(blobs, [None] * 5)})
    config = DedupConfig(methods=("phash",), max_distance=4, index=str(tmp_path / "idx"))
    kept, _ = dedup_run(tmp_path, table, config, "out", batch_size=2)
    assert kept[C.ID].to_pylist() == ids[:4]
    assert read_rejects(tmp_path / "out")[C.REJECT_REASON].to_pylist() == ["not_image"]
    again, step = dedup_run(tmp_path, table.slice(0, 2), config, "again")
    assert again.num_rows == 0
    assert step.stats["phash"] == {"clusters": 2, "duplicates": 2, "of_earlier_runs": 2}


# -- empty inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_an_empty_dataset_dedups_to_an_empty_output(tmp_path, flip):
    table = pa.table({C.ID: pa.array([], pa.string()), C.IMAGE: C.media_array([], [])})
    config = DedupConfig(methods=("phash",), max_distance=3, phash_flip=flip)
    kept, step = dedup_run(tmp_path, table, config, "out")
    assert kept.num_rows == 0 and step.stats["phash"] == {"clusters": 0, "duplicates": 0}


@pytest.mark.parametrize("flip", [False, True])
def test_a_bucket_of_no_rows_has_no_edges(flip):
    """All rows failed: `bucket_rows` makes none, and their bucket yields integer positions."""
    m = P.PHash(3, flip=flip)
    keys = pa.Table.from_batches([hash_keys([5, 5, 9], failed={0, 1, 2})])
    keys = keys.append_column(P.MIRROR, keys[P.KEY]) if flip else keys
    rows = m.bucket_rows(keys.append_column(POSITION, pa.array([7, 8, 9], pa.int64())), 4)
    assert rows.num_rows == 0
    i, j = m.bucket_edges(rows)
    assert (i.dtype, j.dtype, len(i), len(j)) == (np.int64, np.int64, 0, 0)
    assert np.arange(3)[i].size == np.arange(3)[j].size == 0


def test_near_pairs_returns_integer_positions_that_index_the_hashes():
    far = np.array([1, 2], np.uint64)  # no chunk value shared at radius 0
    near = np.array([0b1011, 1 << 50, 0b1001, 0b1011], np.uint64)
    for hashes, radius, pairs in ((far, 0, []), (near, 1, [(0, 2), (0, 3), (2, 3)])):
        i, j = P.near_pairs(hashes, radius)
        assert (i.dtype, j.dtype) == (np.int64, np.int64)
        assert list(zip(i.tolist(), j.tolist(), strict=True)) == pairs
        assert np.bitwise_count(hashes[i] ^ hashes[j]).tolist() == [
            (int(hashes[a]) ^ int(hashes[b])).bit_count() for a, b in pairs
        ]


# -- the work done: only pigeonhole candidates -------------------------------------------


def counting_popcount(monkeypatch) -> list[int]:
    """The number of hashes of each `popcount` call in phash (the real one does the work)."""
    calls: list[int] = []
    real = P.popcount

    def counted(v):
        calls.append(len(v))
        return real(v)

    monkeypatch.setattr(P, "popcount", counted)
    return calls


def test_near_pairs_checks_only_the_pairs_that_share_a_chunk_value(monkeypatch):
    """The pigeonhole: the distance is computed for pairs equal on one chunk, not all pairs."""
    rng = np.random.default_rng(4)
    base = [int(x) for x in rng.integers(0, 2**63, 300)]
    hashes = base + [flipped(h, rng.choice(64, 3, replace=False)) for h in base[:100]]
    radius = 3
    shared = 0
    for shift, mask in P.chunk_masks(radius):
        _, count = np.unique([(h >> shift) & mask for h in hashes], return_counts=True)
        shared += sum(c * (c - 1) // 2 for c in count.tolist())
    calls = counting_popcount(monkeypatch)
    i, j = P.near_pairs(np.array(hashes, np.uint64), radius)
    assert sum(calls) == shared < len(hashes) * (len(hashes) - 1) // 2
    d = distances(np.array(hashes, np.uint64), np.array(hashes, np.uint64))
    bi, bj = np.nonzero(np.triu(d <= radius, k=1))
    assert (i.tolist(), j.tolist()) == (bi.tolist(), bj.tolist())


def test_cross_pairs_probes_the_new_hashes_a_slab_at_a_time(monkeypatch):
    """One distance check per chunk and slab of `_SLAB` new hashes, not per new hash."""
    rng = np.random.default_rng(6)
    new = rng.integers(0, 2**64, 2 * P._SLAB + 100, dtype=np.uint64)
    old = np.concatenate([new[::50], rng.integers(0, 2**64, 200, dtype=np.uint64)])
    calls = counting_popcount(monkeypatch)
    i, j = P.cross_pairs(new, old, 7)
    assert len(calls) <= P.CROSS_PARTS * math.ceil(len(new) / P._SLAB)
    assert {(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True)} >= {
        (50 * k, k) for k in range(len(new[::50]))
    }


# -- Ray's path: bucket rows, bucket edges, groups set from them ----------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_bucket_rows_carry_each_hash_once_per_chunk_with_its_chunk_value(flip):
    """Rows with equal chunk and chunk value share a bucket, whatever the rest of the hash."""
    radius, rng = 3, np.random.default_rng(8)
    hashes = [int(x) for x in rng.integers(0, 2**63, 40)]
    hashes += [h ^ (0xFFFF << 48) for h in hashes[:10]]  # equal low chunks, far apart
    mirrors = [int(x) for x in rng.integers(0, 2**63, len(hashes))]
    n = len(hashes)
    keys = pa.Table.from_batches([hash_keys(hashes, failed={3})])
    if flip:
        keys = keys.append_column(P.MIRROR, pa.array(mirrors, pa.uint64()))
    positions = [100 + 2 * k for k in range(n)]
    keys = keys.append_column(POSITION, pa.array(positions, pa.int64()))
    rows = P.PHash(radius, flip=flip).bucket_rows(keys, 5)
    entries = [(positions[k], hashes[k]) for k in range(n) if k != 3]
    entries += [(positions[k], mirrors[k]) for k in range(n) if k != 3] if flip else []
    expected = sorted(
        (c, (h >> shift) & mask, pos, h)
        for c, (shift, mask) in enumerate(P.chunk_masks(radius))
        for pos, h in entries
    )
    got = zip(*(rows[k].to_pylist() for k in ("chunk", "value", POSITION, "hash")), strict=True)
    assert sorted(got) == expected
    bucket: dict[tuple[int, int], set[int]] = {}
    for c, v, b in zip(*(rows[k].to_pylist() for k in ("chunk", "value", BUCKET)), strict=True):
        bucket.setdefault((c, v), set()).add(b)
    assert all(len(b) == 1 for b in bucket.values()) and len(bucket) > 4 * 40
    assert set(rows[BUCKET].to_pylist()) == set(range(5))


def ray_style_dedup(table: pa.Table, config: DedupConfig, buckets: int = 3) -> pa.Table:
    """`Dedup` decided as the Ray engine decides it (`engines/ray/global_ops.decide`), without
    Ray: the bucketed method's key columns dropped before the scan, its groups found by
    `bucket_rows` and `bucket_edges` per bucket, its kept rows' keys from `set_members`."""
    import pyarrow.compute as pc

    from mmtools.steps.dedup.groups import position_components

    step = Dedup(config)
    step.ledger = False
    step.output_schema(table.schema)
    batches = table.to_batches(max_chunksize=2)
    keys = pa.Table.from_batches([step.keys(b) for b in batches])
    keys = keys.append_column(POSITION, pa.array(np.arange(keys.num_rows), pa.int64()))
    method = step.bucketed()
    for batch in keys.drop_columns(list(method.bucket_columns)).to_batches(max_chunksize=2):
        step.scan(batch)
    rows = method.bucket_rows(keys.select([*method.bucket_inputs, POSITION]), buckets)
    found = [method.bucket_edges(rows.filter(pc.equal(rows[BUCKET], b))) for b in range(buckets)]
    i, j = (np.concatenate([f[k] for f in found]).astype(np.int64) for k in (0, 1))
    positions, labels = position_components(i, j)
    method.set_groups(keys.num_rows, positions, labels)
    wanted = pa.array(positions, pa.int64())
    members = keys.select([*method.member_columns(), POSITION])
    method.set_members(members.filter(pc.is_in(members[POSITION], value_set=wanted)))
    step.finish_scan()
    return pa.Table.from_batches([step.process(b).batch for b in batches])


@pytest.mark.parametrize("flip", [False, True])
def test_ray_style_groups_mark_each_copy_with_its_kept_row_and_bits_apart(flip):
    from PIL import ImageOps

    base = [Image.open(io.BytesIO(image_bytes(k, size=(64, 48)))) for k in range(4)]
    blobs = [encode(base[0], "PNG"), encode(base[1], "PNG"), encode(base[0], quality=70)]
    blobs += [encode(ImageOps.mirror(base[2]), "PNG"), encode(base[2], "PNG"), b"junk"]
    blobs += [encode(base[3], "PNG"), encode(base[1], quality=60), encode(base[0], quality=30)]
    ids = [f"r{k}" for k in range(len(blobs))]
    table = pa.table({C.ID: ids, C.IMAGE: C.media_array(blobs, [None] * len(blobs))})
    radius = 6
    config = DedupConfig(methods=("phash",), max_distance=radius, phash_flip=flip, mark=True)
    out = ray_style_dedup(table, config)

    good = [k for k, b in enumerate(blobs) if b != b"junk"]
    sides = {k: [reference_phash(blobs[k])] for k in good}
    if flip:
        for k in good:
            mirror = ImageOps.mirror(Image.open(io.BytesIO(blobs[k])))
            sides[k].append(int(str(imagehash.phash(mirror)), 16))

    def apart(a: int, b: int) -> int:
        return min((x ^ y).bit_count() for x in sides[a] for y in sides[b])

    groups = linked(
        len(blobs), [(a, b) for a in good for b in good if a < b and apart(a, b) <= radius]
    )
    kept_of = {k: min(g) for g in groups for k in g}
    assert out[C.ID].to_pylist() == [i for k, i in enumerate(ids) if k in good]
    assert any(len(g) > 2 for g in groups) and (frozenset({3, 4}) in groups) == flip
    expected = [
        (ids[kept_of[k]], float(apart(k, kept_of[k])))
        if k in kept_of and kept_of[k] != k
        else (None, None)
        for k in good
    ]
    got = zip(out[C.DUP_KEPT_ID].to_pylist(), out[C.DUP_VALUE].to_pylist(), strict=True)
    assert list(got) == expected


# -- an index's rows: linked to this run's within the radius, never to each other ----------


@pytest.mark.parametrize("radius", [0, 5, 15])
def test_index_rows_group_with_new_rows_at_the_radius_and_not_one_past(radius):
    """Against an index (labels by `cross_pairs`), with more new rows than two probe slabs:
    the groups are exactly the brute-force ones, planted pairs at r and r + 1 included."""
    rng = np.random.default_rng(radius)
    n_new, n_old = 2 * P._SLAB + 150, 300
    old = rng.integers(0, 2**64, n_old, dtype=np.uint64)
    new = rng.integers(0, 2**64, n_new, dtype=np.uint64)
    plant = {5: (0, radius), 1500: (1, radius + 1), 2100: (2, radius), 2150: (2, radius)}
    plant |= {2190: (3, radius + 1), 2191: (4, radius), n_new - 1: (5, radius)}
    for row, (at, bits) in plant.items():
        new[row] = flipped(int(old[at]), rng.choice(64, bits, replace=False))
    new[2000] = flipped(int(new[2001]), rng.choice(64, radius, replace=False))
    failed = {7}
    m = P.PHash(radius)
    m.scan(hash_keys(new, failed), 0)
    m.index_from = n_new
    m.scan(hash_keys(old), n_new)
    active = np.array([k for k in range(n_new + n_old) if k not in failed])
    labels = m.labels(active)

    everything = np.concatenate([new, old])[active]
    d = np.bitwise_count(everything[:, None] ^ everything[None, :])
    is_new = active < n_new
    assert not (np.triu(d <= radius, k=1) & ~is_new[:, None] & ~is_new[None, :]).any()
    expected = linked(len(active), zip(*np.nonzero(np.triu(d <= radius, k=1)), strict=True))
    assert partition(labels) == expected and labels.dtype == np.int64
    grouped = set().union(*expected)
    assert [labels[k] == -1 for k in range(len(active))] == [
        k not in grouped for k in range(len(active))
    ]
    rank = {int(row): k for k, row in enumerate(active)}
    at = [(r, n_new + a) for r, (a, bits) in plant.items() if bits == radius] + [(2000, 2001)]
    past = [(r, n_new + a) for r, (a, bits) in plant.items() if bits > radius]
    assert all(labels[rank[a]] == labels[rank[b]] >= 0 for a, b in at)
    assert not any(labels[rank[a]] == labels[rank[b]] >= 0 for a, b in past)
