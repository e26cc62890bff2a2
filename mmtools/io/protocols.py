"""What an engine needs of an input (`Source`) and of an output (`Sink`).

Implemented by `io.source.Source` (Parquet files, a dataset directory, a stream on stdin),
the ingest listing (`steps.ingest.step.ListingSource`), `io.dataset.DatasetSink` (a dataset
directory) and `io.stdout.StreamSink` (an Arrow stream on stdout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import pyarrow as pa

    from mmtools.io.dataset import Position


@runtime_checkable
class Source(Protocol):
    """Input record batches with a known schema, readable again from any row offset."""

    schema: pa.Schema
    upstream: list[dict]  # the lineage of the runs that made the input
    # Called with the reject rows that arrive with the input (from an upstream mmtools run).
    on_rejects: Callable[[pa.RecordBatch], None]
    # Called with the drop ledger rows that arrive with the input (likewise).
    on_drops: Callable[[pa.RecordBatch], None]
    # Input files passed over without becoming rows (unsupported types), counted by kind.
    skipped: dict[str, int]

    @property
    def total_rows(self) -> int | None:
        """Number of rows, when known before reading."""
        ...

    def identity(self) -> list:
        """What the input is, for the resume fingerprint."""
        ...

    def locate(self, start: int, end: int) -> list[dict]:
        """Which input shards (and row ranges in them) rows [start, end) came from."""
        ...

    def spool(self) -> None:
        """Make the input readable twice (a global step reads it once per pass)."""
        ...

    def batches(
        self, columns: list[str] | None = None, batch_size: int = 1024, skip_rows: int = 0
    ) -> Iterator[pa.RecordBatch]:
        """Batches of at most `batch_size` rows (of `columns`, default all), after `skip_rows`."""
        ...

    def close(self) -> None:
        """Release what reading took (a spool file)."""
        ...


@runtime_checkable
class Sink(Protocol):
    """An output that commits rows, rejects and progress as it goes, and resumes."""

    @property
    def path(self) -> str:
        """Where the output goes (`-` for stdout)."""
        ...

    @property
    def complete(self) -> bool:
        """True when the output is already complete: nothing to do."""
        ...

    @property
    def remote(self) -> bool:
        """True when the output is on an object store (its errors are worth a rerun)."""
        ...

    def open(
        self, schema: pa.Schema, fingerprint: dict, locate: Callable[[int, int], list[dict]]
    ) -> Position:
        """Start (or resume) the output; return how far the input was already consumed."""
        ...

    def write(
        self,
        batch: pa.RecordBatch | None,
        rejects: list[pa.RecordBatch],
        dropped: dict[str, int],
        consumed: Position,
        generated: int = 0,
        drops: list[pa.RecordBatch] = (),
    ) -> None:
        """Add what the steps made of the input up to `consumed` (`drops`: ledger rows)."""
        ...

    def close(self, summary: dict, lineage: list[dict], column_info: dict) -> dict:
        """Commit the rest and finish the output; return its manifest."""
        ...

    def abort(self) -> None:
        """Stop without committing what is not committed yet."""
        ...
