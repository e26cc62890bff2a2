"""The local engine: source → steps → sink, with row accounting, resume and a summary."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import PartialError
from mmtools.io.dataset import Position
from mmtools.step import GlobalStep, Step


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
    resumed_from: int = 0
    notes: dict[str, int] = field(default_factory=dict)  # the steps' own counters
    already_complete: bool = False
    seconds: float = 0.0

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
        if self.resumed_from:
            parts.append(f"resumed after {self.resumed_from} rows")
        parts += [f"{k.replace('_', ' ')} {v}" for k, v in sorted(self.notes.items())]
        rate = self.rows_in / self.seconds if self.seconds > 0 else 0.0
        parts.append(f"{self.seconds:.1f} s ({rate:.0f} rows/s)")
        return f"mmtools {self.command}: " + ", ".join(parts) + f" -> {self.output}"

    def as_dict(self) -> dict:
        """The summary as a JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class _Tally:
    consumed: Position
    rejects: list[pa.RecordBatch] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    generated: int = 0
    forwarded: list[pa.RecordBatch] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)


def output_schema(source_schema: pa.Schema, steps: list[Step]) -> tuple[pa.Schema, dict]:
    """Schema (with metadata) and column provenance of the output of `steps`."""
    schema, info = source_schema, {}
    for step in steps:
        schema = step.output_schema(schema)
        info.update(step.column_info())
    return C.with_metadata(schema, info), info


def fingerprint(command: str, steps: list[Step], source) -> dict:
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


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    if batch.schema.equals(schema, check_metadata=False):
        return batch
    cols = [batch.column(f.name).cast(f.type) for f in schema]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def add_counts(total: dict[str, int], more: dict[str, int]) -> None:
    """Add the counters of `more` into `total`."""
    for k, n in more.items():
        if n:
            total[k] = total.get(k, 0) + n


def _apply(step: Step, items: Iterator[tuple[pa.RecordBatch, _Tally]]):
    """Run `step` over the batches of `items`, carrying each batch's tally alongside."""
    pending: deque = deque()

    def feed():
        for batch, tally in items:
            pending.append((batch.num_rows, tally))
            yield batch

    for res in step.run(feed()):
        rows_in, tally = pending.popleft()
        res.check(rows_in, step.name)
        if res.rejects is not None and res.rejects.num_rows:
            tally.rejects.append(res.rejects)
        add_counts(tally.dropped, res.dropped)
        tally.generated += res.generated
        add_counts(tally.notes, res.notes)
        yield res.batch, tally


def run(
    command: str,
    source,
    steps: list[Step],
    sink,
    *,
    batch_size: int = 1024,
    quiet: bool = False,
    argv: list[str] | None = None,
) -> tuple[Summary, dict]:
    """Run `steps` over `source` into `sink`; return the summary and the manifest."""
    t0 = time.monotonic()
    summary = Summary(command, getattr(sink, "path", "-"))
    schema, info = output_schema(source.schema, steps)
    incoming: list[pa.RecordBatch] = []
    source.on_rejects = incoming.append
    start = sink.open(schema, fingerprint(command, steps, source), getattr(source, "locate", None))
    if sink.complete:
        summary.already_complete = True
        return summary, sink.close(summary.as_dict(), [], info)
    summary.resumed_from = start.rows
    try:
        for step in steps:
            step.setup()
        if steps and isinstance(steps[0], GlobalStep):
            scan(source, steps[0], batch_size)
            if hasattr(steps[0], "seek"):  # tell pass 2 where a resumed run starts
                steps[0].seek(start.rows)
        stream(source, steps, sink, schema, start, incoming, summary, batch_size, quiet)
    except BaseException as e:
        sink.abort()
        raise_for_storage(e, sink)
        raise
    finally:
        for step in steps:
            step.close()
        source.close()
    summary.seconds = time.monotonic() - t0
    lineage = [*getattr(source, "upstream", []), {"argv": argv or [], **summary.as_dict()}]
    return summary, close(sink, summary, lineage, info)


NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
NO_SPACE_TEXT = tuple(os.strerror(n) for n in NO_SPACE)  # Arrow's errors may carry no errno


def raise_for_storage(e: BaseException, sink) -> None:
    """A full disk, a file-size limit or a lost object store: a partial run; rerun resumes."""
    if isinstance(e, OSError) and (e.errno in NO_SPACE or any(t in str(e) for t in NO_SPACE_TEXT)):
        detail = e.strerror or " ".join(str(e).split())
        raise PartialError(
            f"out of space writing {getattr(sink, 'path', 'the output')} ({detail}); "
            "the committed shards are kept: free space and rerun the same command to resume"
        ) from None
    if isinstance(e, OSError) and getattr(getattr(sink, "store", None), "remote", False):
        raise PartialError(
            f"writing {sink.path} failed ({' '.join(str(e).split())}); the committed shards "
            "are kept: rerun the same command to resume"
        ) from None


def close(sink, summary: Summary, lineage: list[dict], info: dict) -> dict:
    """Commit the last shard and write the manifest; a full disk there too is a partial run."""
    try:
        return sink.close(summary.as_dict(), lineage, info)
    except BaseException as e:
        sink.abort()
        raise_for_storage(e, sink)
        raise


def scan(source, step: GlobalStep, batch_size: int) -> None:
    """Pass 1 of a global step (and its middle pass, if any) over the source."""
    source.spool()
    for batch in source.batches(columns=list(step.scan_columns), batch_size=batch_size):
        step.scan(step.keys(batch))
    step.finish_scan()
    if columns := step.gather_columns():
        step.gather(source.batches(columns=columns, batch_size=batch_size))


def stream(source, steps, sink, schema, start: Position, incoming, summary, batch_size, quiet):
    """Pass 2: stream batches through the steps into the sink, from the resume point."""
    from tqdm import tqdm

    bar = tqdm(
        total=source.total_rows,
        initial=start.rows,
        unit="rows",
        disable=quiet,
        file=sys.stderr,
        desc=summary.command,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    upstream = _Upstream(incoming, start.upstream_rejects, summary)

    def tallied():
        rows = start.rows
        for batch in source.batches(batch_size=batch_size, skip_rows=start.rows):
            rows += batch.num_rows
            yield batch, _Tally(Position(rows, start.upstream_rejects))

    items = tallied()
    for step in steps:
        items = _apply(step, items)
    last = Position(start.rows, start.upstream_rejects)
    for batch, tally in items:
        upstream.take(tally)
        out = _conform(batch, schema)
        sink.write(
            out, tally.rejects + tally.forwarded, tally.dropped, tally.consumed, tally.generated
        )
        _count(summary, tally, out)
        bar.update(tally.consumed.rows - bar.n)
        last = tally.consumed
    # Rejects that arrived after the last data batch (or with no data at all).
    tail = _Tally(Position(last.rows, last.upstream_rejects))
    upstream.take(tail)
    sink.write(None, tail.forwarded, {}, tail.consumed)
    _count(summary, tail, None)
    bar.close()


class _Upstream:
    """Reject rows received from an upstream mmtools process, minus those already committed."""

    def __init__(self, incoming: list, committed: int, summary: Summary):
        self.incoming, self.committed, self.summary = incoming, committed, summary
        self.received = 0

    def take(self, tally: _Tally) -> None:
        while self.incoming:
            rej = self.incoming.pop(0)
            already = max(0, min(rej.num_rows, self.committed - self.received))
            self.received += rej.num_rows
            if rej.num_rows > already:
                tally.forwarded.append(rej.slice(already))
                self.summary.upstream_rejected += rej.num_rows - already
        tally.consumed.upstream_rejects = max(self.committed, self.received)


def _count(summary: Summary, tally: _Tally, out) -> None:
    summary.rows_out += 0 if out is None else out.num_rows
    summary.rows_in = tally.consumed.rows - summary.resumed_from
    summary.generated += tally.generated
    add_counts(summary.dropped, tally.dropped)
    add_counts(summary.notes, tally.notes)
    for r in tally.rejects:
        for reason in r.column(C.REJECT_REASON).to_pylist():
            summary.reasons[reason] = summary.reasons.get(reason, 0) + 1
        summary.rejected += r.num_rows
