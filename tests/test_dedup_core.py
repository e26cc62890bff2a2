"""Dedup in this process: option checks, the keep rule, grouping helpers, marks and ledger."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from test_dedup import run_dedup, write_dataset

from mmtools import columns as C
from mmtools.errors import DataContractError, UsageError
from mmtools.step import BUCKET, POSITION
from mmtools.steps.dedup import groups as G
from mmtools.steps.dedup.exact import Exact, normalize_text, parse_fields
from mmtools.steps.dedup.step import Dedup, DedupConfig, _orderable


@pytest.mark.parametrize(
    "options, message",
    [
        ({"methods": ()}, "give at least one --method"),
        (
            {"methods": ("exact", "fuzzy")},
            "--method must be one of exact, phash, minhash, semantic, not 'fuzzy'",
        ),
        ({"methods": ("exact", "exact")}, "each --method may be given once"),
        (
            {"keep": "best"},
            "--keep must be 'first', 'highest:COLUMN' or 'lowest:COLUMN', not 'best'",
        ),
        ({"max_distance": -1}, "--max-distance must be between 0 and 32 bits"),
        ({"max_distance": 33}, "--max-distance must be between 0 and 32 bits"),
        ({"threshold": 0.0}, "--threshold must be in (0, 1]"),
        ({"threshold": 1.01}, "--threshold must be in (0, 1]"),
        ({"eps": -0.01}, "--eps must be in [0, 1)"),
        ({"eps": 1.0}, "--eps must be in [0, 1)"),
        ({"num_perm": 1}, "--num-perm must be >= 2, --shingle and --clusters >= 1"),
        ({"shingle": 0}, "--num-perm must be >= 2, --shingle and --clusters >= 1"),
        ({"clusters": 0}, "--num-perm must be >= 2, --shingle and --clusters >= 1"),
    ],
)
def test_impossible_options_are_usage_errors(options, message):
    with pytest.raises(UsageError) as e:
        DedupConfig(**options).check()
    assert str(e.value) == message


@pytest.mark.parametrize(
    "options",
    [
        {"max_distance": 0},
        {"max_distance": 32},
        {"threshold": 1.0},
        {"eps": 0.0},
        {"num_perm": 2, "shingle": 1, "clusters": 1},
        {"keep": "lowest:x"},
    ],
)
def test_option_edges_that_are_allowed(options):
    DedupConfig(**options).check()


def test_parse_keep():
    assert G.parse_keep("first") == ("first", None)
    assert G.parse_keep("highest:score") == ("highest", "score")
    assert G.parse_keep("lowest:a:b") == ("lowest", "a:b")
    for bad in ("first:x", "highest", "highest:", "lowest:", "last:x"):
        with pytest.raises(UsageError, match=r"^--keep must be"):
            G.parse_keep(bad)


def test_priority_ranks_by_value_then_id_then_position():
    ids = pa.chunked_array([["c", "a", "b", "a", "d"]])
    assert G.priority(ids, None, "first").tolist() == [0, 1, 2, 3, 4]
    values = pa.chunked_array([[2.0, 1.0, 2.0, float("nan"), None]])
    # highest: 2.0 (ids b < c), then 1.0, then NaN and null last (ids a < d)
    assert G.priority(ids, values, "highest").tolist() == [1, 2, 0, 3, 4]
    # lowest: 1.0, 2.0 (b, c), then NaN and null (a, d)
    assert G.priority(ids, values, "lowest").tolist() == [2, 0, 1, 3, 4]
    same = pa.chunked_array([[5, 5, 5]])
    # equal values and equal ids: by position
    assert G.priority(pa.chunked_array([["x", "x", "a"]]), same, "lowest").tolist() == [1, 2, 0]


def test_equal_key_pairs_give_every_pair_once():
    keys = np.array([3, 1, 3, 2, 3, 1])
    pairs = {tuple(sorted(p)) for i, j in G.equal_key_pairs(keys) for p in zip(i, j, strict=True)}
    assert pairs == {(0, 2), (0, 4), (2, 4), (1, 5)}
    slabs = list(G.equal_key_pairs(keys))
    assert len(slabs) == 2  # the run of three needs two gaps
    assert list(G.equal_key_pairs(np.array([1, 2, 3]))) == []


def test_components_and_edge_labels():
    assert G.components(3, np.array([], np.int64), np.array([], np.int64)).tolist() == [0, 1, 2]
    labels = G.components(5, np.array([0, 3]), np.array([1, 4]))
    assert labels[0] == labels[1] and labels[3] == labels[4] and len(set(labels)) == 3
    assert labels.dtype == np.int64
    el = G.edge_labels(5, [(np.array([0]), np.array([4])), (np.array([1]), np.array([4]))])
    assert el[0] == el[1] == el[4] and el[2] == -1 and el[3] == -1
    assert G.edge_labels(2, []).tolist() == [-1, -1]


def test_spanning_edges_link_each_node_to_its_components_first():
    i, j = G.spanning_edges(np.array([5, 2, 7]), np.array([2, 7, 3]), 8)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(3, 2), (5, 2), (7, 2)]
    i, j = G.spanning_edges(np.array([5, 2, 7, 0]), np.array([2, 7, 3, 1]), 8)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(1, 0), (3, 2), (5, 2), (7, 2)]


def test_keep_best_keeps_the_lowest_priority_of_each_group():
    labels = np.array([0, 1, 0, -1, 1, 0, 2])
    prio = np.array([5, 1, 2, 0, 3, 9, 4])
    g = G.keep_best(labels, prio)
    assert g.drop.tolist() == [True, False, False, False, True, True, False]
    assert g.groups == 2
    assert sorted(g.members.tolist()) == [0, 1, 2, 4, 5]
    assert dict(zip(g.members.tolist(), g.keepers.tolist(), strict=True)) == {
        0: 2,
        2: 2,
        5: 2,
        1: 1,
        4: 1,
    }
    assert g.keeper.tolist() == [2, 1, 2, -1, 1, 2, 6]
    empty = G.keep_best(np.array([-1, -1]), np.array([0, 1]))
    assert empty.drop.tolist() == [False, False] and empty.groups == 0
    assert empty.keeper.tolist() == [-1, -1] and len(empty.members) == 0


def test_cluster_ids_are_numbered_by_first_row():
    got = G.cluster_ids(7, np.array([6, 4, 1, 3]), np.array([4, 4, 3, 3]))
    assert got.tolist() == [-1, 0, -1, 0, 1, -1, 1]
    assert G.cluster_ids(3, np.array([], np.int64), np.array([], np.int64)).tolist() == [-1] * 3


def test_same_key_edges_link_each_row_to_the_first_with_its_code():
    i, j = G.same_key_edges(np.array([7, 3, 7, 3, 7, 1]), np.array([10, 4, 2, 8, 6, 0]))
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(2, 6), (2, 10), (4, 8)]
    i, j = G.same_key_edges(np.array([], np.int64), np.array([], np.int64))
    assert len(i) == len(j) == 0 and i.dtype == np.int64


def test_position_components():
    nodes, labels = G.position_components(np.array([40, 7]), np.array([9, 40]))
    assert nodes.tolist() == [7, 9, 40] and len(set(labels.tolist())) == 1
    nodes, labels = G.position_components(np.array([1, 5]), np.array([2, 6]))
    assert nodes.tolist() == [1, 2, 5, 6] and labels[0] == labels[1] != labels[2] == labels[3]


def test_mix64_and_buckets_are_fixed_functions():
    assert G.mix64(np.array([0], np.uint64)).tolist() == [0xE220A8397B1DCDAF]
    assert G.mix64(np.array([1], np.uint64)).tolist() == [0x910A2DEC89025CC1]
    rows = pa.table({"a": [1, 2, 3]})
    got = G.with_bucket(rows, np.array([0, 1, 0], np.uint64), 7)
    want = (
        np.array([0xE220A8397B1DCDAF, 0x910A2DEC89025CC1, 0xE220A8397B1DCDAF], np.uint64)
        % np.uint64(7)
    ).tolist()
    assert got.column(BUCKET).to_pylist() == want and got.column(BUCKET).type == pa.int64()


def test_bucket_grouped_defaults():
    m = G.BucketGrouped()
    assert m.fanout() == 1 and m.sample_rate() is None and m.fit(None) is None
    assert m.member_columns() == () and m.preset(np.array([0])) is None
    assert np.isnan(m.values(np.array([1, 2]), np.array([0, 0]))).tolist() == [True, True]
    for call in (
        lambda: m.bucket_rows(None, 2),
        lambda: m.bucket_edges(None),
        lambda: m.sample_rows(None, 0.5),
    ):
        with pytest.raises(NotImplementedError):
            call()
    m.set_groups(5, np.array([1, 3]), np.array([7, 7]))
    assert m.preset(np.array([0, 1, 3, 4])).tolist() == [-1, 7, 7, -1]
    assert m.member_keys("k", np.array([1])) is None
    m.set_members(pa.table({POSITION: [9, 2, 5], "k": ["c", "a", "b"]}))
    assert m.member_keys("k", np.array([5, 9, 2])).to_pylist() == ["b", "c", "a"]


# -- exact keys ------------------------------------------------------------------------------


def test_normalize_text_folds_case_width_punctuation_and_spacing():
    got = normalize_text(pa.array(["  A  Cat!! ", "ａ cat", "a-cat", "", "...", None, "Ünï 2"]))
    assert got.to_pylist() == ["a cat", "a cat", "a cat", None, None, None, "ünï 2"]


def test_parse_fields():
    media = pa.schema([(C.IMAGE, C.MEDIA_TYPE), (C.TEXT, pa.string())])
    assert parse_fields("auto", media) == [C.IMAGE]
    assert parse_fields("auto", pa.schema([(C.AUDIO_SHA256, pa.string())])) == [C.AUDIO]
    assert parse_fields("auto", pa.schema([(C.TEXT, pa.string())])) == [C.TEXT]
    assert parse_fields(" image + text ", media) == [C.IMAGE, C.TEXT]
    with pytest.raises(UsageError) as e:
        parse_fields("image+caption", media)
    assert str(e.value) == "--exact-key takes image, audio, text or a + of them, not 'caption'"
    with pytest.raises(DataContractError) as e:
        parse_fields("audio", media)
    assert str(e.value) == "dedup --method exact needs column audio; the input has image, text"
    with pytest.raises(DataContractError) as e:
        parse_fields("text", pa.schema([(C.TEXT, pa.int32())]))
    assert str(e.value) == "dedup --method exact needs a string text column, not int32"
    assert parse_fields("text", pa.schema([(C.TEXT, pa.large_string())])) == [C.TEXT]
    assert parse_fields("text", pa.schema([(C.TEXT, pa.null())])) == [C.TEXT]
    numbered = pa.schema([(C.IMAGE, C.MEDIA_TYPE), (C.TEXT, pa.int32())])
    assert parse_fields("image", numbered) == [C.IMAGE]  # a text column not keyed: any type


def test_exact_binds_to_the_stored_hash_when_there_is_one():
    m = Exact("image")
    assert m.bind(pa.schema([(C.IMAGE, C.MEDIA_TYPE), (C.IMAGE_SHA256, pa.string())])) == [
        C.IMAGE_SHA256
    ]
    with pytest.raises(DataContractError) as e:
        Exact("image").bind(pa.schema([(C.IMAGE, pa.binary())]))
    assert str(e.value) == "column image is binary, not the {bytes, path} media layout"


def test_exact_keys_hash_bytes_and_join_fields():
    import hashlib

    schema = pa.schema([(C.IMAGE, C.MEDIA_TYPE), (C.TEXT, pa.string())])
    batch = pa.record_batch(
        [
            pa.array([{"bytes": b"ab", "path": "p"}, {"bytes": None, "path": "q"}], C.MEDIA_TYPE),
            pa.array(["Hi!", "x"]),
        ],
        schema=schema,
    )
    m = Exact("image+text")
    assert m.bind(schema) == [C.IMAGE, C.TEXT]
    key = m.keys(batch)["_key_exact"].to_pylist()
    assert key == [hashlib.sha256(b"ab").hexdigest() + "\x1fhi", None]
    one = Exact("image")
    one.bind(schema)
    assert one.keys(batch)["_key_exact"].to_pylist() == [hashlib.sha256(b"ab").hexdigest(), None]


# -- the step --------------------------------------------------------------------------------


def table(texts, scores=None, ids=None) -> pa.Table:
    cols = {C.ID: ids or [f"r{i}" for i in range(len(texts))], C.TEXT: texts}
    if scores is not None:
        cols["score"] = scores
    return pa.table(cols)


def test_step_schema_params_and_column_info():
    plain = Dedup(DedupConfig(methods=("exact",), keep="highest:score"))
    assert plain.requires == (C.ID, "score")
    schema = table(["a"], [1.0]).schema
    assert plain.output_schema(schema) is schema
    assert plain.scan_columns == (C.ID, "score", C.TEXT)
    assert plain.params()["methods"] == ["exact"] and plain.params()["keep"] == "highest:score"
    assert plain.column_info() == {}
    marked = Dedup(DedupConfig(mark=True))
    out = marked.output_schema(schema.append(pa.field(C.IS_DUPLICATE, pa.int8())))
    assert out.names == [
        C.ID,
        C.TEXT,
        "score",
        C.DUP_CLUSTER,
        C.IS_DUPLICATE,
        C.DUP_METHOD,
        C.DUP_KEPT_ID,
        C.DUP_VALUE,
    ]
    assert [str(f.type) for f in out][3:] == ["int64", "bool", "string", "string", "double"]
    info = marked.column_info()
    assert set(info) == {C.DUP_CLUSTER, C.IS_DUPLICATE, C.DUP_METHOD, C.DUP_KEPT_ID, C.DUP_VALUE}
    assert info[C.DUP_CLUSTER]["step"] == "dedup" and info[C.DUP_CLUSTER]["methods"] == ["exact"]
    with pytest.raises(UsageError, match=r"^--keep: unknown column zz"):
        Dedup(DedupConfig(keep="lowest:zz")).output_schema(schema)
    with pytest.raises(DataContractError) as e:
        Dedup(DedupConfig(keep="lowest:m")).output_schema(
            schema.append(pa.field("m", pa.list_(pa.int8())))
        )
    assert str(e.value) == "--keep column m is list<item: int8>, which has no order"


def test_orderable_types():
    for t in (
        pa.int8(),
        pa.float32(),
        pa.string(),
        pa.large_string(),
        pa.timestamp("s"),
        pa.bool_(),
        pa.decimal128(4, 1),
        pa.date32(),
    ):
        assert _orderable(t), t
    for t in (pa.binary(), pa.list_(pa.int8()), pa.struct([("a", pa.int8())])):
        assert not _orderable(t), t


def test_mark_and_ledger_tie_each_duplicate_to_its_kept_row(tmp_path):
    texts = ["A cat", "a dog", "a cat!", None, "A DOG", "bird", "a cat"]
    scores = [1.0, 5.0, 3.0, 2.0, 5.0, 0.0, 3.0]
    src = write_dataset(tmp_path / "in", table(texts, scores), row_group=3)
    got = run_dedup(src, tmp_path / "m", DedupConfig(keep="highest:score", mark=True), batch_size=2)
    assert got.column(C.ID).to_pylist() == [f"r{i}" for i in range(7)]
    # cats: r2 and r6 tie at 3.0, r2 has the smaller id; dogs: r1 (5.0) ties r4, r1 first
    assert got.column(C.IS_DUPLICATE).to_pylist() == [True, False, False, False, True, False, True]
    assert got.column(C.DUP_KEPT_ID).to_pylist() == ["r2", None, None, None, "r1", None, "r2"]
    assert got.column(C.DUP_METHOD).to_pylist() == [
        "exact",
        None,
        None,
        None,
        "exact",
        None,
        "exact",
    ]
    assert got.column(C.DUP_CLUSTER).to_pylist() == [0, 1, 0, None, 1, None, 0]
    assert got.column(C.DUP_VALUE).to_pylist() == [None] * 7
    dropped = run_dedup(src, tmp_path / "d", DedupConfig(keep="highest:score"), batch_size=3)
    assert dropped.column(C.ID).to_pylist() == ["r1", "r2", "r3", "r5"]
    from mmtools.io.dataset import read_dropped

    ledger = read_dropped(str(tmp_path / "d"))
    assert ledger.select([C.ID, C.REJECT_STEP, C.DROP_RULE, C.DROP_KEPT_ID]).to_pylist() == [
        {"id": i, "step": "dedup", "rule": "exact", "kept_id": k}
        for i, k in [("r0", "r2"), ("r4", "r1"), ("r6", "r2")]
    ]


def test_lowest_and_first_keep_rules(tmp_path):
    texts = ["x", "y", "x", "y", "x"]
    src = write_dataset(tmp_path / "in", table(texts, [3, 1, 2, 1, 2]))
    low = run_dedup(src, tmp_path / "l", DedupConfig(keep="lowest:score"))
    assert low.column(C.ID).to_pylist() == ["r1", "r2"]
    first = run_dedup(src, tmp_path / "f", DedupConfig())
    assert first.column(C.ID).to_pylist() == ["r0", "r1"]


def test_a_second_method_sees_only_the_rows_the_first_kept(tmp_path):
    texts = [
        "a red car parked on the old road today",
        "a red car parked on the old road today",
        "a red car parked on the old road",
        "blue sky",
        "blue sky",
    ]
    src = write_dataset(tmp_path / "in", table(texts))
    cfg = DedupConfig(methods=("exact", "minhash"), threshold=0.5, mark=True)
    got = run_dedup(src, tmp_path / "o", cfg)
    assert got.column(C.DUP_METHOD).to_pylist() == [None, "exact", "minhash", None, "exact"]
    assert got.column(C.DUP_KEPT_ID).to_pylist() == [None, "r0", "r0", None, "r3"]
    assert got.column(C.DUP_CLUSTER).to_pylist() == [0, 0, 0, 1, 1]
    step = Dedup(DedupConfig(methods=("exact", "minhash"), threshold=0.5))
    step.output_schema(table(texts).schema)
    for b in table(texts).to_batches():
        step.scan(step.keys(b))
    step.finish_scan()
    assert step.stats == {
        "exact": {"clusters": 2, "duplicates": 2},
        "minhash": {"clusters": 1, "duplicates": 1},
    }
    res = step.process(table(texts).to_batches()[0])
    assert res.dropped == {"exact": 2, "minhash": 1}
    assert res.batch.column(C.ID).to_pylist() == ["r0", "r3"]
    assert res.ledger_counts() == {"exact": 2, "minhash": 1}
    step.ledger = False
    step.seek(0)
    assert step.process(table(texts).to_batches()[0]).drops is None


def test_rows_without_a_key_are_rejected_with_the_reason(tmp_path):
    emb = pa.FixedSizeListArray.from_arrays(
        pa.array([1, 0, 1, 0, float("nan"), 0, 0, 0], pa.float32()), 2
    )
    t = pa.table({C.ID: ["a", "b", "c", "d"], C.IMAGE_EMBEDDING: emb})
    t = t.set_column(
        1,
        C.IMAGE_EMBEDDING,
        pa.array([[1.0, 0.0], [1.0, 0.0], None, [0.0, 0.0]], pa.list_(pa.float32(), 2)),
    )
    step = Dedup(DedupConfig(methods=("semantic",), eps=0.01, clusters=1))
    step.output_schema(t.schema)
    for b in t.to_batches():
        step.scan(step.keys(b))
    step.finish_scan()
    res = step.process(t.to_batches()[0])
    assert res.batch.column(C.ID).to_pylist() == ["a"]
    assert res.dropped == {"semantic": 1}
    rej = res.rejects.to_pylist()
    assert [(r["id"], r["step"], r["reason"]) for r in rej] == [
        ("c", "dedup", "invalid_embedding"),
        ("d", "dedup", "invalid_embedding"),
    ]
    assert all(r["detail"].startswith("image_embedding: ") for r in rej)
    res.check(4, "dedup", ledger=True)


def scanned(texts, batch_rows=3, **cfg):
    t = table(texts)
    step = Dedup(DedupConfig(**cfg))
    step.output_schema(t.schema)
    for b in t.to_batches(max_chunksize=batch_rows):
        step.scan(step.keys(b))
    step.finish_scan()
    return step, t


def test_pass_two_finds_where_a_resumed_run_starts_and_refuses_a_changed_input():
    step, t = scanned(["a", "b", "a", "c", "b", "d"])
    later = t.slice(3).to_batches()[0]
    res = step.process(later)  # no seek: found by its ids
    assert res.batch.column(C.ID).to_pylist() == ["r3", "r5"] and res.dropped == {"exact": 1}
    step, t = scanned(["a", "b", "a"])
    one = step.process(t.slice(2, 1).to_batches()[0])  # a single row, found by its id too
    assert one.batch.num_rows == 0 and one.dropped == {"exact": 1}
    step, t = scanned(["a", "b", "a", "c", "b", "d"])
    step.seek(2)
    assert step.process(t.slice(2, 2).to_batches()[0]).batch.column(C.ID).to_pylist() == ["r3"]
    assert step.process(t.slice(4).to_batches()[0]).batch.column(C.ID).to_pylist() == ["r5"]
    step, t = scanned(["a", "b", "a"])
    with pytest.raises(DataContractError) as e:
        step.process(table(["a", "b"], ids=["r0", "zz"]).to_batches()[0])
    assert str(e.value) == "the input changed between dedup's two passes; rerun dedup"
    step, t = scanned(["a", "b", "a"])
    step.seek(2)
    with pytest.raises(DataContractError):
        step.process(t.slice(1).to_batches()[0])  # runs past the end
    step, t = scanned(["a", "b", "a"])
    empty = step.process(
        t.slice(0, 0).to_batches()[0]
        if t.slice(0, 0).to_batches()
        else pa.RecordBatch.from_pylist([], schema=t.schema)
    )
    assert empty.batch.num_rows == 0


def test_repeated_ids_resume_at_the_first_matching_place():
    import logging

    t = table(["o", "p", "q", "p", "q"], ids=["w", "x", "y", "x", "y"])

    def step():
        s = Dedup(DedupConfig(mark=True))
        s.output_schema(t.schema)
        s.scan(s.keys(t.to_batches()[0]))
        s.finish_scan()
        return s

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("mmtools")
    level = logger.level  # a command run earlier in this process may have set it
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        res = step().process(t.slice(3, 2).to_batches()[0])
        assert seen == ["dedup: resumed at one of 2 places with the same ids; took the first"]
        single = step().process(t.slice(1, 3).to_batches()[0])  # one place only: no warning
        assert len(seen) == 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    # ids x, y first appear at position 1: rows kept there
    assert res.batch.column(C.IS_DUPLICATE).to_pylist() == [False, False]
    placed = step()
    placed.seek(3)
    got = placed.process(t.slice(3, 2).to_batches()[0])
    assert got.batch.column(C.IS_DUPLICATE).to_pylist() == [True, True]
    assert got.batch.column(C.DUP_KEPT_ID).to_pylist() == ["x", "y"]
    assert single.batch.column(C.IS_DUPLICATE).to_pylist() == [False, False, True]
