"""The Ray engine: the local engine's input, output, manifest and resume; Ray Data computes.

The driver keeps the source (resume offset) and the sink (shards, rejects, manifest, lock)
exactly as `mmtools.engines.local` does. Each input batch travels through Ray as one *envelope*
row: the batch as Arrow IPC bytes, the reject rows so far, the dropped and generated counts
and its input offset. Every step is one `map_batches` stage over envelopes: Ray tasks for a
plain step, an actor pool for a step that loads something in `setup()` (a model), so the
model loads once per actor. The driver takes the envelopes back in input order
(`preserve_order`) and hands them to the local engine's own write loop, which checks the row
accounting and writes rows, rejects and progress records.

Parquet inputs are read by Ray tasks, one per input shard, batched as the local engine
batches them, one envelope per block so that a shard's batches spread over the workers;
other inputs (a stdin stream, an ingest listing) are read by the driver into Ray's object
store first. A global step's first pass computes its keys on the workers (`keys`); the step
decides with Ray Data's own sort or groupby where it can (`finish_on_ray`), else the driver
scans the keys in input order. Its second pass runs on the workers, which receive the step
with its decision.

A step that raises on a batch is run again on it (Ray Data's `max_map_retries`); a worker
process that dies has its task re-run elsewhere, or its actor restarted and the batch re-run,
a bounded number of times (then: exit 4, rerun resumes). An mmtools error (bad option, data
contract) is not retried: the driver raises it as the local engine would.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa

from mmtools.engines import local as engine
from mmtools.engines.ray.cluster import ENV_ADDRESS, RETRIES, RayOptions, connect
from mmtools.engines.ray.envelope import Envelope, pack, unpack, wrap
from mmtools.errors import MmtoolsError, PartialError, TemporaryError, require_module
from mmtools.io.fs import is_remote
from mmtools.step import POSITION, GlobalStep, Result, Step

__all__ = ["ENV_ADDRESS", "RETRIES", "RayOptions", "portable", "run"]

log = logging.getLogger("mmtools")
# Below this many rows a global step's keys are decided on the driver: the same result as
# Ray Data's sort or groupby without their fixed cost (seconds of shuffle on a small input).
SHUFFLE_MIN_ROWS = 100_000
_PICKLES = (np.ndarray, pa.Array, pa.ChunkedArray, pa.Table, pa.RecordBatch, str, bytes, int)


# -- what runs on the workers -------------------------------------------------------------


def _process(fn: _StepFn, table: pa.Table) -> pa.Table:
    """Run the step over the envelopes of `table`; an mmtools error is sent back, not raised."""
    step, envelopes = fn.step, unpack(table)
    live = [e for e in envelopes if e.error is None]
    batches = [e.batch() for e in live]
    try:
        if not fn.ready:  # once per task or actor: a model loads once per actor
            step.setup()
            fn.ready = True
        if fn.seek:  # a global step's pass 2: tell it where each batch starts in the input
            results = []
            for env, batch in zip(live, batches, strict=True):
                step.seek(env.start)
                results += step.run([batch])
        else:
            results = list(step.run(batches))
    except MmtoolsError as e:
        if isinstance(e, TemporaryError):
            raise  # worth a retry
        blob = _pickled_error(e)
        for env in live:
            env.error = blob
        return pack(envelopes)
    for env, batch, res in zip(live, batches, results, strict=True):
        res.check(batch.num_rows, step.name)
        env.add(res)
    return pack(envelopes)


def _pickled_error(e: MmtoolsError) -> bytes:
    try:
        blob = pickle.dumps(e)
        pickle.loads(blob)
    except Exception:  # an error class whose constructor takes other arguments
        plain = MmtoolsError(str(e))
        plain.exit_code = e.exit_code
        blob = pickle.dumps(plain)
    return blob


class _StepFn:
    """A step as Ray's map function: in a task (a fresh copy each) or in an actor (one each)."""

    def __init__(self, step: Step, seek: bool):
        self.step, self.seek, self.ready = step, seek, False

    def __call__(self, table: pa.Table) -> pa.Table:
        return _process(self, table)


class _ShardReader:
    """Read input Parquet shards into envelopes, batched as the local engine batches them."""

    def __init__(self, batch_size: int, columns: list[str] | None = None):
        self.batch_size, self.columns = batch_size, columns

    def __call__(self, table: pa.Table) -> Iterator[pa.Table]:
        from mmtools.io.source import Source

        for path, start, skip in zip(
            *(table.column(n).to_pylist() for n in ("path", "start", "skip")), strict=True
        ):
            skip = max(0, skip)
            shard = Source([path])
            for batch in shard.batches(self.columns, batch_size=self.batch_size, skip_rows=skip):
                yield wrap(start, batch)
                start += batch.num_rows


# -- building the Ray Data pipeline ---------------------------------------------------------


def portable(step: Step) -> Step:
    """A copy of `step` that pickles: what cannot (thread pools, open inputs) is left out.

    A step's `setup()`, called again on each worker, rebuilds such resources.
    """
    from ray import cloudpickle

    clone = copy.copy(step)
    for name, value in vars(step).items():
        if value is None or isinstance(value, _PICKLES):
            continue
        try:
            cloudpickle.dumps(value)
        except Exception:
            setattr(clone, name, None)
    return clone


def loads_model(step: Step) -> bool:
    """Whether `step` runs in an actor pool (a model loaded once per actor), not in tasks."""
    return step.loads_model or step.num_gpus > 0


def _input(ray, source, batch_size: int, skip: int, columns: list[str] | None = None):
    """A dataset of one envelope per input batch (of `columns`, default all), starting after
    `skip` rows; None if empty."""
    from mmtools.io.source import Source

    if isinstance(source, Source) and source.shards is not None:
        items, offset = [], 0
        for shard in source.shards:
            if offset + shard.rows > skip:
                path = shard.path if is_remote(shard.path) else os.path.abspath(shard.path)
                items.append({"path": path, "start": max(offset, skip), "skip": skip - offset})
            offset += shard.rows
        if not items:
            return None
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        reader = _ShardReader(batch_size, columns)
        ds = ds.map_batches(reader, batch_format="pyarrow", batch_size=1)
        # One envelope per block, so that one input shard's batches spread over the workers.
        return ds.repartition(target_num_rows_per_block=1)
    refs, start = [], skip
    for batch in source.batches(columns, batch_size=batch_size, skip_rows=skip):
        refs.append(ray.put(wrap(start, batch)))
        start += batch.num_rows
    return ray.data.from_arrow_refs(refs) if refs else None


def _stage(ray, ds, step: Step, seek: bool, options: RayOptions):
    """One `map_batches` over envelopes: an actor pool for a model step, else tasks."""
    common = dict(batch_format="pyarrow", batch_size=1, zero_copy_batch=True)
    if not loads_model(step):
        return _map(ds, _StepFn(step, seek), max_retries=options.retries, **common)
    res = ray.cluster_resources()
    gpus = options.gpus_per_worker
    if gpus is None:  # a model on each GPU when there are GPUs, as the local engine would
        cpu = getattr(getattr(step, "config", None), "device", None) == "cpu"
        gpus = step.num_gpus or (1.0 if res.get("GPU", 0) and not cpu else 0.0)
    concurrency = options.concurrency
    if concurrency is None:
        most = res.get("GPU", 0) / gpus if gpus else res.get("CPU", 1)
        concurrency = (1, max(1, int(most)))
    extra = {"num_gpus": gpus} if gpus else {}
    extra |= dict(max_restarts=options.retries, max_task_retries=options.retries)
    args = (step, seek)
    return _map(ds, _StepFn, fn_constructor_args=args, concurrency=concurrency, **extra, **common)


def _map(ds, fn, **kwargs):
    """`ds.map_batches`, with a bound on re-runs after a worker process dies.

    Ray Data re-runs such work forever by default, and a batch that kills its worker every
    time would hang the command; Ray 2.60 still takes the bound as a remote argument, with a
    deprecation warning.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args", category=DeprecationWarning)
        return ds.map_batches(fn, **kwargs)


def _envelopes(ds) -> Iterator[Envelope]:
    """The envelopes coming out of `ds`, in input order; a worker's failure re-raised as such."""
    for table in _tables(ds):
        yield from unpack(table)


def _tables(ds) -> Iterator[pa.Table]:
    """The blocks of `ds`, in input order; a worker's failure re-raised as such."""
    with _worker_errors():
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


@contextmanager
def _worker_errors():
    """A step's own exception from a worker re-raised as such; workers that kept dying as a
    partial run (exit 4: rerun resumes)."""
    try:
        yield
    except Exception as e:
        log.debug("the Ray pipeline failed: %s", e)
        cause = _cause(e)
        if _died(cause):
            first = str(cause).splitlines()[0] if str(cause) else ""
            raise PartialError(
                f"a Ray worker kept dying on one batch ({type(cause).__name__}: {first}); the "
                "committed shards are kept: rerun the same command to resume"
            ) from None
        raise cause from None


def _died(e: BaseException) -> bool:
    """Whether `e` is Ray's report of a dead worker, actor or node (not a step's exception)."""
    from ray.exceptions import RayError, RayTaskError

    return isinstance(e, RayError) and not isinstance(e, RayTaskError)


def _cause(e: BaseException) -> BaseException:
    """The step's own exception inside Ray's wrappers (RayTaskError, UserCodeException)."""
    seen: set[int] = set()
    while id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MmtoolsError):
            return e
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


# -- the run ---------------------------------------------------------------------------------


def run(
    command: str,
    source,
    steps: list[Step],
    sink,
    *,
    batch_size: int = 1024,
    quiet: bool = False,
    argv: list[str] | None = None,
    options: RayOptions | None = None,
) -> tuple[engine.Summary, dict]:
    """Run `steps` over `source` into `sink` on Ray; return the summary and the manifest."""
    t0 = time.monotonic()
    options = options or RayOptions()
    require_module("ray", "ray")  # before the output is touched
    summary = engine.Summary(command, getattr(sink, "path", "-"))
    schema, info = engine.output_schema(source.schema, steps)
    incoming: list[pa.RecordBatch] = []
    source.on_rejects = incoming.append
    start = sink.open(
        schema, engine.fingerprint(command, steps, source), getattr(source, "locate", None)
    )
    if sink.complete:
        summary.already_complete = True
        return summary, sink.close(summary.as_dict(), [], info)
    summary.resumed_from = start.rows
    scanned = bool(steps) and isinstance(steps[0], GlobalStep)
    try:
        ray = connect(options, any(loads_model(s) for s in steps))
        if scanned:
            _scan(ray, source, steps[0], batch_size, options)
        ds = _input(ray, source, batch_size, start.rows)
        for i, step in enumerate(steps):
            seek = i == 0 and scanned and hasattr(step, "seek")
            ds = None if ds is None else _stage(ray, ds, portable(step), seek, options)
        arrivals = _Arrivals(ds, source.total_rows)
        results = [_Results(arrivals.pending)]
        engine.stream(arrivals, results, sink, schema, start, incoming, summary, batch_size, quiet)
    except BaseException as e:
        sink.abort()
        engine.raise_for_storage(e, sink)
        raise
    finally:
        if scanned:
            steps[0].close()
        source.close()
    summary.seconds = time.monotonic() - t0
    lineage = [*getattr(source, "upstream", []), {"argv": argv or [], **summary.as_dict()}]
    return summary, engine.close(sink, summary, lineage, info)


def _scan(ray, source, step: GlobalStep, batch_size: int, options: RayOptions) -> None:
    """Pass 1 of a global step: the workers compute the keys of their batches (`step.keys`:
    hashes, scores; never media); from SHUFFLE_MIN_ROWS rows on, the step decides with Ray
    Data's own operations where it can (`finish_on_ray`: a sort for --top-fraction, a
    groupby for dedup), else the driver scans the keys in input order. A middle pass
    (mixup's partner rows) reads on the driver."""
    step.setup()
    source.spool()  # a stream on stdin is read twice
    ds = _input(ray, source, batch_size, 0, list(step.scan_columns))
    if ds is not None:
        common = dict(batch_format="pyarrow", batch_size=1, zero_copy_batch=True)
        keys = _map(ds, _KeysFn(portable(step)), max_retries=options.retries, **common)
        with _worker_errors():
            keys = keys.materialize()
            shuffled = keys.count() >= SHUFFLE_MIN_ROWS and step.finish_on_ray(keys, _in_order)
        if not shuffled:
            for batch in _in_order(keys):
                step.scan(batch)
            step.finish_scan()
    else:
        step.finish_scan()
    if columns := step.gather_columns():
        step.gather(source.batches(columns=columns, batch_size=batch_size))


def _in_order(ds) -> Iterator[pa.RecordBatch]:
    """The batches of `ds` in input order (the pipeline preserves it)."""
    for table in _tables(ds):
        yield from table.to_batches()


class _KeysFn:
    """A global step's `keys` as Ray's map function: envelopes in, key rows (with their input
    position) out."""

    def __init__(self, step: GlobalStep):
        self.step = step

    def __call__(self, table: pa.Table) -> pa.Table:
        batches = []
        for env in unpack(table):
            keys = self.step.keys(env.batch())
            at = pa.array(np.arange(env.start, env.start + keys.num_rows, dtype=np.int64))
            batches.append(keys.append_column(POSITION, at))
        return pa.Table.from_batches(batches)


class _Arrivals:
    """The Ray pipeline's output, fed to the local engine's own write loop (`engine.stream`).

    It stands for the source: one placeholder batch (a null column as long as the input
    batch) per envelope, in input order; `_Results` stands for the steps and turns each
    placeholder into its envelope's result. The local engine then checks the accounting and
    writes rows, rejects and progress exactly as it does for its own results.
    """

    def __init__(self, ds, total_rows: int | None):
        self.ds, self.total_rows = ds, total_rows
        self.pending: deque[Envelope] = deque()

    def batches(self, columns=None, batch_size: int = 0, skip_rows: int = 0):
        """One placeholder per envelope; an mmtools error from a worker is raised here."""
        expected = skip_rows
        for env in _envelopes(self.ds) if self.ds is not None else ():
            if env.start != expected:
                raise RuntimeError(f"Ray returned batches out of order: {env.start}, {expected}")
            if env.error is not None:
                raise pickle.loads(env.error)
            self.pending.append(env)
            expected += env.rows
            yield pa.record_batch([pa.nulls(env.rows)], names=["rows"])


class _Results(Step):
    """The Ray pipeline as one step: each placeholder becomes its envelope's result."""

    name = "ray"

    def __init__(self, pending: deque[Envelope]):
        super().__init__()
        self.pending = pending

    def run(self, batches):
        """The result of each envelope, in order."""
        for _ in batches:
            env = self.pending.popleft()
            rejects = env.reject_rows()
            merged = pa.concat_batches(rejects) if rejects else None
            yield Result(env.batch(), merged, env.dropped, env.generated, env.notes)
