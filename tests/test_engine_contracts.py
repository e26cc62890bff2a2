"""The engine's declared contracts: inputs and outputs implement the protocols, steps pickle
one way, and both executors implement the executor protocol."""

from __future__ import annotations

import inspect
import io
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_image_folder

from mmtools import columns as C
from mmtools import engines
from mmtools.engines import Executor
from mmtools.engines.local import LocalExecutor
from mmtools.io import protocols
from mmtools.io.dataset import DatasetSink
from mmtools.io.source import Source
from mmtools.io.stdout import StreamSink
from mmtools.step import Result, Step, reject_batch


def test_inputs_and_outputs_implement_the_protocols(tmp_path):
    from mmtools.steps.ingest.listing import ListingOptions
    from mmtools.steps.ingest.step import ListingSource

    pq.write_table(pa.table({C.ID: ["a", "b"]}), tmp_path / "in.parquet")
    listing = ListingSource([str(make_image_folder(tmp_path / "imgs", 2))], ListingOptions())
    for source in (Source([str(tmp_path / "in.parquet")]), listing):
        assert isinstance(source, protocols.Source)
    for sink in (DatasetSink(str(tmp_path / "out")), StreamSink(io.BytesIO())):
        assert isinstance(sink, protocols.Sink)


def test_both_executors_implement_the_executor_protocol():
    from mmtools.engines.ray.executor import RayExecutor

    wanted = {"setup", "scan", "results", "close"}
    assert wanted <= {n for n in dir(Executor) if not n.startswith("_")}
    for executor in (LocalExecutor, RayExecutor):
        for name in wanted:
            params = inspect.signature(getattr(executor, name)).parameters
            assert list(params) == list(inspect.signature(getattr(Executor, name)).parameters)


def test_a_step_pickles_without_its_transient_resources():
    from mmtools.steps.mixup import Mixup, MixupConfig

    step = Mixup(MixupConfig(seed=1))
    step.setup()
    try:
        copy = pickle.loads(pickle.dumps(step))
    finally:
        step.close()
    assert copy._pool is None and copy._spool is None
    assert copy.config == step.config


# -- the row accounting every result is checked against ----------------------------------------


def _rows(n: int, prefix: str = "r") -> pa.RecordBatch:
    return pa.record_batch([pa.array([f"{prefix}{i}" for i in range(n)])], names=[C.ID])


def _result(out: int, generated: int = 0, rejected: int = 0, dropped: dict | None = None):
    """`out` rows, `generated` of them new, `rejected` reject rows, `dropped` counts."""
    ids = [f"x{i}" for i in range(rejected)]
    rejects = reject_batch("t", ids, ["corrupt"] * rejected, [""] * rejected) if rejected else None
    return Result(_rows(out), rejects, dict(dropped or {}), generated)


@pytest.mark.parametrize(
    "result",
    [
        _result(5),
        _result(3, dropped={"a": 2}),
        _result(3, rejected=2),
        _result(7, generated=2),
        _result(6, generated=3, rejected=1, dropped={"a": 1}),
    ],
)
def test_result_check_passes_accounting_that_adds_up(result):
    result.check(5, "t")


@pytest.mark.parametrize(
    "result",
    [
        _result(6),  # a row from nowhere
        _result(4),  # a row missing
        _result(7, generated=3),
        _result(7, generated=1),
        _result(3, rejected=3),
        _result(3, rejected=1),
        _result(3, dropped={"a": 1, "b": 2}),
        _result(3, dropped={"a": 1}),
    ],
    ids=[
        "extra-row",
        "missing-row",
        "generated-too-many",
        "generated-too-few",
        "rejected-too-many",
        "rejected-too-few",
        "dropped-too-many",
        "dropped-too-few",
    ],
)
def test_result_check_refuses_accounting_that_does_not_add_up(result):
    with pytest.raises(AssertionError, match=r"^t: row accounting broken: 5 in"):
        result.check(5, "t")


class Miscounting(Step):
    """Results that do not add up: `how` is "extra" (a row from nowhere), "lost" (a row
    vanishes), "dropped" (a dropped count with no row gone) or "generated" (one new row
    counted as two)."""

    name = "miscounting"

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def process(self, batch: pa.RecordBatch) -> Result:
        """The batch, miscounted."""
        if self.how == "lost":
            return Result(batch.slice(1))
        if self.how == "dropped":
            return Result(batch, dropped={self.name: 1})
        more = pa.concat_batches([batch, _rows(1, "new")])
        return Result(more, generated=0 if self.how == "extra" else 2)


@pytest.mark.parametrize("how", ["extra", "lost", "dropped", "generated"])
def test_a_step_that_breaks_the_accounting_fails_the_run_and_commits_nothing(tmp_path, how):
    pq.write_table(pa.table({C.ID: [f"r{i:02d}" for i in range(20)]}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    with pytest.raises(AssertionError, match="miscounting: row accounting broken"):
        engines.run(
            "broken",
            Source([str(tmp_path / "in.parquet")]),
            [Miscounting(how)],
            DatasetSink(str(out)),
            batch_size=8,
            quiet=True,
        )
    assert not (out / "_manifest.json").exists()
