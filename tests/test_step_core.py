"""The step contract in this process: results, their accounting, reject and ledger rows."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest

from mmtools import columns as C
from mmtools.errors import DataContractError
from mmtools.step import (
    GlobalStep,
    Result,
    Step,
    add_counts,
    concat_rows,
    ledger_rows,
    reject_batch,
    rejects_at,
    sources_of,
)


def rows(ids: list[str], sources: list[str | None] | None = None) -> pa.RecordBatch:
    """A batch of `ids` (and their `source`, when given)."""
    cols = {C.ID: pa.array(ids, pa.string())}
    if sources is not None:
        cols[C.SOURCE] = pa.array(sources, pa.string())
    return pa.RecordBatch.from_pydict(cols)


def ledger(ids: list[str], rule: str = "r", step: str = "s") -> pa.RecordBatch:
    return ledger_rows(step, rows(ids), [True] * len(ids), rule)


def test_add_counts_adds_non_zero_counters_only():
    total = {"a": 2}
    add_counts(total, {"a": 3, "b": 1, "c": 0})
    assert total == {"a": 5, "b": 1}


def test_reject_batch_holds_each_row_with_its_step_reason_detail_and_source():
    got = reject_batch("ingest", ["a", "b"], ["decode", "http"], ["bad jpeg", "404"], ["u1", None])
    assert got.schema.equals(C.REJECT_SCHEMA)
    assert got.to_pylist() == [
        {"id": "a", "step": "ingest", "reason": "decode", "detail": "bad jpeg", "source": "u1"},
        {"id": "b", "step": "ingest", "reason": "http", "detail": "404", "source": None},
    ]
    plain = reject_batch("x", iter(["c"]), iter(["r"]), iter(["d"]))
    assert plain.to_pylist() == [
        {"id": "c", "step": "x", "reason": "r", "detail": "d", "source": None}
    ]


def test_rejects_at_takes_ids_sources_and_reasons_of_the_given_positions():
    batch = rows(["a", "b", "c", "d"], ["s0", "s1", None, "s3"])
    got = rejects_at("dedup", batch, [1, 3], {1: ("r1", "d1"), 3: ("r3", "d3")})
    assert got.to_pylist() == [
        {"id": "b", "step": "dedup", "reason": "r1", "detail": "d1", "source": "s1"},
        {"id": "d", "step": "dedup", "reason": "r3", "detail": "d3", "source": "s3"},
    ]
    listed = rejects_at("t", rows(["a", "b"]), np.array([0]), [("why", "how"), ("no", "no")])
    assert listed.to_pylist() == [
        {"id": "a", "step": "t", "reason": "why", "detail": "how", "source": None}
    ]


def test_sources_of_positions_or_none_without_a_source_column():
    assert sources_of(rows(["a", "b", "c"], ["x", None, "z"]), [2, 0]) == ["z", "x"]
    assert sources_of(rows(["a"]), [0]) is None


def test_ledger_rows_name_the_dropped_rows_rule_value_and_kept_row():
    batch = rows(["a", "b", "c"], ["sa", "sb", "sc"])
    got = ledger_rows(
        "dedup",
        batch,
        pa.array([False, True, True]),
        "phash",
        np.array([1.0, 2.5, np.nan]),
        pa.array(["k0", "a", "a"]),
    )
    assert got.schema.equals(C.LEDGER_SCHEMA)
    assert got.to_pylist() == [
        {"id": "b", "step": "dedup", "rule": "phash", "value": 2.5, "kept_id": "a", "source": "sb"},
        {
            "id": "c",
            "step": "dedup",
            "rule": "phash",
            "value": None,
            "kept_id": "a",
            "source": "sc",
        },
    ]


def test_ledger_rows_take_a_list_mask_arrow_values_and_give_nulls_where_none():
    batch = rows(["a", "b", "c"])
    got = ledger_rows("f", batch, [True, False, True], "min", pa.array([0.5, 1.0, float("nan")]))
    assert got.to_pylist() == [
        {"id": "a", "step": "f", "rule": "min", "value": 0.5, "kept_id": None, "source": None},
        {"id": "c", "step": "f", "rule": "min", "value": None, "kept_id": None, "source": None},
    ]
    ints = ledger_rows("f", batch, [False, True, False], "min", pa.array([1, 7, 3]))
    assert ints.column(C.DROP_VALUE).to_pylist() == [7.0]
    assert ledger_rows("f", batch, [False, False, False], "min") is None


def test_concat_rows_skips_none_and_empty_parts():
    a, b = rows(["a"]), rows(["b", "c"])
    empty = rows([])
    assert concat_rows() is None
    assert concat_rows(None, empty) is None
    assert concat_rows(None, a, empty) is a
    assert concat_rows(a, None, b).column(C.ID).to_pylist() == ["a", "b", "c"]


def test_result_counts_its_rejects_and_ledger_rows():
    res = Result(rows(["a"]))
    assert (res.rejected, res.ledger_rows, res.ledger_counts()) == (0, 0, {})
    res = Result(
        rows([]),
        reject_batch("s", ["x", "y"], ["r", "r"], ["", ""]),
        {"f": 3},
        drops=concat_rows(ledger(["p", "q"], "f"), ledger(["z"], "g")),
    )
    assert (res.rejected, res.ledger_rows) == (2, 3)
    assert res.ledger_counts() == {"f": 2, "g": 1}


def test_result_check_says_what_broke_the_accounting():
    res = Result(rows(["a", "b", "c"]), reject_batch("s", ["x"], ["r"], [""]), {"f": 1}, 1)
    res.check(4, "s")  # 3 out - 1 generated + 1 rejected + 1 dropped
    with pytest.raises(AssertionError) as e:
        res.check(5, "s")
    assert str(e.value) == (
        "s: row accounting broken: 5 in, 3 out (1 generated), 1 rejected, {'f': 1} dropped"
    )


def test_result_check_holds_the_ledger_to_the_dropped_counts():
    good = Result(rows([]), dropped={"f": 2, "g": 0}, drops=ledger(["a", "b"], "f"))
    good.check(2, "s", ledger=True)
    short = Result(rows([]), dropped={"f": 2}, drops=ledger(["a"], "f"))
    short.check(2, "s")  # without the ledger only the counts are checked
    with pytest.raises(AssertionError) as e:
        short.check(2, "s", ledger=True)
    assert str(e.value) == "s: drop ledger broken: {'f': 2} dropped, ledger rows by rule {'f': 1}"
    Result(rows(["a"])).check(1, "s", ledger=True)


def test_then_merges_two_results_as_one_step_would_make_them():
    first = Result(
        rows(["a", "b"]),
        reject_batch("s1", ["x"], ["r1"], [""]),
        {"f": 1, "g": 2},
        1,
        {"n": 1},
        ledger(["p"], "f"),
    )
    second = Result(
        rows(["b"]),
        reject_batch("s2", ["a"], ["r2"], [""]),
        {"g": 1, "h": 4},
        2,
        {"n": 2, "m": 5},
        ledger(["q"], "g"),
    )
    got = first.then(second)
    assert got.batch.column(C.ID).to_pylist() == ["b"]
    assert got.rejects.column(C.ID).to_pylist() == ["x", "a"]
    assert got.dropped == {"f": 1, "g": 3, "h": 4}
    assert got.generated == 3
    assert got.notes == {"n": 3, "m": 5}
    assert got.drops.column(C.ID).to_pylist() == ["p", "q"]
    assert first.dropped == {"f": 1, "g": 2} and first.notes == {"n": 1}  # unchanged


@dataclass
class Cfg:
    by: str = "score"
    n: int = 3


class Upper(Step):
    """A step that upper-cases ids and drops ids starting with x."""

    name = "upper"
    requires = (C.ID,)
    transient = ("model",)

    def setup(self):
        self.model = object()

    def process(self, batch):
        ids = batch.column(C.ID).to_pylist()
        keep = [not i.startswith("x") for i in ids]
        out = rows([i.upper() for i, k in zip(ids, keep, strict=True) if k])
        return Result(out, dropped={"x": keep.count(False)})


def test_step_defaults_params_schema_run_and_pickling():
    step = Upper(Cfg())
    assert step.params() == {"by": "score", "n": 3}
    assert Upper({"a": 1}).params() == {}
    schema = pa.schema([(C.ID, pa.string()), ("y", pa.int64())])
    assert step.output_schema(schema) is schema
    with pytest.raises(DataContractError, match=r"^upper needs column"):
        step.output_schema(pa.schema([("y", pa.int64())]))
    out = list(step.run([rows(["a", "xb"]), rows(["c"])]))
    assert [r.batch.column(C.ID).to_pylist() for r in out] == [["A"], ["C"]]
    assert [r.dropped for r in out] == [{"x": 1}, {"x": 0}]
    assert step.column_info() == {}
    step.setup()
    step.progress = print
    state = step.__getstate__()
    assert state["model"] is None and state["progress"] is None and state["config"] == Cfg()
    assert step.model is not None and step.progress is print  # the step itself keeps them
    copy = pickle.loads(pickle.dumps(step))
    assert copy.model is None and copy.config == Cfg()
    with pytest.raises(NotImplementedError):
        Step().process(rows(["a"]))


def test_drop_rows_follows_the_ledger_switch():
    step = Upper()
    batch = rows(["a", "b"])
    got = step.drop_rows(batch, [False, True], "x", [1.0, 2.0], pa.array(["k", "a"]))
    assert got.to_pylist() == [
        {"id": "b", "step": "upper", "rule": "x", "value": 2.0, "kept_id": "a", "source": None}
    ]
    step.ledger = False
    assert step.drop_rows(batch, [True, True], "x") is None


def test_advance_reports_rows_to_the_progress_callback():
    step, seen = Upper(), []
    step.advance()  # no callback: nothing happens
    step.progress = seen.append
    step.advance()
    step.advance(5)
    assert seen == [1, 5]


def test_global_step_defaults():
    step = GlobalStep()
    batch = rows(["a"])
    assert step.keys(batch) is batch
    assert step.sort_order() is None
    assert step.bucketed() is None
    assert step.gather_columns() is None
    assert step.gather([batch]) is None
    assert step.seek(3) is None
    step.finish_scan()
    for call in (lambda: step.scan(batch), lambda: step.wanted(3), lambda: step.set_cut(3, None)):
        with pytest.raises(NotImplementedError):
            call()


def test_no_positions_give_no_reject_rows():
    batch = rows(["a", "b"], ["s0", "s1"])
    assert sources_of(batch, []) == []
    empty = rejects_at("score", batch, [], {})
    assert empty.num_rows == 0 and empty.schema.equals(C.REJECT_SCHEMA)
    assert rejects_at("score", batch, np.flatnonzero([False, False]), {}).num_rows == 0


def test_ledger_values_of_any_number_type_are_floats():
    batch = rows(["a", "b"])
    for value in ([1, 7], np.array([1, 7], np.int32), np.array([1, 7], np.float32)):
        got = ledger_rows("f", batch, [False, True], "min", value)
        assert got.schema.equals(C.LEDGER_SCHEMA) and got.column(C.DROP_VALUE).to_pylist() == [7.0]
