"""`mmtools dedup --method phash`: agreement with imagehash, the index, recall on edited copies."""

from __future__ import annotations

import io
import itertools
import json

import imagehash
import numpy as np
import pyarrow as pa
import pytest
from conftest import encode, image_bytes, mmtools, read_dataset, read_rejects
from PIL import Image
from test_dedup import (
    assert_ray_buckets_give_local_groups,
    found_groups,
    group_pairs,
    precision_recall,
    write_dataset,
)

from mmtools import columns as C
from mmtools.demo import synth
from mmtools.steps.dedup.phash import image_phash, near_pairs


def image_table(ids: list[str], blobs: list[bytes | None]) -> pa.Table:
    """A dataset table with an image column in the HF layout."""
    return pa.table({C.ID: ids, C.IMAGE: C.media_array(blobs, [None] * len(blobs))})


def edited_copies(n: int, seed: int) -> tuple[pa.Table, list[list[str]]]:
    """Scenes with re-encoded, resized and slightly cropped copies; the true groups."""
    rows, groups = [], []
    rng = np.random.default_rng(seed)
    for k, sample in enumerate(synth.generate(n, seed, size=128)):
        # Over a smooth random backdrop, as photos differ more than plain synthetic scenes.
        field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        backdrop = Image.fromarray(field).resize(sample.image.size, Image.BICUBIC)
        img, side = Image.blend(sample.image, backdrop, 0.5), sample.image.width
        cut = 2
        variants = {
            "orig": encode(img, quality=95),
            "q40": encode(img, quality=40),
            "small": encode(img.resize((96, 96), Image.BICUBIC), "PNG"),
            "crop": encode(img.crop((cut, cut, side - cut, side - cut)), quality=90),
        }
        names = ["orig", *rng.choice(["q40", "small", "crop"], rng.integers(0, 4), replace=False)]
        groups.append([f"s{k:03d}-{v}" for v in names])
        rows += [(f"s{k:03d}-{v}", variants[v]) for v in names]
    order = rng.permutation(len(rows))
    table = image_table([rows[i][0] for i in order], [rows[i][1] for i in order])
    return table, [g for g in groups if len(g) > 1]


def test_phash_values_equal_imagehash():
    samples = list(synth.generate(6, 11, size=96))
    blobs = [encode(s.image, quality=85) for s in samples]
    blobs += [encode(s.image, "PNG") for s in samples]
    blobs += [encode(s.image.convert("L"), "PNG") for s in samples]
    blobs += [image_bytes(k, size=(70, 50)) for k in range(6)]
    for blob in blobs:
        expected = int(str(imagehash.phash(Image.open(io.BytesIO(blob)))), 16)
        assert image_phash(blob) == expected


@pytest.mark.parametrize("radius", [0, 2, 6, 9])
def test_index_finds_exactly_the_pairs_within_the_radius(radius):
    rng = np.random.default_rng(radius)
    base = rng.integers(0, 2**63, 1500, dtype=np.int64).astype(np.uint64)
    flips = [rng.choice(64, rng.integers(0, 12), replace=False) for _ in range(500)]
    near = [base[k] ^ np.uint64(sum(1 << int(b) for b in f)) for k, f in enumerate(flips)]
    hashes = np.concatenate([base, np.array(near, dtype=np.uint64)])
    i, j = near_pairs(hashes, radius)
    dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    bi, bj = np.nonzero(np.triu(dist <= radius, k=1))
    assert len(bi) > 0
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == set(
        zip(bi.tolist(), bj.tolist(), strict=True)
    )


@pytest.mark.parametrize("radius", [0, 3, 6])
def test_chunk_buckets_give_the_same_groups_as_the_index(radius):
    """Ray's buckets of hash chunks, each searched by chunk value, make the same duplicate
    groups as the local index, repeated hashes and lone rows included."""
    from mmtools.steps.dedup.phash import ERROR, KEY, PHash

    rng = np.random.default_rng(radius)
    base = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64)
    near = [h ^ np.uint64(1 << int(rng.integers(64))) for h in base[:100]]
    hashes = np.concatenate([base, np.array(near, np.uint64), base[:50]])  # and exact copies
    rng.shuffle(hashes)
    keys = pa.table({KEY: hashes, ERROR: pa.nulls(len(hashes), pa.string())})
    assert_ray_buckets_give_local_groups(lambda: PHash(radius), keys, min_groups=50)


def at_and_past_the_radius(radius: int, seed: int) -> tuple[np.ndarray, set, set]:
    """Hashes in pairs: one pair per base `radius` bits apart, one `radius` + 1 bits apart
    (the flipped bits anywhere, or packed into the lowest bits so the pair shares chunks);
    the positions of both kinds of pairs."""
    rng = np.random.default_rng(seed)
    hashes, at, past = [], set(), set()
    for k in range(40):
        for flips, pairs in ((radius, at), (radius + 1, past)):
            base = int(rng.integers(0, 2**63)) | int(rng.integers(2)) << 63
            bits = range(flips) if k % 2 else rng.choice(64, flips, replace=False)
            pairs.add((len(hashes), len(hashes) + 1))
            hashes += [base, base ^ sum(1 << int(b) for b in bits)]
    hashes = np.array(hashes, np.uint64)
    dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(dist <= radius + 1, k=1))
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == at | past  # bases far apart
    return hashes, at, past


def together(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of positions with the same group label."""
    pairs = itertools.combinations(range(len(labels)), 2)
    return {(a, b) for a, b in pairs if labels[a] == labels[b] >= 0}


@pytest.mark.parametrize("radius", [0, 3, 6])
def test_pairs_exactly_at_the_radius_are_duplicates_and_one_bit_past_are_not(radius):
    """At distance r a pair is one group, at r + 1 two rows apart: on the local index and on
    Ray's path (chunk buckets, each searched by `bucket_edges`)."""
    import pyarrow.compute as pc

    from mmtools.step import POSITION
    from mmtools.steps.dedup.groups import BUCKET, position_components
    from mmtools.steps.dedup.phash import ERROR, KEY, PHash

    hashes, at, _ = at_and_past_the_radius(radius, seed=radius)
    n = len(hashes)
    keys = pa.table({KEY: hashes, ERROR: pa.nulls(n, pa.string())})
    local = PHash(radius)
    local.scan(keys.to_batches()[0], 0)
    assert together(local.labels(np.arange(n))) == at
    ray, keys = PHash(radius), keys.append_column(POSITION, pa.array(np.arange(n), pa.int64()))
    rows = ray.bucket_rows(keys, 4)
    edges = [ray.bucket_edges(rows.filter(pc.equal(rows[BUCKET], b))) for b in range(4)]
    i, j = (np.concatenate([e[k] for e in edges]).astype(np.int64) for k in (0, 1))
    ray.set_groups(n, *position_components(i, j))
    assert together(ray.labels(np.arange(n))) == at


def test_phash_finds_reencoded_resized_and_cropped_copies(tmp_path):
    table, true_groups = edited_copies(40, seed=5)
    ds = write_dataset(tmp_path / "ds", table, shards=3)
    out = tmp_path / "out"
    proc = mmtools("dedup", ds, "-o", out, "-m", "phash", "--max-distance", "8", "--mark")
    marked = read_dataset(out)
    precision, recall = precision_recall(
        group_pairs(found_groups(marked)), group_pairs(true_groups)
    )
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)
    assert "clusters: phash" in proc.stderr.decode()
    # The kept row of each cluster is the first in input order.
    first = {}
    for i, c, d in zip(
        *(marked[k].to_pylist() for k in (C.ID, C.DUP_CLUSTER, C.IS_DUPLICATE)), strict=True
    ):
        if c is not None:
            assert d == (c in first)
            first.setdefault(c, i)


def test_undecodable_images_become_rejects_and_no_row_is_lost(tmp_path):
    good = [image_bytes(k, size=(64, 64)) for k in range(6)]
    truncated = good[0][: len(good[0]) // 2]
    blobs = [*good, good[2], b"", b"not an image", b"not an image", truncated, None]
    ids = [f"r{k:02d}" for k in range(len(blobs))]
    ds = write_dataset(tmp_path / "ds", image_table(ids, blobs))
    out = tmp_path / "out"
    mmtools("dedup", ds, "-o", out, "-m", "exact", "-m", "phash", "--max-distance", "0", "-q")
    kept = read_dataset(out)[C.ID].to_pylist()
    rejects = read_rejects(out)
    reasons = dict(
        zip(rejects[C.ID].to_pylist(), rejects[C.REJECT_REASON].to_pylist(), strict=True)
    )
    # r09 is a byte copy of r08: exact drops it before phash would reject it.
    assert reasons == {
        "r07": "zero_byte",
        "r08": "not_image",
        "r10": "truncated",
        "r11": "no_media",
    }
    assert set(rejects[C.REJECT_STEP].to_pylist()) == {"dedup"}
    assert kept == ids[:6]
    summary = json.loads((out / "_manifest.json").read_text())["summary"]
    assert summary["rows_in"] == 12 and summary["rejected"] == 4
    assert summary["dropped"] == {"exact": 2}
