"""Envelopes: one input batch on its way through the Ray pipeline, with its row accounting.

Each travels as one Arrow row (ENVELOPE): the batch, the reject rows and the drop ledger
rows so far as Arrow IPC bytes, the dropped, generated and noted counts, its input offset,
and a pickled mmtools error when a step refused the batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa

from mmtools import columns as C
from mmtools.step import Result, add_counts

ENVELOPE = pa.schema(
    [
        pa.field("start", pa.int64()),  # input rows before this batch
        pa.field("rows", pa.int64()),  # input rows in this batch
        pa.field("data", pa.large_binary()),  # the batch, Arrow IPC stream
        pa.field("rejects", pa.large_binary()),  # reject rows so far, Arrow IPC stream
        pa.field("drops", pa.large_binary()),  # drop ledger rows so far, Arrow IPC stream
        pa.field("dropped", pa.string()),  # JSON {rule: count}
        pa.field("generated", pa.int64()),
        pa.field("notes", pa.string()),  # JSON {counter: n}
        pa.field("error", pa.large_binary()),  # a pickled mmtools error, not to be retried
    ]
)
BINARY = ("data", "rejects", "drops", "error")
JSON = ("dropped", "notes")


@dataclass
class Envelope:
    """One input batch on its way through the steps, with its row accounting so far."""

    start: int
    rows: int
    data: pa.Buffer | bytes
    rejects: pa.Buffer | bytes | None = None
    drops: pa.Buffer | bytes | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    generated: int = 0
    notes: dict[str, int] = field(default_factory=dict)
    error: pa.Buffer | bytes | None = None

    def batch(self) -> pa.RecordBatch:
        """The current batch."""
        return pa.ipc.open_stream(self.data).read_next_batch()

    def reject_rows(self) -> list[pa.RecordBatch]:
        """The reject rows so far."""
        return (
            [] if self.rejects is None else pa.ipc.open_stream(self.rejects).read_all().to_batches()
        )

    def drop_rows(self) -> list[pa.RecordBatch]:
        """The drop ledger rows so far."""
        return [] if self.drops is None else pa.ipc.open_stream(self.drops).read_all().to_batches()

    def add(self, res: Result) -> None:
        """Take the result of one more step."""
        self.data = ipc([res.batch], res.batch.schema)
        if res.rejected:
            self.rejects = ipc([*self.reject_rows(), res.rejects], C.REJECT_SCHEMA)
        if res.ledger_rows:
            self.drops = ipc([*self.drop_rows(), res.drops], C.LEDGER_SCHEMA)
        add_counts(self.dropped, res.dropped)
        add_counts(self.notes, res.notes)
        self.generated += res.generated


def ipc(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue()


def wrap(start: int, batch: pa.RecordBatch) -> pa.Table:
    """A fresh envelope for input `batch` starting after `start` rows, packed."""
    return pack([Envelope(start, batch.num_rows, ipc([batch], batch.schema))])


def pack(envelopes: list[Envelope]) -> pa.Table:
    """Envelopes as a table of ENVELOPE rows."""
    cols = {n: [getattr(e, n) for e in envelopes] for n in ENVELOPE.names}
    for n in JSON:
        cols[n] = [json.dumps(d) for d in cols[n]]
    for n in BINARY:  # pyarrow takes a memoryview of a Buffer, not the Buffer itself
        cols[n] = [memoryview(v) if isinstance(v, pa.Buffer) else v for v in cols[n]]
    return pa.table([pa.array(cols[f.name], f.type) for f in ENVELOPE], schema=ENVELOPE)


def unpack(table: pa.Table) -> list[Envelope]:
    """The envelopes of a table of ENVELOPE rows (binary columns zero-copy)."""
    cols = {n: table.column(n).to_pylist() for n in ENVELOPE.names if n not in BINARY}
    cols |= {n: [v.as_buffer() if v.is_valid else None for v in table.column(n)] for n in BINARY}
    for n in JSON:
        cols[n] = [json.loads(d) for d in cols[n]]
    return [Envelope(**{n: cols[n][i] for n in ENVELOPE.names}) for i in range(table.num_rows)]
