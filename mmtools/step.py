"""The step contract: a step maps a stream of Arrow record batches to results, one per batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C

if TYPE_CHECKING:
    import numpy as np


def add_counts(total: dict[str, int], more: dict[str, int]) -> None:
    """Add the counters of `more` into `total`."""
    for k, n in more.items():
        if n:
            total[k] = total.get(k, 0) + n


@dataclass
class Result:
    """What a step made of one input batch: kept rows, reject rows, counts dropped by rule and,
    where the ledger is on, one ledger row per dropped row (`drops`, C.LEDGER_SCHEMA)."""

    batch: pa.RecordBatch
    rejects: pa.RecordBatch | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    generated: int = 0
    # Counters beside the row accounting (e.g. mixup's pairs skipped); they travel with the
    # result, so they add up the same way on every engine.
    notes: dict[str, int] = field(default_factory=dict)
    drops: pa.RecordBatch | None = None

    @property
    def rejected(self) -> int:
        """Number of reject rows."""
        return 0 if self.rejects is None else self.rejects.num_rows

    @property
    def ledger_rows(self) -> int:
        """Number of ledger rows."""
        return 0 if self.drops is None else self.drops.num_rows

    def check(self, rows_in: int, step: str, ledger: bool = False) -> None:
        """Assert the row accounting: in = out - generated + rejected + dropped; with the
        `ledger` on, also one ledger row per dropped row, under the rule that counted it."""
        accounted = (
            self.batch.num_rows - self.generated + self.rejected + sum(self.dropped.values())
        )
        if accounted != rows_in:
            raise AssertionError(
                f"{step}: row accounting broken: {rows_in} in, {self.batch.num_rows} out "
                f"({self.generated} generated), {self.rejected} rejected, {self.dropped} dropped"
            )
        expected = {k: n for k, n in self.dropped.items() if n}
        if ledger and self.ledger_counts() != expected:
            raise AssertionError(
                f"{step}: drop ledger broken: {expected} dropped, ledger rows by rule "
                f"{self.ledger_counts()}"
            )

    def ledger_counts(self) -> dict[str, int]:
        """Ledger rows by rule."""
        if not self.ledger_rows:
            return {}
        counts = pc.value_counts(self.drops.column(C.DROP_RULE)).to_pylist()
        return {c["values"]: c["counts"] for c in counts}

    def then(self, after: Result) -> Result:
        """This result followed by the next step's result on its batch: that step's rows and
        the row accounting of both, as if one step had made them."""
        dropped, notes = dict(self.dropped), dict(self.notes)
        add_counts(dropped, after.dropped)
        add_counts(notes, after.notes)
        return Result(
            after.batch,
            concat_rows(self.rejects, after.rejects),
            dropped,
            self.generated + after.generated,
            notes,
            concat_rows(self.drops, after.drops),
        )


def concat_rows(*parts: pa.RecordBatch | None) -> pa.RecordBatch | None:
    """The rows of the non-empty `parts` in one batch (None when there are none)."""
    rows = [p for p in parts if p is not None and p.num_rows]
    return pa.concat_batches(rows) if len(rows) > 1 else (rows or [None])[0]


def ledger_rows(
    step: str,
    batch: pa.RecordBatch,
    where,
    rule: str,
    value=None,
    kept_id: pa.Array | None = None,
) -> pa.RecordBatch | None:
    """Ledger rows (C.LEDGER_SCHEMA) for the rows of `batch` where the mask `where` holds,
    dropped by `step` under `rule`. `value` (floats; NaN or null: none) and `kept_id` are
    given for every row of `batch`, or not at all. None when no row is dropped."""
    mask = where if isinstance(where, pa.Array | pa.ChunkedArray) else pa.array(where, pa.bool_())
    ids = batch.column(C.ID).filter(mask).cast(pa.string())
    n = len(ids)
    if not n:
        return None
    values = pa.nulls(n, pa.float64()) if value is None else _floats(value).filter(mask)
    kept = pa.nulls(n, pa.string()) if kept_id is None else kept_id.filter(mask).cast(pa.string())
    if C.SOURCE in batch.schema.names:
        source = batch.column(C.SOURCE).filter(mask).cast(pa.string())
    else:
        source = pa.nulls(n, pa.string())
    cols = [
        ids,
        pa.repeat(pa.scalar(step, pa.string()), n),
        pa.repeat(pa.scalar(rule, pa.string()), n),
    ]
    return pa.RecordBatch.from_arrays([*cols, values, kept, source], schema=C.LEDGER_SCHEMA)


def _floats(value) -> pa.Array:
    """A float64 column, NaN as null."""
    if isinstance(value, pa.Array | pa.ChunkedArray):
        value = value.cast(pa.float64())
        return pc.if_else(pc.is_nan(value), None, value)
    return pa.array(value, pa.float64(), from_pandas=True)


def reject_batch(
    step: str,
    ids: Iterable[str],
    reasons: Iterable[str],
    details: Iterable[str],
    sources: Iterable[str | None] | None = None,
):
    """Build reject rows (id, step, reason, detail, source) for `step`; `sources` names where
    each row came from (URL, path, tar::key), null where not given."""
    ids, reasons, details = list(ids), list(reasons), list(details)
    sources = [None] * len(ids) if sources is None else list(sources)
    return pa.record_batch(
        [
            pa.array(ids, pa.string()),
            pa.array([step] * len(ids), pa.string()),
            pa.array(reasons, pa.string()),
            pa.array(details, pa.string()),
            pa.array(sources, pa.string()),
        ],
        schema=C.REJECT_SCHEMA,
    )


def sources_of(batch: pa.RecordBatch, rows) -> list[str | None] | None:
    """The `source` of `rows` (positions) of `batch`, for their reject rows; None when the
    batch has no such column."""
    if C.SOURCE not in batch.schema.names:
        return None
    return batch.column(C.SOURCE).take(pa.array(rows, pa.int64())).cast(pa.string()).to_pylist()


def rejects_at(step: str, batch: pa.RecordBatch, rows, reasons: list) -> pa.RecordBatch:
    """Reject rows for the rows at positions `rows` of `batch`: their ids and sources, with
    `reasons[i]`, a (reason, detail) pair, for the row at position i (a list or a dict)."""
    ids = batch.column(C.ID).take(pa.array(rows, pa.int64())).to_pylist()
    return reject_batch(
        step,
        ids,
        [reasons[int(i)][0] for i in rows],
        [reasons[int(i)][1] for i in rows],
        sources_of(batch, rows),
    )


class Step:
    """A streaming transform over record batches.

    Subclasses set `name`, `requires` and `produces`, keep `__init__` cheap and picklable,
    load models in `setup()`, and implement `process()`. `run()` may be overridden to
    overlap work across batches, as long as it yields exactly one `Result` per input batch,
    in order.

    A step travels to other processes (Ray workers) by pickling, one way for all steps:
    `__getstate__` leaves out the attributes named in `transient` (thread pools, loaded
    models, clients, temporary files), which arrive as None; `setup()`, called again where
    the step runs, rebuilds them. Everything else must pickle.
    """

    name: ClassVar[str] = "step"
    requires: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    num_gpus: float = 0.0
    # Loads something heavy in `setup()` (a model): on Ray it runs in an actor pool, loaded
    # once per actor, not in tasks that would load it per batch.
    loads_model: ClassVar[bool] = False
    # Works on column values only (no model, no media to decode), at little cost per row: on
    # Ray, a run of such steps over a small input computes in the driver process
    # (`engines.ray.executor.DRIVER_ROWS`), where Ray's per-task cost would outweigh it.
    light: ClassVar[bool] = False
    # Attributes that stay behind when the step is pickled; `setup()` rebuilds them.
    transient: ClassVar[tuple[str, ...]] = ()
    # Every input row either succeeds (an output row) or is rejected (ingest): the summary
    # then shows rows out / rows in as a success rate.
    counts_successes: ClassVar[bool] = False
    # Set by the engine where it shows progress: called with a number of input rows that
    # are done, from any thread, by a step that finishes rows one by one inside a batch.
    progress: Callable[[int], None] | None = None
    # Set by the engine: whether the step makes ledger rows for the rows it drops
    # (`drop_rows`); it travels with the step to the workers.
    ledger: bool = True

    def __init__(self, config: Any = None):
        self.config = config

    def __getstate__(self) -> dict:
        """The step's state without its `transient` attributes (those arrive as None)."""
        state = dict(self.__dict__)
        for name in (*self.transient, "progress"):
            if name in state:
                state[name] = None
        return state

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

    def begin(self, output: str, run: str) -> None:
        """Before the output opens, in the driving process: a step that keeps state beside
        the output (dedup's `--index`) opens and repairs it. `output` is the output's path
        ("-" for a stream) and `run` the digest of the run's fingerprint."""

    def end(self, committed: bool) -> None:
        """After the output's manifest is in place (`committed`), or after a failed run: a
        step with state beside the output makes its part final, or leaves it for the next
        run to repair, and lets go of it."""

    def drop_rows(
        self, batch: pa.RecordBatch, where, rule: str, value=None, kept_id=None
    ) -> pa.RecordBatch | None:
        """Ledger rows for the rows of `batch` where the mask `where` holds, dropped by `rule`
        (see `ledger_rows`); None when the ledger is off or no row is dropped."""
        if not self.ledger:
            return None
        return ledger_rows(self.name, batch, where, rule, value, kept_id)

    def advance(self, rows: int = 1) -> None:
        """Report `rows` more input rows done before their batch's result (progress only)."""
        if self.progress is not None:
            self.progress(rows)


POSITION = "_pos"  # in a distributed pass 1, each key row's input position
BUCKET = "_bucket"  # in a distributed pass 1, the bucket a groupby brings together


class Bucketed(Protocol):
    """Groups that a groupby on buckets finds, without all keys in one place (dedup's methods).

    An engine that spreads pass 1 (Ray) turns key rows, each with its input position
    (POSITION), into bucket rows (`bucket_rows`: a BUCKET column, equal for every two rows
    that may be in one group), brings each bucket to one call of `bucket_edges`, and hands
    the components of the edges to `set_groups`. A method that needs a model first
    (`sample_rate` not None) is fitted on the rows `sample_rows` picks (`fit`). Then it
    brings the `member_columns` of the rows in groups to `set_members`.
    """

    bucket_columns: tuple[str, ...]  # key columns that then need no scan in input order
    bucket_inputs: tuple[str, ...]  # columns `bucket_rows` reads

    def fanout(self) -> int:
        """Bucket rows per key row (hash chunks, LSH bands)."""
        ...

    def bucket_rows(self, keys: pa.Table, buckets: int) -> pa.Table:
        """Rows for the groupby, from key rows: each with its POSITION and BUCKET."""
        ...

    def bucket_edges(self, bucket: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """The edges (input positions) between the rows of one bucket that are in one group."""
        ...

    def set_groups(self, n: int, positions: np.ndarray, labels: np.ndarray) -> None:
        """The rows in groups of two or more and their group labels (of `n` rows)."""
        ...

    def sample_rate(self) -> float | None:
        """Share of the rows a model is fitted on before `bucket_rows`; None: no model."""
        ...

    def sample_rows(self, keys: pa.Table, rate: float) -> pa.Table:
        """The rows of `keys` the model is fitted on, at `rate`, with their POSITION."""
        ...

    def fit(self, sample: pa.Table | None) -> None:
        """Fit the model on the `sample_rows` of all key rows, in any order (None: none)."""
        ...


class GlobalStep(Step):
    """A step that must see every row first: pass 1 scans small keys, pass 2 streams.

    The engine runs pass 1 (`keys` where the batches are, `scan` in input order, then
    `finish_scan`), the middle pass (`gather`) if any, calls `seek` and streams pass 2.
    An engine that spreads pass 1 over workers may instead decide with a distributed sort
    (when `sort_order` is not None: `wanted`, `set_cut`) or groupby (when `bucketed` is not
    None); the hooks say what to compute, the engine how.
    """

    scan_columns: tuple[str, ...] = ()

    @property
    def light_keys(self) -> bool:
        """Whether `keys` works on column values only (as `light` for the whole step): on Ray,
        pass 1 over a small input then computes in the driver process. A step whose pass 2
        decodes media may still have light keys (mixup's: ids)."""
        return self.light

    def keys(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Pass 1, where the batch is (a Ray worker): what `scan` needs of a batch of the
        `scan_columns` (hashes, not media). A pure function of the batch."""
        return batch

    def scan(self, batch: pa.RecordBatch) -> None:
        """Pass 1, in order, in one place: remember the output of `keys` for one batch."""
        raise NotImplementedError

    def finish_scan(self) -> None:
        """Between the passes: decide (e.g. compute a threshold or the duplicate set)."""

    def sort_order(self) -> list[tuple[str, str]] | None:
        """The order ((key column, "ascending" or "descending"), ...) of the `keys` rows in
        which the first `wanted(n)` decide pass 1 (`set_cut`); None: not decided that way."""
        return None

    def wanted(self, n: int) -> int:
        """How many of `n` rows, in `sort_order`, pass 1 keeps."""
        raise NotImplementedError

    def set_cut(self, n: int, last: dict | None) -> None:
        """Decide pass 1 from the `wanted(n)`-th of `n` key rows in `sort_order` (`last`, a
        dict of its columns), instead of `scan` + `finish_scan`; None when that is 0 or n."""
        raise NotImplementedError

    def bucketed(self) -> Bucketed | None:
        """Groups that a groupby on buckets may find instead of the scan (the rest of the key
        columns are then scanned in order, then `finish_scan`); None: not done that way."""
        return None

    def gather_columns(self) -> list[str] | None:
        """Columns for an optional middle pass after `finish_scan()` (mixup: partner rows)."""
        return None

    def gather(self, batches: Iterable[pa.RecordBatch]) -> None:
        """The middle pass over `gather_columns()`, when there is one."""

    def seek(self, rows: int) -> None:
        """Pass 2's next batch starts after `rows` input rows: called before the first batch
        of pass 2 (a resumed run starts late) and, where batches run apart (Ray workers),
        before each. Nothing to do for a pass 2 that needs no position (the default)."""
