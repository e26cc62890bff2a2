"""The Ray executor: Ray Data computes; `mmtools.engines.run` does the rest.

The driver keeps the source (resume offset) and the sink (shards, rejects, manifest, lock):
the run lifecycle is the one of every engine. Each input batch travels through Ray as one
*envelope* row: the batch as Arrow IPC bytes, the reject and drop ledger rows so far, the
dropped and generated counts and its input offset. Every step is one `map_batches` stage over
envelopes: Ray tasks for a plain step, an actor pool for a step that loads something in
`setup()` (a model), so the model loads once per actor. Each call gets several envelopes
(about CALL_ROWS rows, while every CPU still gets CALLS_PER_CPU calls): Ray's cost per call
spread, and a step's own pipeline kept going across them. The driver takes the envelopes
back in input order (`preserve_order`) as one result per input batch.

Parquet inputs are read by Ray tasks, one per input shard, batched as the local engine
batches them, one envelope per block so that a shard's batches spread over the workers;
other inputs (a stdin stream, an ingest listing) are read by the driver into Ray's object
store first. A global step's first pass computes its keys on the workers (`keys`); from
SHUFFLE_MIN_ROWS rows on, the step is decided with Ray Data's own sort or groupby where it
offers one (`global_ops`), else the driver scans the keys in input order. Its second pass
runs on the workers, which receive the step with its decision.

Steps that are all `light` (column values only: no model, no media to decode) over a Parquet
input of fewer than DRIVER_ROWS rows compute in the driver process, as the local engine
computes them: there, Ray's cost per task and per stage outweighs what the workers would do.
So does a global step's pass 1 when its keys are light (`GlobalStep.light_keys`).

A step that raises on a batch is run again on it (Ray Data's `max_map_retries`); a worker
process that dies has its task re-run elsewhere, or its actor restarted and the batch re-run,
a bounded number of times (then: exit 4, rerun resumes). An mmtools error (bad option, data
contract) is not retried: the driver raises it as the local engine would.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa

from mmtools.engines.local import LocalExecutor
from mmtools.engines.ray import global_ops
from mmtools.engines.ray.cluster import ENV_ADDRESS, RETRIES, RayOptions, connect
from mmtools.engines.ray.envelope import Envelope, pack, unpack, wrap
from mmtools.errors import (
    MmtoolsError,
    PartialError,
    TemporaryError,
    UsageError,
    require_module,
)
from mmtools.io.fs import is_remote
from mmtools.io.protocols import Source
from mmtools.step import POSITION, GlobalStep, Result, Step, concat_rows

__all__ = ["ENV_ADDRESS", "RETRIES", "RayExecutor", "RayOptions"]

log = logging.getLogger("mmtools")
# Below this many rows a global step's keys are decided on the driver: the same result as
# Ray Data's sort or groupby without their fixed cost (seconds of shuffle on a small input).
SHUFFLE_MIN_ROWS = 100_000
# Below this many input rows, light steps (`Step.light`) compute in the driver process: the
# local engine's work, without Ray's seconds of per-stage and per-task cost.
DRIVER_ROWS = 100_000
# Rows a Ray call (a task, or an actor's call) gets, in whole input batches: Ray's cost per
# call (some 40 ms) spread over several, and a step's own pipeline (decoding the next batch
# while the model runs) kept going across them; but never so few calls that a CPU idles.
CALL_ROWS = 2048
CALLS_PER_CPU = 4


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
        res.check(batch.num_rows, step.name, step.ledger)
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
        from mmtools.io import source as files

        for path, start, skip in zip(
            *(table.column(n).to_pylist() for n in ("path", "start", "skip")), strict=True
        ):
            skip = max(0, skip)
            shard = files.Source([path])
            for batch in shard.batches(self.columns, batch_size=self.batch_size, skip_rows=skip):
                yield wrap(start, batch)
                start += batch.num_rows


# -- building the Ray Data pipeline ---------------------------------------------------------


def loads_model(step: Step) -> bool:
    """Whether `step` runs in an actor pool (a model loaded once per actor), not in tasks."""
    return step.loads_model or step.num_gpus > 0


def _input(ray, source: Source, batch_size: int, skip: int, columns: list[str] | None = None):
    """A dataset of one envelope per input batch (of `columns`, default all), starting after
    `skip` rows, and how many input batches each Ray call gets (`_per_call`); None if
    empty."""
    from mmtools.io import source as files

    if isinstance(source, files.Source) and source.shards is not None:
        items, offset, batches = [], 0, 0
        for shard in source.shards:
            if offset + shard.rows > skip:
                path = shard.path if is_remote(shard.path) else os.path.abspath(shard.path)
                items.append({"path": path, "start": max(offset, skip), "skip": skip - offset})
                batches += -(-(offset + shard.rows - max(offset, skip)) // batch_size)
            offset += shard.rows
        if not items:
            return None, 1
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        reader = _ShardReader(batch_size, columns)
        ds = ds.map_batches(reader, batch_format="pyarrow", batch_size=1)
        # One envelope per block, so that one input shard's batches spread over the workers.
        return ds.repartition(target_num_rows_per_block=1), _per_call(ray, batch_size, batches)
    refs, start = [], skip
    for batch in source.batches(columns, batch_size=batch_size, skip_rows=skip):
        refs.append(ray.put(wrap(start, batch)))
        start += batch.num_rows
    if not refs:
        return None, 1
    return ray.data.from_arrow_refs(refs), _per_call(ray, batch_size, len(refs))


def _per_call(ray, batch_size: int, batches: int) -> int:
    """Input batches per Ray call: CALL_ROWS rows' worth, but at most as many as leave
    CALLS_PER_CPU calls for each CPU of the cluster."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(CALL_ROWS // max(1, batch_size), batches // (CALLS_PER_CPU * cpus)))


def _stage(ray, ds, step: Step, seek: bool, options: RayOptions, per_call: int):
    """One `map_batches` over envelopes, `per_call` of them a call: an actor pool for a
    model step, else tasks."""
    common = dict(batch_format="pyarrow", batch_size=per_call, zero_copy_batch=True)
    if not loads_model(step):
        return _map(ds, _StepFn(step, seek), max_retries=options.retries, **common)
    res = ray.cluster_resources()
    gpus = options.gpus_per_worker
    if gpus is None:  # a model on each GPU when there are GPUs, as the local engine would
        cpu = getattr(getattr(step, "config", None), "device", None) == "cpu"
        gpus = step.num_gpus or (1.0 if res.get("GPU", 0) and not cpu else 0.0)
    # Each actor holds a CPU (Ray Data's default, with a GPU too); one CPU stays for the
    # tasks around the pool (reading the input), which would otherwise wait for ever.
    cpus = res.get("CPU", 0)
    concurrency = options.concurrency
    if concurrency is None:
        most = res.get("GPU", 0) / gpus if gpus else cpus
        concurrency = (1, max(1, min(int(most), int(cpus) - 1)))
    check_gpus(gpus, res.get("GPU", 0), options.address)
    check_cpus(concurrency if isinstance(concurrency, int) else concurrency[1], cpus, options)
    extra = {"num_gpus": gpus} if gpus else {}
    extra |= dict(max_restarts=options.retries, max_task_retries=options.retries)
    args = (step, seek)
    return _map(ds, _StepFn, fn_constructor_args=args, concurrency=concurrency, **extra, **common)


def check_gpus(per_worker: float, cluster: float, address: str | None) -> None:
    """A model step's workers ask for `per_worker` GPUs of a cluster that has `cluster`: on
    the cluster a run starts for itself none can come, so it is refused at once instead of
    waiting for ever; a cluster joined may add GPU nodes as they are asked for (a warning)."""
    if not per_worker or per_worker <= cluster:
        return
    what = f"each worker asks for {per_worker:g} GPU and the Ray cluster has {cluster:g}"
    if address is None:
        raise UsageError(
            f"{what}: run where there are GPUs, join a cluster with them (--ray-address), or "
            "leave --num-gpus-per-worker out"
        )
    log.warning("%s; waiting until the cluster adds GPUs (stop the run to give up)", what)


def check_cpus(actors: int, cluster: float, options: RayOptions) -> None:
    """`actors` of a model step hold a CPU each; with none left for the tasks that feed them,
    Ray Data waits for ever (ray#44687): refused on the cluster a run starts itself, a warning
    on a cluster joined, which may add nodes as they are asked for."""
    if actors < cluster:
        return
    what = (
        f"{actors} model actor{'s' if actors > 1 else ''} of 1 CPU each would leave no CPU of "
        f"the {cluster:g}-CPU Ray cluster to read their input"
    )
    if options.address is None:
        fix = (
            f"ask for at most {int(cluster) - 1} (--concurrency; rewrite: --ray-concurrency)"
            if cluster >= 2
            else "run with --engine local, or join a larger cluster (--ray-address)"
        )
        raise UsageError(f"{what}: {fix}")
    log.warning("%s; waiting until the cluster adds CPUs (stop the run to give up)", what)


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
        yield from global_ops.blocks(ds)


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
                f"one batch kept failing on the Ray workers, retries spent "
                f"({type(cause).__name__}: {first}); the committed shards are kept: rerun the "
                "same command to resume"
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


# -- the executor ----------------------------------------------------------------------------


class RayExecutor:
    """Run the steps on a Ray cluster with Ray Data: a global step's keys, its sort or
    groupby, and pass 2 on the workers; the driver only reads results in input order."""

    def __init__(self, options: RayOptions | None = None):
        self.options = options or RayOptions()
        require_module("ray", "ray")  # before the output is touched
        self.ray = None
        self._opened: list[Step] = []  # steps set up on the driver
        self._steps: list[Step] = []
        self._here: bool | None = None  # whether the steps compute in this process

    def setup(self, steps: list[Step]) -> None:
        """Join or start the cluster; the steps set up on the workers."""
        self.ray = connect(self.options, any(loads_model(s) for s in steps))
        self._steps = steps

    def _on_driver(self, source: Source) -> bool:
        """Whether the steps compute in this process: all light, over a Parquet input of
        fewer than DRIVER_ROWS rows (decided once, logged once)."""
        if self._here is None:
            light = bool(self._steps) and all(s.light for s in self._steps)
            self._here = light and _small(source, ", ".join(s.name for s in self._steps))
        return self._here

    def _set_up_here(self, steps: list[Step]) -> None:
        for step in steps:
            if not any(step is s for s in self._opened):
                self._opened.append(step)
                step.setup()

    def scan(self, source: Source, step: GlobalStep, batch_size: int) -> None:
        """Pass 1: the workers compute the keys of their batches (`step.keys`: hashes,
        scores; never media); from SHUFFLE_MIN_ROWS rows on, Ray Data decides where the step
        offers a sort or a groupby (`global_ops`), else the driver scans the keys in input
        order."""
        self._set_up_here([step])
        if self._on_driver(source) or (step.light_keys and _small(source, f"{step.name} keys")):
            LocalExecutor().scan(source, step, batch_size)
            return
        ds, per_call = _input(self.ray, source, batch_size, 0, list(step.scan_columns))
        decided = False
        if ds is not None:
            common = dict(batch_format="pyarrow", batch_size=per_call, zero_copy_batch=True)
            keys = _map(ds, _KeysFn(step), max_retries=self.options.retries, **common)
            with _worker_errors():
                keys = keys.materialize()
                big = keys.count() >= SHUFFLE_MIN_ROWS
                decided = big and global_ops.decide(self.ray, step, keys)
            if not decided:
                for table in _tables(keys):
                    for batch in table.to_batches():
                        step.scan(batch)
        if not decided:
            step.finish_scan()

    def results(
        self, source: Source, steps: list[Step], start: int, batch_size: int
    ) -> Iterator[tuple[int, Result]]:
        """Pass 2 from input row `start`: one `map_batches` stage per step; the envelopes
        back in input order as results (an mmtools error from a worker raised here)."""
        if self._on_driver(source):
            self._set_up_here(steps)
            return LocalExecutor().results(source, steps, start, batch_size)
        ds, per_call = _input(self.ray, source, batch_size, start)
        for i, step in enumerate(steps):
            seek = i == 0 and isinstance(step, GlobalStep)
            ds = None if ds is None else _stage(self.ray, ds, step, seek, self.options, per_call)
        return _results(ds, start)

    def close(self, steps: list[Step]) -> None:
        """Release the steps set up on the driver."""
        while self._opened:
            self._opened.pop().close()


def _small(source: Source, what: str) -> bool:
    """Whether `source` is a Parquet input of fewer than DRIVER_ROWS rows (where light work,
    `what`, computes in this process: logged)."""
    from mmtools.io import source as files

    rows = source.total_rows if isinstance(source, files.Source) else None
    if rows is None or rows >= DRIVER_ROWS:
        return False
    log.info(
        f"{what}: {rows:,} input rows, no model and no media to decode: computed in this "
        f"process (Ray's per-task cost would outweigh the work below {DRIVER_ROWS:,} rows)"
    )
    return True


def _results(ds, start: int) -> Iterator[tuple[int, Result]]:
    """The envelopes of `ds` from input row `start`, in order, as (input rows, result)."""
    expected = start
    for env in _envelopes(ds) if ds is not None else ():
        if env.start != expected:
            raise RuntimeError(f"Ray returned batches out of order: {env.start}, {expected}")
        if env.error is not None:
            raise pickle.loads(env.error)
        expected += env.rows
        rejects, drops = concat_rows(*env.reject_rows()), concat_rows(*env.drop_rows())
        yield env.rows, Result(env.batch(), rejects, env.dropped, env.generated, env.notes, drops)


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
