"""`TopFraction` in this process: the cut, ties by id, nulls last, the distributed-sort hooks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import read_dataset, write_shards

from mmtools import columns as C
from mmtools.errors import DataContractError, UsageError
from mmtools.io.dataset import DatasetSink, read_dropped
from mmtools.steps.filter.rank import KEY, TopFraction, TopFractionConfig

IDS = ["e", "b", "a", "d", "c", "f", "g", "h"]
SCORES = [0.5, 0.9, 0.5, None, 0.5, float("nan"), float("inf"), 0.1]


def batch(ids=IDS, scores=SCORES, typ=pa.float64()) -> pa.RecordBatch:
    return pa.record_batch({C.ID: pa.array(ids, pa.string()), "s": pa.array(scores, typ)})


def kept(step: TopFraction, b: pa.RecordBatch | None = None) -> list[str]:
    b = b if b is not None else batch()
    return [i for i, k in zip(b.column(C.ID).to_pylist(), step.keep(b), strict=True) if k]


def scanned(step: TopFraction, parts=((0, 3), (3, 8))) -> TopFraction:
    b = batch()
    for lo, hi in parts:
        step.scan(step.keys(b.slice(lo, hi - lo)))
    step.finish_scan()
    return step


@pytest.mark.parametrize(
    "k, want",
    [
        (0, []),
        (1, ["b"]),
        (2, ["b", "a"]),  # 0.5 ties: the smallest id first
        (3, ["b", "a", "c"]),
        (4, ["e", "b", "a", "c"]),
        (5, ["e", "b", "a", "c", "h"]),
        (6, ["e", "b", "a", "d", "c", "h"]),  # null, NaN and inf rank last, by id
        (7, ["e", "b", "a", "d", "c", "f", "h"]),
        (8, IDS),
        (20, IDS),
    ],
)
def test_cut_keeps_the_k_best_with_ties_to_the_smaller_id(k, want):
    step = scanned(TopFraction(TopFractionConfig("s", k=k)))
    assert kept(step) == want


def test_cut_from_a_distributed_sort_equals_the_scan():
    for k in range(0, 9):
        local = scanned(TopFraction(TopFractionConfig("s", k=k)))
        keys = pa.Table.from_batches([TopFraction(TopFractionConfig("s")).keys(batch())])
        order = keys.sort_by(TopFraction(TopFractionConfig("s")).sort_order())
        dist = TopFraction(TopFractionConfig("s", k=k))
        last = order.slice(k - 1, 1).to_pylist()[0] if 0 < k < 8 else None
        dist.set_cut(8, last)
        assert kept(dist) == kept(local), k
    assert TopFraction(TopFractionConfig("s")).sort_order() == [
        (KEY, "descending"),
        (C.ID, "ascending"),
    ]


def test_keys_rank_null_nan_and_inf_lowest():
    got = TopFraction(TopFractionConfig("s")).keys(batch())
    assert got.schema.names == [C.ID, KEY]
    assert got.column(KEY).to_pylist() == [0.5, 0.9, 0.5, -np.inf, 0.5, -np.inf, -np.inf, 0.1]
    ints = TopFraction(TopFractionConfig("s")).keys(batch(["a", "b"], [3, None], pa.int32()))
    assert ints.column(KEY).to_pylist() == [3.0, -np.inf]


@pytest.mark.parametrize(
    "fraction, n, k", [(0.3, 10, 3), (0.29, 100, 29), (0.5, 7, 3), (1.0, 5, 5), (0.0, 5, 0)]
)
def test_wanted_is_the_floor_of_the_exact_share(fraction, n, k):
    assert TopFraction(TopFractionConfig("s", fraction=fraction)).wanted(n) == k
    assert TopFraction(TopFractionConfig("s", k=4)).wanted(3) == 3
    assert TopFraction(TopFractionConfig("s", k=4)).wanted(10) == 4


def test_all_or_none_and_keep_before_the_scan():
    step = TopFraction(TopFractionConfig("s", k=3))
    with pytest.raises(RuntimeError, match=r"^TopFraction.keep\(\) before finish_scan\(\)$"):
        step.keep(batch())
    step.finish_scan()  # no rows at all
    assert kept(step) == []
    step = TopFraction(TopFractionConfig("s", k=3))
    step.set_cut(3, None)
    assert kept(step) == IDS
    step.set_cut(8, None)
    step.config.k = 0
    step.set_cut(8, None)
    assert kept(step) == []


def test_output_schema_needs_a_numeric_column_and_ids():
    step = TopFraction(TopFractionConfig("s", k=1))
    schema = batch().schema
    assert step.output_schema(schema) is schema
    assert step.requires == (C.ID, "s") and step.scan_columns == (C.ID, "s")
    with pytest.raises(UsageError) as e:
        TopFraction(TopFractionConfig("z", k=1)).output_schema(schema)
    assert str(e.value) == "--by z: unknown column; the input has id, s"
    with pytest.raises(UsageError) as e:
        TopFraction(TopFractionConfig(C.ID, k=1)).output_schema(schema)
    assert str(e.value) == "--by id must be a numeric column, not string"
    with pytest.raises(DataContractError, match=r"^top_fraction needs column\(s\) id;"):
        step.output_schema(pa.schema([("s", pa.int8())]))


def test_process_drops_the_rest_with_their_keys_in_the_ledger():
    step = scanned(TopFraction(TopFractionConfig("s", k=3)))
    res = step.process(batch())
    assert res.batch.column(C.ID).to_pylist() == ["b", "a", "c"]
    assert res.dropped == {"top_fraction": 5}
    assert res.drops.to_pylist() == [
        {
            "id": i,
            "step": "top_fraction",
            "rule": "top_fraction",
            "value": v,
            "kept_id": None,
            "source": None,
        }
        for i, v in [("e", 0.5), ("d", None), ("f", None), ("g", None), ("h", 0.1)]
    ]
    step.ledger = False
    assert step.process(batch()).drops is None
    assert step.measure(batch(), ledger=False) is None


def test_top_fraction_run_in_process(tmp_path):
    from mmtools import engines as engine
    from mmtools.io.source import Source

    n = 30
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, n).astype(float)
    scores[[4, 9]] = np.nan
    t = pa.table({C.ID: [f"r{i:02d}" for i in range(n)], "s": scores})
    src = write_shards(tmp_path / "in", t, shards=3, row_group=4)
    step = TopFraction(TopFractionConfig("s", fraction=0.4))
    summary, _ = engine.run(
        "filter",
        Source([str(src)]),
        [step],
        DatasetSink(str(tmp_path / "o")),
        batch_size=5,
        quiet=True,
    )
    order = sorted(range(n), key=lambda i: (-np.nan_to_num(scores[i], nan=-np.inf), i))
    want = sorted(f"r{i:02d}" for i in order[:12])
    assert sorted(read_dataset(tmp_path / "o").column(C.ID).to_pylist()) == want
    assert summary.dropped == {"top_fraction": 18}
    assert read_dropped(str(tmp_path / "o")).num_rows == 18
