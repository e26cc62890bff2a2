"""The step contract: a step maps a stream of Arrow record batches to results, one per batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from mmtools import columns as C


@dataclass
class Result:
    """What a step made of one input batch: kept rows, reject rows and counts dropped by rule."""

    batch: pa.RecordBatch
    rejects: pa.RecordBatch | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    generated: int = 0
    # Counters beside the row accounting (e.g. mixup's pairs skipped); they travel with the
    # result, so they add up the same way on every engine.
    notes: dict[str, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        """Number of reject rows."""
        return 0 if self.rejects is None else self.rejects.num_rows

    def check(self, rows_in: int, step: str) -> None:
        """Assert the row accounting: in = out - generated + rejected + dropped."""
        accounted = (
            self.batch.num_rows - self.generated + self.rejected + sum(self.dropped.values())
        )
        if accounted != rows_in:
            raise AssertionError(
                f"{step}: row accounting broken: {rows_in} in, {self.batch.num_rows} out "
                f"({self.generated} generated), {self.rejected} rejected, {self.dropped} dropped"
            )


def reject_batch(step: str, ids: Iterable[str], reasons: Iterable[str], details: Iterable[str]):
    """Build reject rows (id, step, reason, detail) for `step`."""
    ids, reasons, details = list(ids), list(reasons), list(details)
    return pa.record_batch(
        [
            pa.array(ids, pa.string()),
            pa.array([step] * len(ids), pa.string()),
            pa.array(reasons, pa.string()),
            pa.array(details, pa.string()),
        ],
        schema=C.REJECT_SCHEMA,
    )


class Step:
    """A streaming transform over record batches.

    Subclasses set `name`, `requires` and `produces`, keep `__init__` cheap and picklable,
    load models in `setup()`, and implement `process()`. `run()` may be overridden to
    overlap work across batches, as long as it yields exactly one `Result` per input batch,
    in order.
    """

    name: ClassVar[str] = "step"
    requires: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    num_gpus: float = 0.0
    # Loads something heavy in `setup()` (a model): on Ray it runs in an actor pool, loaded
    # once per actor, not in tasks that would load it per batch.
    loads_model: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        self.config = config

    def params(self) -> dict:
        """Parameters that change the output; they go into the resume fingerprint."""
        if dataclasses.is_dataclass(self.config):
            return dataclasses.asdict(self.config)
        return {}

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """Schema of the output given the input schema."""
        C.require(schema, self.requires, self.name)
        return schema

    def column_info(self) -> dict:
        """Provenance of produced columns (model, parameters), stored in the output metadata."""
        return {}

    def setup(self) -> None:
        """Load heavy resources; called once per worker before the first batch."""

    def process(self, batch: pa.RecordBatch) -> Result:
        """Transform one batch."""
        raise NotImplementedError

    def run(self, batches: Iterable[pa.RecordBatch]) -> Iterator[Result]:
        """Transform a stream of batches, one result per batch."""
        for batch in batches:
            yield self.process(batch)

    def close(self) -> None:
        """Release resources."""


POSITION = "_pos"  # on Ray, each key row's input position


class GlobalStep(Step):
    """A step that must see every row first: pass 1 scans small keys, pass 2 streams."""

    scan_columns: tuple[str, ...] = ()

    def keys(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Pass 1, where the batch is (a Ray worker): what `scan` needs of a batch of the
        `scan_columns` (hashes, not media). A pure function of the batch."""
        return batch

    def scan(self, batch: pa.RecordBatch) -> None:
        """Pass 1, in order, in one place: remember the output of `keys` for one batch."""
        raise NotImplementedError

    def finish_scan(self) -> None:
        """Between the passes: decide (e.g. compute a threshold or the duplicate set)."""

    def finish_on_ray(self, keys, in_order) -> bool:
        """Pass 1 on Ray: decide from `keys` (a materialized Ray Dataset of `keys()` rows plus
        their input position, POSITION) with Ray Data's own operations, instead of `scan` +
        `finish_scan`; `in_order(ds)` yields a dataset's batches in input order. False: not
        done this way, so the driver scans the keys in order and calls `finish_scan`."""
        return False

    def gather_columns(self) -> list[str] | None:
        """Columns for an optional middle pass after `finish_scan()` (mixup: partner rows)."""
        return None

    def gather(self, batches: Iterable[pa.RecordBatch]) -> None:
        """The middle pass over `gather_columns()`, when there is one."""
