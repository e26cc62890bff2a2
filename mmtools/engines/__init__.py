"""Engines: where the steps run (this process, or a Ray cluster), under one run lifecycle.

`run()` owns what every engine shares: it opens the output (the resume point, or "already
complete"), has a global step's first pass run, writes what the steps made of each input
batch with the row accounting checked, forwards the reject and drop ledger rows of an
upstream run, and commits the output with its lineage and summary. An `Executor` only
computes: in this process (`engines.local.LocalExecutor`) or on a Ray cluster
(`engines.ray.executor`).

Heavy modules (pyarrow, tqdm) are imported where they are used: `mmtools --help` imports
this package through the Ray options.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from mmtools.errors import PartialError

if TYPE_CHECKING:
    import pyarrow as pa

    from mmtools.io.dataset import Position
    from mmtools.io.protocols import Sink, Source
    from mmtools.step import GlobalStep, Result, Step


class Executor(Protocol):
    """Where the steps compute; `run()` does everything else."""

    def setup(self, steps: list[Step]) -> None:
        """Get ready to run `steps` (load their models, or join the cluster)."""
        ...

    def scan(self, source: Source, step: GlobalStep, batch_size: int) -> None:
        """A global step's pass 1 over `source`, up to its decision (`finish_scan`)."""
        ...

    def results(
        self, source: Source, steps: list[Step], start: int, batch_size: int
    ) -> Iterator[tuple[int, Result]]:
        """Pass 2 from input row `start`: for each input batch, in input order, its number of
        rows and what `steps` made of it (one `Result`: every step's accounting, merged)."""
        ...

    def close(self, steps: list[Step]) -> None:
        """Release what `setup` and `scan` took (after a failure too)."""
        ...


@dataclass
class Summary:
    """Counts of one command run, printed at the end and stored in the manifest."""

    command: str
    output: str
    rows_in: int = 0
    rows_out: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    generated: int = 0
    upstream_rejected: int = 0
    upstream_dropped: int = 0  # ledger rows received from an upstream run in a pipe
    resumed_from: int = 0
    notes: dict[str, int] = field(default_factory=dict)  # the steps' own counters
    skipped: dict[str, int] = field(default_factory=dict)  # input files passed over, by type
    already_complete: bool = False
    seconds: float = 0.0
    success_rate: float | None = None  # rows out / rows in, for a step that counts successes

    def line(self) -> str:
        """One human-readable summary line."""
        if self.already_complete:
            return f"mmtools {self.command}: {self.output} is already complete; nothing to do"
        parts = [f"{self.rows_in} in", f"{self.rows_out} out"]
        if self.generated:
            parts.append(f"{self.generated} generated")
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()))
        parts.append(f"{self.rejected} rejected" + (f" ({rej})" if rej else ""))
        drop = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items()))
        parts.append(f"{sum(self.dropped.values())} dropped" + (f" ({drop})" if drop else ""))
        if self.success_rate is not None:
            parts.append(f"{self.success_rate:.1%} succeeded")
        if self.resumed_from:
            parts.append(f"resumed after {self.resumed_from} rows")
        parts += [f"{k.replace('_', ' ')} {v}" for k, v in sorted(self.notes.items())]
        if self.skipped:
            kinds = ", ".join(f"{k} {v}" for k, v in self.skipped.items())
            parts.append(f"skipped {sum(self.skipped.values())} unsupported: {kinds}")
        parts.append(f"{self.seconds:.1f} s ({per_second(self.rows_in, self.seconds)} rows/s)")
        return f"mmtools {self.command}: " + ", ".join(parts) + f" -> {self.output}"

    def as_dict(self) -> dict:
        """The summary as a JSON-ready dict."""
        return dict(self.__dict__)


def per_second(rows: int, seconds: float) -> str:
    """A rate for humans: whole numbers from 10 up, two significant digits below, never a
    bare 0 when rows were processed."""
    rate = rows / max(seconds, 1e-3) if rows else 0.0
    return f"{rate:.0f}" if rate >= 10 or not rate else f"{rate:.2g}"


def run(
    command: str,
    source: Source,
    steps: list[Step],
    sink: Sink,
    *,
    executor: Executor | None = None,
    batch_size: int = 1024,
    quiet: bool = False,
    argv: list[str] | None = None,
    ledger: bool = True,
) -> tuple[Summary, dict]:
    """Run `steps` over `source` into `sink` with `executor` (default: in this process);
    return the summary and the manifest. With `ledger`, every dropped row gets a ledger row
    (`_dropped/`, or down the pipe), and those from an upstream run are forwarded."""
    from mmtools.io.manifest import fingerprint_digest
    from mmtools.step import GlobalStep

    if executor is None:
        from mmtools.engines.local import LocalExecutor

        executor = LocalExecutor()
    t0 = time.monotonic()
    summary = Summary(command, sink.path, skipped=dict(source.skipped))
    for step in steps:
        step.ledger = ledger
    schema, info = output_schema(source.schema, steps)
    fp = fingerprint(command, steps, source)
    with begun(steps, sink.path, fingerprint_digest(fp)):
        incoming: list[pa.RecordBatch] = []
        source.on_rejects = incoming.append
        drops: list[pa.RecordBatch] = []
        source.on_drops = drops.append if ledger else (lambda rows: None)
        start = sink.open(schema, fp, source.locate)
        if sink.complete:
            summary.already_complete = True
            return summary, sink.close(summary.as_dict(), [], info)
        summary.resumed_from = start.rows
        try:
            executor.setup(steps)
            if steps and isinstance(steps[0], GlobalStep):
                first_pass(executor, source, steps[0], batch_size)
                steps[0].seek(start.rows)  # where a resumed run's pass 2 starts
            results = executor.results(source, steps, start.rows, batch_size)
            writer = Writer(sink, schema, start, (incoming, drops), summary, ledger)
            writer.write_all(results, source, steps, quiet)
            if steps and all(s.counts_successes for s in steps) and summary.rows_in:
                summary.success_rate = round(summary.rows_out / summary.rows_in, 4)
        except BaseException as e:
            sink.abort()
            raise_for_storage(e, sink)
            raise
        finally:
            executor.close(steps)
            source.close()
        summary.seconds = time.monotonic() - t0
        lineage = [*source.upstream, {"argv": argv or [], **summary.as_dict()}]
        lineage[-1] |= trail(source, steps, schema)
        return summary, commit(sink, summary, lineage, info)


@contextlib.contextmanager
def begun(steps: list[Step], output: str, run: str) -> Iterator[None]:
    """Each step's `begin` before the run and its `end` after: committed when the run
    returned, not when it raised."""
    opened: list[Step] = []
    try:
        for step in steps:
            step.begin(output, run)
            opened.append(step)
        yield
    except BaseException:
        for step in opened:
            step.end(False)
        raise
    for step in opened:
        step.end(True)


def trail(source: Source, steps: list[Step], schema: pa.Schema) -> dict:
    """What `explain` needs to follow a row through this run: the steps, the columns they
    added, and the directories of the input's shards ('-' for a stream)."""
    import posixpath

    shards = {str(d.get("shard")) for d in source.locate(0, source.total_rows or 0)}
    dirs = {posixpath.dirname(p) if "/" in p else p for p in shards}
    return {
        "steps": [s.name for s in steps],
        "added": [n for n in schema.names if n not in source.schema.names],
        "inputs": sorted(dirs),
    }


def first_pass(executor: Executor, source: Source, step: GlobalStep, batch_size: int) -> None:
    """A global step's pass 1 (by the executor) and its middle pass, if any."""
    source.spool()  # a stream on stdin is read once per pass
    executor.scan(source, step, batch_size)
    if columns := step.gather_columns():
        step.gather(source.batches(columns=columns, batch_size=batch_size))


def output_schema(source_schema: pa.Schema, steps: list[Step]) -> tuple[pa.Schema, dict]:
    """Schema (with metadata) and column provenance of the output of `steps`."""
    from mmtools import columns as C

    schema, info = source_schema, {}
    for step in steps:
        schema = step.output_schema(schema)
        info.update(step.column_info())
    return C.with_metadata(schema, info), info


def fingerprint(command: str, steps: list[Step], source: Source) -> dict:
    """What makes two runs produce the same output: command, options, input, input schema."""
    params = {}
    for step in steps:
        params.update(step.params())
    fp = {
        "command": command,
        "params": params,
        "inputs": source.identity(),
        "input_schema": [[f.name, str(f.type)] for f in source.schema],
    }
    return json.loads(json.dumps(fp, default=str))  # as it reads back from _run.json


NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
NO_SPACE_TEXT = tuple(os.strerror(n) for n in NO_SPACE)  # Arrow's errors may carry no errno


def raise_for_storage(e: BaseException, sink: Sink) -> None:
    """A full disk, a file-size limit or a lost object store: a partial run; rerun resumes."""
    if isinstance(e, OSError) and (e.errno in NO_SPACE or any(t in str(e) for t in NO_SPACE_TEXT)):
        detail = e.strerror or " ".join(str(e).split())
        raise PartialError(
            f"out of space writing {sink.path} ({detail}); "
            "the committed shards are kept: free space and rerun the same command to resume"
        ) from None
    if isinstance(e, OSError) and sink.remote:
        raise PartialError(
            f"writing {sink.path} failed ({' '.join(str(e).split())}); the committed shards "
            "are kept: rerun the same command to resume"
        ) from None


def commit(sink: Sink, summary: Summary, lineage: list[dict], info: dict) -> dict:
    """Commit the last shard and write the manifest; a full disk there too is a partial run."""
    try:
        return sink.close(summary.as_dict(), lineage, info)
    except BaseException as e:
        sink.abort()
        raise_for_storage(e, sink)
        raise


class Writer:
    """Pass 2's results into the sink, in input order, each checked against the row
    accounting (and the drop ledger), with the reject and ledger rows received from upstream
    forwarded alongside."""

    def __init__(self, sink: Sink, schema: pa.Schema, start: Position, incoming, summary, ledger):
        self.sink, self.schema, self.summary, self.ledger = sink, schema, summary, ledger
        self.rows, self.start = start.rows, start.rows
        rejects, drops = incoming
        self.upstream = _Upstream(rejects, start.upstream_rejects, summary, "upstream_rejected")
        self.drops = _Upstream(drops, start.upstream_drops, summary, "upstream_dropped")

    def write_all(self, results, source: Source, steps: list[Step], quiet: bool) -> None:
        """Write every result, then the reject rows that came after the last data batch."""
        from tqdm import tqdm

        bar = tqdm(
            total=source.total_rows,
            initial=self.start,
            unit="rows",
            disable=quiet,
            file=sys.stderr,
            desc=self.summary.command,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        what = " | ".join(s.name for s in steps) or "copy"
        progress = _Progress(bar)
        if steps:
            steps[0].progress = progress
        try:
            for rows, res in results:
                res.check(rows, what, self.ledger)
                self.write(rows, res)
                progress.reach(self.rows)
            self.write(0, None)  # rejects that arrived after the last data batch, or with none
        finally:
            if steps:
                steps[0].progress = None
            bar.close()

    def write(self, rows: int, res: Result | None) -> None:
        """Write one input batch's result (None: none, only what came from upstream)."""
        from mmtools.io.dataset import Position

        self.rows += rows
        forwarded, drops = self.upstream.take(), self.drops.take()
        consumed = Position(self.rows, self.upstream.position, self.drops.position)
        if res is None:
            self.sink.write(None, forwarded, {}, consumed, drops=drops)
        else:
            out = _conform(res.batch, self.schema)
            rejects = [res.rejects] if res.rejected else []
            if self.ledger and res.ledger_rows:
                drops = [res.drops, *drops]
            self.sink.write(
                out, rejects + forwarded, res.dropped, consumed, res.generated, drops=drops
            )
            _count(self.summary, res, out.num_rows)
        self.summary.rows_in = self.rows - self.start


class _Progress:
    """The progress bar, moved by the writer (rows written) and, from any thread, by a step
    reporting rows done within a batch; it shows whichever is further."""

    def __init__(self, bar):
        import threading

        self.bar, self.lock = bar, threading.Lock()

    def __call__(self, rows: int) -> None:
        with self.lock:
            self.bar.update(rows)

    def reach(self, rows: int) -> None:
        """At least `rows` done (those written)."""
        with self.lock:
            self.bar.update(max(0, rows - self.bar.n))


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    import pyarrow as pa

    if batch.schema.equals(schema, check_metadata=False):
        return batch
    cols = [batch.column(f.name).cast(f.type) for f in schema]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


class _Upstream:
    """Reject (or ledger) rows received from an upstream mmtools process, minus those already
    committed; counted in the summary under `counter`."""

    def __init__(self, incoming: list, committed: int, summary: Summary, counter: str):
        self.incoming, self.committed, self.summary = incoming, committed, summary
        self.counter = counter
        self.received = 0

    @property
    def position(self) -> int:
        """Upstream reject rows consumed so far (committed ones included)."""
        return max(self.committed, self.received)

    def take(self) -> list[pa.RecordBatch]:
        """The rows received since the last call that are not committed yet."""
        out = []
        while self.incoming:
            rej = self.incoming.pop(0)
            already = max(0, min(rej.num_rows, self.committed - self.received))
            self.received += rej.num_rows
            if rej.num_rows > already:
                out.append(rej.slice(already))
                counted = getattr(self.summary, self.counter) + rej.num_rows - already
                setattr(self.summary, self.counter, counted)
        return out


def _count(summary: Summary, res: Result, rows_out: int) -> None:
    from mmtools import columns as C
    from mmtools.step import add_counts

    summary.rows_out += rows_out
    summary.generated += res.generated
    add_counts(summary.dropped, res.dropped)
    add_counts(summary.notes, res.notes)
    if res.rejected:
        for reason in res.rejects.column(C.REJECT_REASON).to_pylist():
            summary.reasons[reason] = summary.reasons.get(reason, 0) + 1
        summary.rejected += res.rejected
