"""Row accounting for random shard layouts, batch sizes, shard sizes and step options.

Every input row comes out, is rejected with a reason, or is dropped by a named rule:
in = out - generated + rejected + dropped, in each run's summary and in its manifest. A run
that crashes after a random batch and is run again writes the rows of an uninterrupted run.
These run the engine in-process, many times, on small inputs.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from harness import rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmtools import columns as C
from mmtools import engines as engine
from mmtools.io.dataset import DatasetSink
from mmtools.io.source import Source
from mmtools.steps.dedup.step import Dedup, DedupConfig
from mmtools.steps.filter.step import FilterConfig, make_filter
from mmtools.steps.mixup import Mixup, MixupConfig

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
DIM = 4


def _shards(root: Path, layout: list[int], seed: int) -> int:
    """Write shards of `layout[i]` rows (ids unique, texts repeating, some NaN vectors)."""
    rng = np.random.default_rng(seed)
    n = 0
    for k, size in enumerate(layout):
        vec = rng.normal(size=(size, DIM)).astype(np.float32)
        vec[rng.random(size) < 0.15] = np.nan
        table = pa.table(
            {
                C.ID: pa.array([f"r{n + i:04d}" for i in range(size)], pa.string()),
                C.TEXT: pa.array([f"text {int(t)}" for t in rng.integers(0, 8, size)], pa.string()),
                C.WIDTH: pa.array(rng.integers(1, 50, size), pa.int32()),
                C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(
                    pa.array(vec.reshape(-1)), type=C.embedding_type(DIM, "float32")
                ),
            }
        )
        pq.write_table(table, root / f"part-{k:05d}.parquet")
        n += size
    return n


def _step(kind: str, option: float):
    if kind == "where":
        return make_filter(FilterConfig(where=f"width % {2 + int(option * 5)} <> 0"))
    if kind == "top":
        return make_filter(FilterConfig(by=C.WIDTH, top_fraction=option))
    if kind == "dedup":
        return Dedup(DedupConfig(methods=("exact",), exact_key="text", mark=option > 0.5))
    config = MixupConfig(mode="embedding", lam=0.5, fraction=option, keep_originals=option > 0.3)
    return Mixup(config, workers=1)


def _run(src: Path, out: Path, kind: str, option: float, batch: int, shard_rows: int, crash=None):
    sink = DatasetSink(str(out), shard_rows=shard_rows)
    if crash is not None:
        sink = _Crashing(sink, crash)
    return engine.run(
        "test", Source([str(src)]), [_step(kind, option)], sink, batch_size=batch, quiet=True
    )


class _Crash(Exception):
    pass


class _Crashing:
    """A sink that dies after `after` writes as a killed process would: nothing cleaned up."""

    def __init__(self, sink: DatasetSink, after: int):
        self.sink, self.after = sink, after

    def __getattr__(self, name):
        return getattr(self.sink, name)

    def write(self, *args, **kwargs):
        if self.after == 0:
            raise _Crash
        self.after -= 1
        self.sink.write(*args, **kwargs)

    def abort(self):
        self.sink._lock.release()  # the kernel drops a dead process's lock; nothing else


LAYOUT = st.lists(st.integers(0, 30), min_size=1, max_size=5)


@SETTINGS
@given(
    layout=LAYOUT,
    batch=st.integers(1, 17),
    shard_rows=st.integers(1, 40),
    kind=st.sampled_from(["where", "top", "dedup", "mixup"]),
    option=st.floats(0.0, 1.0, exclude_min=True),  # fractions live in (0, 1]
    seed=st.integers(0, 3),
)
def test_every_row_is_out_rejected_or_dropped(layout, batch, shard_rows, kind, option, seed):
    root = Path(tempfile.mkdtemp(prefix="mmtools-prop-"))
    try:
        (root / "in").mkdir()
        n = _shards(root / "in", layout, seed)
        summary, manifest = _run(root / "in", root / "out", kind, option, batch, shard_rows)
        dropped = sum(manifest["dropped"].values())
        assert manifest["rows"] - manifest["generated"] + manifest["rejects"]["rows"] + dropped == n
        assert summary.rows_in == n and summary.rows_out == manifest["rows"]
        assert (
            summary.rejected == manifest["rejects"]["rows"]
            and summary.dropped == manifest["dropped"]
        )
        on_disk = [pq.read_metadata(root / "out" / s["name"]).num_rows for s in manifest["shards"]]
        assert sum(on_disk) == manifest["rows"] == sum(rows(root / "out").values())
    finally:
        shutil.rmtree(root)


@SETTINGS
@given(
    layout=LAYOUT,
    batch=st.integers(1, 17),
    shard_rows=st.integers(1, 40),
    kind=st.sampled_from(["dedup", "mixup"]),
    option=st.floats(0.0, 1.0, exclude_min=True),  # fractions live in (0, 1]
    crash=st.integers(0, 12),
    seed=st.integers(0, 3),
)
def test_a_crash_and_a_rerun_write_the_uninterrupted_rows(
    layout, batch, shard_rows, kind, option, crash, seed
):
    root = Path(tempfile.mkdtemp(prefix="mmtools-prop-"))
    try:
        (root / "in").mkdir()
        _shards(root / "in", layout, seed)
        _run(root / "in", root / "ref", kind, option, batch, shard_rows)
        try:
            _run(root / "in", root / "out", kind, option, batch, shard_rows, crash=crash)
        except _Crash:
            assert not (root / "out" / "_manifest.json").exists()
        _run(root / "in", root / "out", kind, option, batch, shard_rows)
        assert rows(root / "out") == rows(root / "ref")
        assert not list((root / "out").rglob(".tmp-*"))
    finally:
        shutil.rmtree(root)
