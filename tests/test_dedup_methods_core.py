"""The dedup methods' helpers in this process: pHash chunks and distances, MinHash shingles and
similarities, semantic embedding checks, sampling and cluster shares, with exact values."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import image_bytes

from mmtools import columns as C
from mmtools.errors import DataContractError, UsageError
from mmtools.step import POSITION
from mmtools.steps.dedup import minhash as M
from mmtools.steps.dedup import phash as P
from mmtools.steps.dedup import semantic as S

# -- pHash --------------------------------------------------------------------------------


def test_chunk_masks_split_64_bits_into_radius_plus_one_chunks():
    assert P.chunk_masks(0) == [(0, (1 << 64) - 1)]
    assert P.chunk_masks(2) == [(0, (1 << 22) - 1), (22, (1 << 21) - 1), (43, (1 << 21) - 1)]
    assert P.chunk_masks(63) == [(i, 1) for i in range(64)]
    assert P.chunk_masks(100) == [(i, 1) for i in range(64)]
    masks = P.chunk_masks(9)
    assert len(masks) == 10 and masks[-1][0] + masks[-1][1].bit_length() == 64


def test_popcount_counts_set_bits():
    v = np.array([0, 1, 3, (1 << 64) - 1, 1 << 63], np.uint64)
    assert P.popcount(v).tolist() == [0, 1, 2, 64, 1]


def test_near_pairs_are_exactly_the_pairs_within_the_radius():
    h = np.array([0b0, 0b111, 0b1, 0b0, 1 << 40, 0b11 << 60], np.uint64)
    i, j = P.near_pairs(h, 2)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [
        (0, 2),
        (0, 3),
        (0, 4),
        (0, 5),
        (1, 2),
        (2, 3),
        (2, 4),
        (3, 4),
        (3, 5),
    ]
    i, j = P.near_pairs(h, 0)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 3)]
    i, j = P.near_pairs(np.array([1, 2], np.uint64), 0)
    assert len(i) == 0 and i.dtype == np.int64


def test_chunk_edges_link_equal_hashes_to_the_first_row_and_near_ones_by_value():
    h = np.array([5, 5, 4, 100], np.uint64)
    value = np.array([1, 1, 1, 9], np.uint64)
    pos = np.array([30, 10, 20, 40])
    i, j = P.chunk_edges(h, value, pos, 1)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(10, 30), (20, 30)]


def test_phash_bind_checks_the_image_column():
    assert P.PHash(4).bind(pa.schema([(C.IMAGE, C.MEDIA_TYPE)])) == [C.IMAGE]
    with pytest.raises(DataContractError) as e:
        P.PHash(4).bind(pa.schema([(C.IMAGE, pa.binary())]))
    assert str(e.value) == "column image is binary, not the {bytes, path} media layout"
    with pytest.raises(DataContractError, match=r"^dedup --method phash needs column\(s\) image"):
        P.PHash(4).bind(pa.schema([(C.TEXT, pa.string())]))


def images(*data) -> pa.RecordBatch:
    return pa.record_batch(
        [pa.array([{"bytes": d, "path": None} for d in data], C.MEDIA_TYPE)], names=[C.IMAGE]
    )


def test_phash_keys_scan_failures_labels_and_distances():
    from PIL import Image, ImageOps

    a, b = image_bytes(1, (64, 48)), image_bytes(2, (64, 48))
    img = Image.open(__import__("io").BytesIO(a))
    buf = __import__("io").BytesIO()
    ImageOps.mirror(img).save(buf, "PNG")
    mirrored = buf.getvalue()
    m = P.PHash(0, flip=True)
    assert m.hash_columns == (P.KEY, P.MIRROR) and m.fanout() == 1
    assert m.bucket_inputs == (P.KEY, P.MIRROR, P.ERROR)
    keys = m.keys(images(a, b"junk", mirrored, b))
    h, mirror = P.image_phashes(a)
    assert keys[P.KEY].to_pylist()[0] == h and keys[P.MIRROR].to_pylist()[0] == mirror
    assert keys[P.KEY].to_pylist()[1] == 0 and keys[P.MIRROR].to_pylist()[2] == h
    reason, _, detail = keys[P.ERROR].to_pylist()[1].partition("\x1f")
    assert keys[P.ERROR].to_pylist()[0] is None and reason == "not_image" and detail
    m.scan(pa.RecordBatch.from_pydict(keys), 10)
    assert list(m.failures) == [11] and m.failures[11][0] == "not_image"
    assert m.failures[11][1] == detail
    labels = m.labels(np.array([0, 2, 3]))
    assert labels[0] == labels[1] >= 0 and labels[2] == -1  # a and its mirror image
    assert m.values(np.array([2]), np.array([0])).tolist() == [0.0]
    plain = P.PHash(64)
    assert plain.fanout() == 64
    k = plain.keys(images(a, b))
    assert P.MIRROR not in k and k[P.KEY].to_pylist() == [P.image_phash(a), P.image_phash(b)]
    plain.scan(pa.RecordBatch.from_pydict(k), 0)
    far = int(P.popcount(np.array([P.image_phash(a) ^ P.image_phash(b)], np.uint64))[0])
    assert plain.values(np.array([1]), np.array([0])).tolist() == [float(far)]
    plain.values_wanted = True
    assert plain.member_columns() == (P.KEY,)
    plain.release()
    assert np.isnan(plain.values(np.array([1]), np.array([0]))).all()
    plain.set_members(pa.table({POSITION: [0, 1], P.KEY: pa.array([3, 0], pa.uint64())}))
    assert plain.values(np.array([1]), np.array([0])).tolist() == [2.0]
    assert P.PHash(3).member_columns() == ()


# -- MinHash -------------------------------------------------------------------------------


def test_shingles_and_jaccard():
    assert M.shingles("a b c", 2) == {"a b", "b c"}
    assert M.shingles("a b", 2) == {"a b"}
    assert M.shingles("a", 2) == {"a"}
    assert M.shingles("a b c", 1) == {"a", "b", "c"}
    assert M.shingles("a b c d", 3) == {"a b c", "b c d"}
    assert M.jaccard({"a", "b"}, {"b", "c"}) == 1 / 3


def test_similar_pairs_keep_only_pairs_at_or_over_the_threshold():
    sets = [M.shingles(t, 1) for t in ["a b c d", "a b c d e", "a b c x y", "q r s t", "a b c d"]]
    i, j = M.similar_pairs(sets, 0.8, 128, 0)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 1), (0, 4), (1, 4)]
    i, j = M.similar_pairs(sets, 0.95, 128, 0)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 4)]
    i, j = M.similar_pairs([{"a"}, {"b"}], 0.9, 64, 0)
    assert len(i) == 0 and i.dtype == np.int64


def test_minhash_labels_values_and_bind():
    m = M.MinHashText(0.7, 64, 1, 0)
    assert m.bind(pa.schema([(C.TEXT, pa.string())])) == [C.TEXT]
    with pytest.raises(DataContractError) as e:
        M.MinHashText(0.7, 64, 1, 0).bind(pa.schema([(C.TEXT, pa.int8())]))
    assert str(e.value) == "dedup --method minhash needs a string text column, not int8"
    texts = ["A b c d", "a b c d e", None, "zz", "ZZ!", "q r", "a b c d"]
    batch = pa.record_batch([pa.array(texts)], names=[C.TEXT])
    keys = m.keys(batch)
    assert keys[M.KEY].to_pylist() == ["a b c d", "a b c d e", None, "zz", "zz", "q r", "a b c d"]
    m.scan(pa.RecordBatch.from_pydict(keys), 0)
    labels = m.labels(np.arange(7))
    assert labels[0] == labels[1] == labels[6] >= 0
    assert labels[3] == labels[4] >= 0 and labels[3] != labels[0]
    assert labels[2] == -1 and labels[5] == -1
    assert m.values(np.array([1, 4, 6]), np.array([0, 3, 0])).tolist() == [0.8, 1.0, 1.0]
    m.values_wanted = True
    assert m.member_columns() == (M.KEY,)
    m.release()
    assert np.isnan(m.values(np.array([1]), np.array([0]))).all()
    m.set_members(pa.table({POSITION: [0, 1], M.KEY: ["a b", "a b c"]}))
    assert m.values(np.array([1]), np.array([0])).tolist() == [2 / 3]
    assert M.MinHashText(0.7, 64, 1, 0).member_columns() == ()
    empty = M.MinHashText(0.7, 64, 1, 0)
    empty.scan(pa.RecordBatch.from_pydict({M.KEY: pa.array([None, None], pa.string())}), 0)
    assert empty.labels(np.arange(2)).tolist() == [-1, -1]


def test_fanout_is_the_number_of_bands():
    b, r = M.bands(0.6, 128)
    assert b * r <= 128 and M.MinHashText(0.6, 128, 2, 0).fanout() == b


# -- semantic ------------------------------------------------------------------------------


def emb(rows, dim=2, typ=pa.float32()) -> pa.Array:
    return pa.array(rows, pa.list_(typ, dim))


def test_problems_name_what_is_wrong_with_each_embedding():
    arr = emb([[3, 4], None, [0, 0], [float("nan"), 1], [float("inf"), 0], [1e-30, 0]])
    assert S.problems(arr, 2) == [
        None,
        "no embedding",
        "zero norm",
        "NaN or infinite values",
        "NaN or infinite values",
        None,
    ]
    assert S.problems(emb([[1, 0]]), 2) == [None]


def test_unit_rows_and_embedding_rows():
    x, norm = S.unit_rows(np.array([[3, 4], [0, 0], [np.inf, 1]], np.float16))
    assert x.dtype == np.float32 and x.tolist() == [
        [0.6000000238418579, 0.800000011920929],
        [0, 0],
        [0, 0],
    ]
    assert norm.tolist() == [5.0, 0.0, np.inf]
    raw, valid = S.embedding_rows(emb([[1, 2], None, [3, 4]]), 2)
    assert raw.shape == (2, 2) and valid.tolist() == [True, False, True]
    raw, valid = S.embedding_rows(emb([[1, 2], [3, 4]]), 2)
    assert raw.tolist() == [[1, 2], [3, 4]] and valid is None


def test_cluster_counts_and_sampling():
    assert [S.default_clusters(n) for n in (0, 400, 1499, 1500, 2500, 10_000)] == [
        1,
        1,
        1,
        2,
        2,
        10,
    ]
    assert S.sample_rate(1000, 2) == 0.128 and S.sample_rate(0, 1) == 64.0
    pos = np.arange(2000)
    assert S.sampled(pos, 1.0, 3).all() and S.sampled(pos, 2.0, 3).all()
    assert not S.sampled(pos, 0.0, 3).any()
    half = S.sampled(pos, 0.5, 7)
    assert 900 < half.sum() < 1100
    assert (half == S.sampled(pos, 0.5, 7)).all()
    assert not (half == S.sampled(pos, 0.5, 8)).all()
    want = S.mix64(pos.astype(np.uint64) ^ S.mix64(np.array([7], np.uint64))) < np.uint64(2**63)
    assert (half == want).all()
    assert S._share(10, np.array([5, 1, 94])).tolist() == [1, 1, 9]
    assert S._share(4, np.array([0, 10])).tolist() == [1, 4]


def test_close_pairs_and_duplicate_labels_within_clusters():
    x = np.array([[1, 0], [0.999, 0.0447], [0, 1], [1, 0], [0, 1]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j = S.close_pairs(x, 0.99)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 1), (0, 3), (1, 3), (2, 4)]
    i, j = S.close_pairs(x[:0], 0.5)
    assert len(i) == 0 and i.dtype == np.int64
    labels = S.duplicate_labels(x, np.array([0, 0, 1, 1, 1]), 0.01)
    assert labels[0] == labels[1] and labels[2] == labels[4] and labels[3] == -1
    assert labels[0] != labels[2]
    assert S.duplicate_labels(x[:0], np.array([], np.int64), 0.01).tolist() == []
    assert S._block_index(np.array([0, 3, 5, 6]), 10, 14, 100).tolist() == [10, 13, 101, 102]


def test_semantic_bind_and_values():
    m = S.Semantic(C.IMAGE_EMBEDDING, 0.05, None, 0)
    schema = pa.schema([(C.IMAGE_EMBEDDING, pa.list_(pa.float16(), 3))])
    assert m.bind(schema) == [C.IMAGE_EMBEDDING] and m.dim == 3
    assert m.bucket_inputs == (C.IMAGE_EMBEDDING, S.ERROR)
    with pytest.raises(DataContractError) as e:
        S.Semantic(C.IMAGE_EMBEDDING, 0.05, None, 0).bind(
            pa.schema([(C.IMAGE_EMBEDDING, pa.list_(pa.float32()))])
        )
    assert str(e.value) == (
        "column image_embedding is list<item: float>, not an embedding (a fixed-size list of "
        "floats); pick one with --column"
    )
    with pytest.raises(UsageError, match=r"^--column: unknown column emb"):
        S.Semantic("emb", 0.05, None, 0).bind(schema)
    with pytest.raises(DataContractError, match=r"^dedup --method semantic needs column"):
        S.Semantic(C.IMAGE_EMBEDDING, 0.05, None, 0).bind(pa.schema([("x", pa.int8())]))
    arr = emb([[1, 0, 0], [0.6, 0.8, 0], None, [0, 0, 2]], 3, pa.float16())
    keys = m.keys(pa.record_batch([arr], names=[C.IMAGE_EMBEDDING]))
    assert keys[S.ERROR].to_pylist() == [None, None, "no embedding", None]
    m.scan(pa.RecordBatch.from_pydict(keys), 5)
    assert m.failures == {7: ("invalid_embedding", "image_embedding: no embedding")}
    assert m._n == 9
    m.values_wanted = True
    assert m.member_columns() == (C.IMAGE_EMBEDDING,)
    m.clusters = 1
    m._rows = [m._rows[0]]
    m.scan(pa.RecordBatch.from_pydict({S.ERROR: pa.array([], pa.string())}), 9)
    assert m._n == 9
    full = S.Semantic(C.IMAGE_EMBEDDING, 0.5, 1, 0)
    full.bind(schema)
    full.values_wanted = True
    full.scan(
        pa.RecordBatch.from_pydict(full.keys(pa.record_batch([arr], names=[C.IMAGE_EMBEDDING]))), 0
    )
    labels = full.labels(np.array([0, 1, 3]))
    assert labels.tolist() == [labels[0], labels[0], -1] and labels[0] >= 0
    assert full.values(np.array([1]), np.array([0])).tolist() == pytest.approx([0.6], abs=1e-3)
    full.release()
    assert np.isnan(full.values(np.array([1]), np.array([0]))).all()
    assert S.Semantic(C.IMAGE_EMBEDDING, 0.05, None, 0).member_columns() == ()
