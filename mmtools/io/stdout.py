"""Arrow IPC stream output on stdout, with the same interface as a dataset directory."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import BinaryIO

from mmtools.errors import DownstreamClosed, UsageError
from mmtools.io.dataset import Position
from mmtools.io.stream import StreamWriter


def check_not_terminal(out: BinaryIO) -> None:
    """Refuse to write binary Arrow data to a terminal, as gzip does."""
    try:
        tty = os.isatty(out.fileno())
    except (AttributeError, OSError, ValueError):
        tty = False
    if tty:
        raise UsageError(
            "refusing to write an Arrow stream to a terminal; pipe it into another mmtools "
            "command (e.g. | mmtools head) or pass -o DIR"
        )


class StreamSink:
    """Write the step output as an Arrow IPC stream; no resume (a stream has no state)."""

    complete = False
    path = "-"
    remote = False

    def __init__(self, out: BinaryIO | None = None):
        self.out = out if out is not None else sys.stdout.buffer
        check_not_terminal(self.out)
        self._writer: StreamWriter | None = None

    def open(self, schema, fingerprint, locate=None) -> Position:
        """Write the schema; start from the beginning of the input."""
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        self._writer = StreamWriter(self.out, schema, digest)
        return Position()

    def write(self, batch, rejects, dropped, consumed, generated: int = 0, drops=()) -> None:
        """Send rows, rejects and ledger rows downstream."""
        try:
            for r in rejects:
                self._writer.write_rejects(r)
            for d in drops:
                self._writer.write_drops(d)
            if batch is not None:
                self._writer.write(batch)
        except BrokenPipeError:
            raise DownstreamClosed("the reader of stdout closed the pipe") from None

    def close(self, summary: dict, lineage: list[dict], column_info: dict) -> dict:
        """Write the trailer (row count and lineage)."""
        try:
            self._writer.close(lineage)
        except BrokenPipeError:
            raise DownstreamClosed("the reader of stdout closed the pipe") from None
        return {}

    def abort(self) -> None:
        """Leave the stream without a trailer, so the reader sees it as truncated."""
