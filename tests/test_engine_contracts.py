"""The engine's declared contracts: inputs and outputs implement the protocols, steps pickle
one way, and both executors implement the executor protocol."""

from __future__ import annotations

import inspect
import io
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import make_image_folder

from mmtools import columns as C
from mmtools.engines import Executor
from mmtools.engines.local import LocalExecutor
from mmtools.io import protocols
from mmtools.io.dataset import DatasetSink
from mmtools.io.source import Source
from mmtools.io.stdout import StreamSink


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
