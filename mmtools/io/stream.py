"""Arrow IPC streams between mmtools processes, with reject side-records and an end trailer.

A stream written by mmtools marks its schema with `mmtools.stream`. Reject rows and drop
ledger rows travel as zero-row batches whose custom metadata holds them (reject rows as JSON,
ledger rows as a base64 Arrow IPC stream, columnar), and the stream ends with a zero-row
trailer batch carrying the row count and lineage. A stream that stops before the trailer
(the upstream process died) is reported as truncated, never taken as complete.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import BinaryIO

import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import DataContractError, TruncatedStreamError

STREAM_KEY = b"mmtools.stream"
REJECTS_KEY = b"mmtools.rejects"
DROPS_KEY = b"mmtools.dropped"
END_KEY = b"mmtools.end"
FINGERPRINT_KEY = b"mmtools.fingerprint"  # what made the stream: a resumed reader checks it


class _WholeWrites:
    """A binary file that writes all it is given, or raises. A buffered pipe whose reader
    leaves in the middle of a large write returns a short count instead of raising, and
    pyarrow does not check the count: the batch would pass for written, and the next one be
    read and worked on before a write failed."""

    def __init__(self, out: BinaryIO):
        self._out = out

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = view.nbytes
        while view:
            n = self._out.write(view)
            if not n:  # no progress: a closed pipe
                raise BrokenPipeError("the reader closed the pipe")
            view = view[n:]
        return total

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        """The underlying file stays open: its owner closes it."""

    @property
    def closed(self) -> bool:
        return self._out.closed

    def writable(self) -> bool:
        return True


class StreamWriter:
    """Write record batches, reject rows and a final trailer to a binary file object."""

    def __init__(self, out: BinaryIO, schema: pa.Schema, fingerprint: str = ""):
        meta = dict(schema.metadata or {})
        meta[STREAM_KEY] = b"1"
        meta[FINGERPRINT_KEY] = fingerprint.encode()
        self.schema = schema.with_metadata(meta)
        self._out = out
        self._writer = pa.ipc.new_stream(_WholeWrites(out), self.schema)
        self.rows = 0
        self.rejects = 0
        self.drops = 0

    def _empty_batch(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_pylist([], schema=self.schema)

    def write(self, batch: pa.RecordBatch) -> None:
        """Write data rows and flush, so a reader downstream sees them at once."""
        if batch.num_rows:
            self._writer.write_batch(batch)
            self.rows += batch.num_rows
            self._out.flush()

    def write_rejects(self, rejects: pa.RecordBatch) -> None:
        """Forward reject rows as a side record."""
        if rejects is None or not rejects.num_rows:
            return
        rows = [rejects.column(i).to_pylist() for i in range(rejects.num_columns)]
        payload = json.dumps(list(zip(*rows, strict=True)))
        self._writer.write_batch(self._empty_batch(), custom_metadata={REJECTS_KEY: payload})
        self.rejects += rejects.num_rows

    def write_drops(self, drops: pa.RecordBatch) -> None:
        """Forward drop ledger rows as a side record."""
        if drops is None or not drops.num_rows:
            return
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, drops.schema) as w:
            w.write_batch(drops)
        payload = base64.b64encode(sink.getvalue().to_pybytes())
        self._writer.write_batch(self._empty_batch(), custom_metadata={DROPS_KEY: payload})
        self.drops += drops.num_rows

    def close(self, lineage: list[dict]) -> None:
        """Write the trailer and the end-of-stream marker."""
        counts = {"rows": self.rows, "rejects": self.rejects, "drops": self.drops}
        trailer = json.dumps({**counts, "lineage": lineage})
        self._writer.write_batch(self._empty_batch(), custom_metadata={END_KEY: trailer})
        self._writer.close()
        self._out.flush()


def read_stream(
    src: BinaryIO,
    on_rejects: Callable[[pa.RecordBatch], None],
    on_end: Callable[[dict], None],
    on_drops: Callable[[pa.RecordBatch], None] | None = None,
) -> tuple[pa.Schema, Iterator[pa.RecordBatch], str]:
    """Open an Arrow IPC stream; return its schema, an iterator over its data batches and
    the fingerprint of the run that wrote it ('' if none). Side records go to `on_rejects`
    and `on_drops` (ledger rows) as they arrive, the trailer to `on_end`."""
    peek = getattr(src, "peek", None)
    if peek is not None and not peek(1):
        raise TruncatedStreamError(
            "standard input is empty: the command upstream wrote nothing (did it fail?)"
        )
    try:
        reader = pa.ipc.open_stream(src)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataContractError(
            f"standard input is not an Arrow IPC stream ({e}); pipe the output of an mmtools "
            "command, or pass a dataset directory or Parquet file"
        ) from None
    ours = STREAM_KEY in (reader.schema.metadata or {})
    upstream = (reader.schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode()
    ours_keys = (STREAM_KEY, FINGERPRINT_KEY)
    meta = {k: v for k, v in (reader.schema.metadata or {}).items() if k not in ours_keys}
    schema = reader.schema.with_metadata(meta)

    def batches() -> Iterator[pa.RecordBatch]:
        rows, ended = 0, False
        while True:
            try:
                batch, custom = reader.read_next_batch_with_custom_metadata()
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError) as e:
                raise TruncatedStreamError(
                    f"input stream broke off after {rows} rows: {e}"
                ) from None
            custom = dict(custom or {})
            if _side_record(custom, on_rejects, on_drops):
                continue
            if END_KEY in custom:
                trailer = json.loads(custom[END_KEY])
                if trailer["rows"] != rows:
                    raise TruncatedStreamError(
                        f"input stream promised {trailer['rows']} rows but carried {rows}"
                    )
                on_end(trailer)
                ended = True
            elif batch.num_rows:
                rows += batch.num_rows
                yield batch.replace_schema_metadata(meta)
        if ours and not ended:
            raise TruncatedStreamError(
                f"input stream ended after {rows} rows without its end marker: the upstream "
                "command failed or was killed; nothing was committed"
            )

    return schema, batches(), upstream


def _side_record(custom: dict, on_rejects, on_drops) -> bool:
    """Hand a side record (reject or ledger rows) to its callback; False for another batch."""
    if REJECTS_KEY in custom:
        on_rejects(_rejects_from_json(custom[REJECTS_KEY]))
    elif DROPS_KEY in custom:
        if on_drops is not None:
            on_drops(_drops_from_ipc(custom[DROPS_KEY]))
    else:
        return False
    return True


def _drops_from_ipc(payload: bytes) -> pa.RecordBatch:
    return pa.ipc.open_stream(base64.b64decode(payload)).read_next_batch()


def _rejects_from_json(payload: bytes) -> pa.RecordBatch:
    # Rows from an older writer have no source: padded with null.
    width = len(C.REJECT_SCHEMA)
    rows = [[*r, *[None] * (width - len(r))] for r in json.loads(payload)]
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in C.REJECT_SCHEMA]
    return pa.record_batch([pa.array(list(c), pa.string()) for c in cols], schema=C.REJECT_SCHEMA)
