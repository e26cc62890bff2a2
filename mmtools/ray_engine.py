"""The Ray engine: the local engine's input, output, manifest and resume; Ray Data computes.

The driver keeps the source (resume offset) and the sink (shards, rejects, manifest, lock)
exactly as `mmtools.engine` does. Each input batch travels through Ray as one *envelope*
row: the batch as Arrow IPC bytes, the reject rows so far, the dropped and generated counts
and its input offset. Every step is one `map_batches` stage over envelopes: Ray tasks for a
plain step, an actor pool for a step that loads something in `setup()` (a model), so the
model loads once per actor. The driver takes the envelopes back in input order
(`preserve_order`) and hands them to the local engine's own write loop, which checks the row
accounting and writes rows, rejects and progress records.

Parquet inputs are read by Ray tasks, one per input shard, batched as the local engine
batches them, one envelope per block so that a shard's batches spread over the workers;
other inputs (a stdin stream, an ingest listing) are read by the driver into Ray's object
store first. A global step's first pass (keys only) runs on the driver as in the local
engine; its second pass runs on the workers, which receive the step with its scan state.

A step that raises on a batch is run again on it (Ray Data's `max_map_retries`); a worker
process that dies has its task re-run elsewhere, or its actor restarted and the batch re-run,
a bounded number of times (then: exit 4, rerun resumes). An mmtools error (bad option, data
contract) is not retried: the driver raises it as the local engine would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools import engine
from mmtools.errors import MmtoolsError, PartialError, TemporaryError, UsageError, require_module
from mmtools.step import GlobalStep, Result, Step

log = logging.getLogger("mmtools")

ENV_ADDRESS = "MMTOOLS_RAY_ADDRESS"
ENV_CONCURRENCY = "MMTOOLS_RAY_CONCURRENCY"
ENV_GPUS = "MMTOOLS_RAY_GPUS_PER_WORKER"
RETRIES = 3
CONNECT_TIMEOUT = 5.0
MODEL_STEPS = ("clip_embed", "clap_embed", "rewrite")  # steps may say so with `loads_model`
ENVELOPE = pa.schema(
    [
        pa.field("start", pa.int64()),  # input rows before this batch
        pa.field("rows", pa.int64()),  # input rows in this batch
        pa.field("data", pa.large_binary()),  # the batch, Arrow IPC stream
        pa.field("rejects", pa.large_binary()),  # reject rows so far, Arrow IPC stream
        pa.field("dropped", pa.string()),  # JSON {rule: count}
        pa.field("generated", pa.int64()),
        pa.field("error", pa.large_binary()),  # a pickled mmtools error, not to be retried
    ]
)
BINARY = ("data", "rejects", "error")
_PICKLES = (np.ndarray, pa.Array, pa.ChunkedArray, pa.Table, pa.RecordBatch, str, bytes, int)


@dataclass
class RayOptions:
    """Where and how wide to run: cluster address, actors per model step, GPUs per actor."""

    address: str | None = None  # None: start a local cluster; "auto": join the running one
    concurrency: int | None = None  # actors per model step; None: 1 up to the cluster's size
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    retries: int = RETRIES

    @classmethod
    def from_env(cls) -> RayOptions:
        """Options from the MMTOOLS_RAY_* environment variables."""
        try:
            concurrency, gpus = os.environ.get(ENV_CONCURRENCY), os.environ.get(ENV_GPUS)
            opts = cls(
                address=os.environ.get(ENV_ADDRESS) or None,
                concurrency=int(concurrency) if concurrency else None,
                gpus_per_worker=float(gpus) if gpus else None,
            )
        except ValueError as e:
            raise UsageError(f"bad {ENV_CONCURRENCY} or {ENV_GPUS}: {e}") from None
        if (opts.concurrency or 1) < 1 or (opts.gpus_per_worker or 0) < 0:
            raise UsageError(f"{ENV_CONCURRENCY} must be >= 1 and {ENV_GPUS} >= 0")
        return opts


def connect(options: RayOptions, actors: bool = False):
    """Join the cluster at `options.address`, or start a local one; nothing on stdout."""
    ray = require_module("ray", "ray")
    require_module("ray.data", "ray")
    verbose = log.isEnabledFor(logging.DEBUG)
    level = logging.INFO if verbose else logging.CRITICAL  # mmtools reports errors itself
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    if not ray.is_initialized():
        if actors and not verbose:
            # Ray's core logs an error line for every Ray Data actor it starts (ray#53727).
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        if options.address:
            _check_reachable(options.address)
        # Worker output is not forwarded: stdout may carry the Arrow stream.
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=level)
        with _own_signals():
            try:
                ray.init(address=options.address, ignore_reinit_error=True, **kwargs)
            except ConnectionError as e:
                raise _unreachable(options.address, e) from None
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.retried_map_errors = True  # a step that raises on a batch: the batch is run again
    ctx.max_map_retries = options.retries
    return ray


@contextlib.contextmanager
def _own_signals():
    """Keep mmtools' SIGTERM/SIGINT handlers: Ray's core would dump a stack and abort."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


def _check_reachable(address: str) -> None:
    """Fail fast where Ray would wait minutes: a host:port that does not answer."""
    import socket

    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto" and ray:// addresses: Ray reports those itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        raise _unreachable(address, e) from None


def _unreachable(address: str, e: Exception) -> TemporaryError:
    return TemporaryError(
        f"cannot reach the Ray cluster at {address} ({str(e).splitlines()[0]}); start it "
        f"(ray start --head) or unset {ENV_ADDRESS} to run a local one"
    )


# -- envelopes ---------------------------------------------------------------------------


@dataclass
class Envelope:
    """One input batch on its way through the steps, with its row accounting so far."""

    start: int
    rows: int
    data: pa.Buffer | bytes
    rejects: pa.Buffer | bytes | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    generated: int = 0
    error: pa.Buffer | bytes | None = None

    def batch(self) -> pa.RecordBatch:
        """The current batch."""
        return pa.ipc.open_stream(self.data).read_next_batch()

    def reject_rows(self) -> list[pa.RecordBatch]:
        """The reject rows so far."""
        return (
            [] if self.rejects is None else pa.ipc.open_stream(self.rejects).read_all().to_batches()
        )

    def add(self, res: Result) -> None:
        """Take the result of one more step."""
        self.data = _ipc([res.batch], res.batch.schema)
        if res.rejected:
            self.rejects = _ipc([*self.reject_rows(), res.rejects], C.REJECT_SCHEMA)
        for rule, n in res.dropped.items():
            self.dropped[rule] = self.dropped.get(rule, 0) + n
        self.generated += res.generated


def _ipc(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue()


def pack(envelopes: list[Envelope]) -> pa.Table:
    """Envelopes as a table of ENVELOPE rows."""
    cols = {n: [getattr(e, n) for e in envelopes] for n in ENVELOPE.names}
    cols["dropped"] = [json.dumps(d) for d in cols["dropped"]]
    for n in BINARY:  # pyarrow takes a memoryview of a Buffer, not the Buffer itself
        cols[n] = [memoryview(v) if isinstance(v, pa.Buffer) else v for v in cols[n]]
    return pa.table([pa.array(cols[f.name], f.type) for f in ENVELOPE], schema=ENVELOPE)


def unpack(table: pa.Table) -> list[Envelope]:
    """The envelopes of a table of ENVELOPE rows (binary columns zero-copy)."""
    cols = {n: table.column(n).to_pylist() for n in ENVELOPE.names if n not in BINARY}
    cols |= {n: [v.as_buffer() if v.is_valid else None for v in table.column(n)] for n in BINARY}
    cols["dropped"] = [json.loads(d) for d in cols["dropped"]]
    return [Envelope(**{n: cols[n][i] for n in ENVELOPE.names}) for i in range(table.num_rows)]


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

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, table: pa.Table) -> Iterator[pa.Table]:
        from mmtools.io.source import Source

        for path, start, skip in zip(
            *(table.column(n).to_pylist() for n in ("path", "start", "skip")), strict=True
        ):
            skip = max(0, skip)
            for batch in Source([path]).batches(batch_size=self.batch_size, skip_rows=skip):
                yield pack([Envelope(start, batch.num_rows, _ipc([batch], batch.schema))])
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
    hint = getattr(step, "loads_model", None)
    if hint is not None:
        return bool(hint)
    return step.num_gpus > 0 or step.name in MODEL_STEPS


def _input(ray, source, batch_size: int, skip: int):
    """A dataset of one envelope per input batch, starting after `skip` rows; None if empty."""
    from mmtools.io.source import Source

    if isinstance(source, Source) and source.shards is not None:
        items, offset = [], 0
        for shard in source.shards:
            if offset + shard.rows > skip:
                path = os.path.abspath(shard.path)
                items.append({"path": path, "start": max(offset, skip), "skip": skip - offset})
            offset += shard.rows
        if not items:
            return None
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_ShardReader(batch_size), batch_format="pyarrow", batch_size=1)
        # One envelope per block, so that one input shard's batches spread over the workers.
        return ds.repartition(target_num_rows_per_block=1)
    refs, start = [], skip
    for batch in source.batches(batch_size=batch_size, skip_rows=skip):
        refs.append(ray.put(pack([Envelope(start, batch.num_rows, _ipc([batch], batch.schema))])))
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
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            yield from unpack(table)
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
    options = options or RayOptions.from_env()
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
            steps[0].setup()
            engine.scan(source, steps[0], batch_size)
        ds = _input(ray, source, batch_size, start.rows)
        for i, step in enumerate(steps):
            seek = i == 0 and scanned and hasattr(step, "seek")
            ds = None if ds is None else _stage(ray, ds, portable(step), seek, options)
        arrivals = _Arrivals(ds, source.total_rows)
        results = [_Results(arrivals.pending)]
        engine.stream(arrivals, results, sink, schema, start, incoming, summary, batch_size, quiet)
    except BaseException:
        sink.abort()
        raise
    finally:
        if scanned:
            steps[0].close()
        source.close()
    summary.seconds = time.monotonic() - t0
    lineage = [*getattr(source, "upstream", []), {"argv": argv or [], **summary.as_dict()}]
    return summary, sink.close(summary.as_dict(), lineage, info)


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
            yield Result(env.batch(), merged, env.dropped, env.generated)
