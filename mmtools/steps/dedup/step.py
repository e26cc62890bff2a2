"""`Dedup`: drop or mark duplicate rows found by exact, perceptual, MinHash or semantic keys.

Pass 1 keeps only keys (ids, the keep-rule column, hashes, captions, embeddings); between
the passes each method, in the order given, groups the rows the previous methods kept and
the keep rule picks one row per group; pass 2 streams the rows and drops or marks them.

Each duplicate is tied to the row kept in its place by the method that found it, with how
close the two are (`DedupMethod.values`: pHash bits apart, caption Jaccard similarity,
embedding cosine similarity; none for exact keys): in its ledger row when dropped, in the
dup_method, dup_kept_id and dup_value columns with --mark.

With an index (`--index DIR`, `index.py`), the key rows of every row kept by earlier runs
join pass 1 after the input's, ranked before all of them whatever the keep rule: a row that
matches one is a duplicate of it, and such rows are never output. The keys of the rows this
run keeps are staged in the index before the output commits and made part of it after.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C
from mmtools.errors import DataContractError, UsageError
from mmtools.step import BUCKET, POSITION, GlobalStep, Result, concat_rows, rejects_at
from mmtools.steps.dedup.groups import cluster_ids, keep_best, parse_keep, priority
from mmtools.steps.dedup.method import DedupMethod

METHODS = ("exact", "phash", "minhash", "semantic")
ALIVE, REJECTED = -1, -2
MARKS = (C.DUP_CLUSTER, C.IS_DUPLICATE, C.DUP_METHOD, C.DUP_KEPT_ID, C.DUP_VALUE)
log = logging.getLogger("mmtools")


@dataclass
class DedupConfig:
    """Options of `Dedup`; all of them change the output."""

    methods: tuple[str, ...] = ("exact",)
    keep: str = "first"
    mark: bool = False
    exact_key: str = "auto"
    max_distance: int = 10
    phash_flip: bool = False
    threshold: float = 0.6
    num_perm: int = 128
    shingle: int = 2
    eps: float = 0.05
    clusters: int | None = None
    column: str = C.IMAGE_EMBEDDING
    seed: int = 0
    index: str | None = None
    index_wait: bool = False  # wait for another run holding the index (--wait-lock)

    def check(self) -> None:
        """Raise a usage error for an impossible option value."""
        if not self.methods:
            raise UsageError("give at least one --method")
        if bad := [m for m in self.methods if m not in METHODS]:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, not {bad[0]!r}")
        if len(set(self.methods)) != len(self.methods):
            raise UsageError("each --method may be given once")
        parse_keep(self.keep)
        if not 0 <= self.max_distance <= 32:
            raise UsageError("--max-distance must be between 0 and 32 bits")
        if not 0.0 < self.threshold <= 1.0:
            raise UsageError("--threshold must be in (0, 1]")
        if not 0.0 <= self.eps < 1.0:
            raise UsageError("--eps must be in [0, 1)")
        if (
            self.num_perm < 2
            or self.shingle < 1
            or (self.clusters is not None and self.clusters < 1)
        ):
            raise UsageError("--num-perm must be >= 2, --shingle and --clusters >= 1")


def _method(name: str, c: DedupConfig) -> DedupMethod:
    from mmtools.steps.dedup import exact, minhash, phash, semantic

    if name == "exact":
        return exact.Exact(c.exact_key)
    if name == "phash":
        return phash.PHash(c.max_distance, flip=c.phash_flip)
    if name == "minhash":
        return minhash.MinHashText(c.threshold, c.num_perm, c.shingle, c.seed)
    return semantic.Semantic(c.column, c.eps, c.clusters, c.seed)


class Dedup(GlobalStep):
    """Find duplicate groups, keep one row of each by the keep rule, drop or mark the rest."""

    name = "dedup"
    transient = ("_seen",)

    def __init__(self, config: DedupConfig):
        super().__init__(config)
        config.check()
        self.keep_mode, self.keep_column = parse_keep(config.keep)
        self.methods = [_method(m, config) for m in config.methods]
        for method in self.methods:
            method.for_index = bool(config.index)
        self.requires = (C.ID,) + ((self.keep_column,) if self.keep_column else ())
        self.scan_columns = self.requires
        self.stats: dict[str, dict[str, int]] = {}
        self._ids: list = []
        self._values: list = []
        self._n = 0
        self._pos: int | None = None
        self._seen = None  # the open index (--index), in the driving process
        self._key_rows: list[pa.RecordBatch] = []  # pass-1 keys, staged for the index
        self._seen_ids = pa.array([], pa.large_string())

    @property
    def light(self) -> bool:  # type: ignore[override]
        """No method decodes media (pHash does)."""
        return all(m.light for m in self.methods)

    def params(self) -> dict:
        """The options, JSON-ready, for the resume fingerprint."""
        out = {**super().params(), "methods": list(self.config.methods)}
        out.pop("index_wait")
        return out

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The input schema, plus dup_cluster and is_duplicate with --mark."""
        if self.keep_column:
            C.require_named(schema, [self.keep_column], "--keep")
        C.require(schema, self.requires, self.name)
        if self.keep_column and not _orderable(schema.field(self.keep_column).type):
            raise DataContractError(
                f"--keep column {self.keep_column} is "
                f"{schema.field(self.keep_column).type}, which has no order"
            )
        if self.keep_column:
            self._keep_type = schema.field(self.keep_column).type
        needed = list(self.requires)
        for method in self.methods:
            needed += method.bind(schema)
            method.values_wanted = self._tied
        self.settings = self._index_settings(schema)
        self.scan_columns = tuple(dict.fromkeys(needed))
        if not self.config.mark:
            return schema
        kept = [f for f in schema if f.name not in MARKS]
        types = (pa.int64(), pa.bool_(), pa.string(), pa.string(), pa.float64())
        extra = [pa.field(name, t) for name, t in zip(MARKS, types, strict=True)]
        return pa.schema(kept + extra, metadata=schema.metadata)

    @property
    def _tied(self) -> bool:
        """Whether each duplicate's kept row and closeness are wanted (ledger or --mark)."""
        return self.ledger or self.config.mark

    def column_info(self) -> dict:
        """Provenance of the mark columns: the methods and options that made them."""
        if not self.config.mark:
            return {}
        info = {"step": self.name, **self.params()}
        return dict.fromkeys(MARKS, info)

    # -- the index (--index) -----------------------------------------------------------------

    def _index_settings(self, schema: pa.Schema) -> dict:
        """What every key in an index must have been made with: an index built otherwise
        is refused (exit 6)."""
        c = self.config
        out: dict = {"methods": list(c.methods)}
        for m in self.methods:
            if m.name == "exact":
                out["exact"] = {"fields": list(m.fields)}
            elif m.name == "phash":
                out["phash"] = {"max_distance": c.max_distance, "flip": c.phash_flip}
            elif m.name == "minhash":
                keys = ("threshold", "num_perm", "shingle", "seed")
                out["minhash"] = {k: getattr(c, k) for k in keys}
            else:
                made = C.column_info(schema).get(c.column, {})
                out["semantic"] = {
                    "column": c.column,
                    "eps": c.eps,
                    "dim": schema.field(c.column).type.list_size,
                    "model": made.get("model"),
                }
        return out

    def begin(self, output: str, run: str) -> None:
        """Open the index (lock, check its settings, repair a killed run's generation)."""
        if not self.config.index:
            return
        from mmtools.io.fs import is_remote
        from mmtools.steps.dedup.index import SeenIndex

        local = output != "-" and not is_remote(output)
        self._output = os.path.abspath(output) if local else output
        self._run = run
        self._seen = SeenIndex(self.config.index, self.config.index_wait).open(self.settings)

    def end(self, committed: bool) -> None:
        """After the output committed, add this run's kept keys to the index; let it go."""
        if self._seen is None:
            return
        try:
            if committed:
                self._seen.promote()
        finally:
            self._seen.close()
            self._seen = None

    def _scan_index(self) -> int:
        """Scan the index's key rows after the input's; return how many there are."""
        table = self._seen.load(skip_output=self._output)
        if table is None:
            return 0
        self._seen_ids = table.column(C.ID).cast(pa.large_string()).combine_chunks()
        offset, model = self._n, self._seen.model()
        for method in self.methods:
            method.index_from, method.index_model = offset, model
        for batch in table.to_batches(max_chunksize=65536):
            for method in self.methods:
                method.scan(batch, offset)
            offset += batch.num_rows
        return table.num_rows

    def _stage(self) -> None:
        """Stage the keys of the rows this run keeps, before its output commits."""
        kept = pa.array(self._state[: self._n] == ALIVE)
        if self._key_rows:
            rows = pa.Table.from_batches(self._key_rows).filter(kept)
        else:
            rows = pa.table({C.ID: pa.array([], pa.string())})
        if self.keep_column and self.keep_column != C.ID:
            rows = rows.drop_columns([self.keep_column])
        rows = self.index_rows(rows)
        self._key_rows = []
        fitted = [m.fitted_model for m in self.methods if m.fitted_model is not None]
        modelled = any(m.modelled for m in self.methods)
        self._seen.stage(rows, self._output, self._run, fitted[0] if fitted else None, modelled)

    def index_rows(self, rows: pa.Table) -> pa.Table:
        """Key rows as a dedup index keeps them: with the columns each method keeps there
        instead of (or beside) its keys (`index_columns`)."""
        for method in self.methods:
            for name, column in method.index_columns(rows).items():
                rows = rows.drop_columns([name]) if name in rows.column_names else rows
                rows = rows.append_column(name, column) if column is not None else rows
        return rows

    # -- pass 1 ----------------------------------------------------------------------------

    def keys(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The ids, the keep-rule values and each method's keys (hashes, not media) of `batch`."""
        cols = {n: batch.column(n) for n in self.requires}
        for method in self.methods:
            cols |= method.keys(batch)
        return pa.RecordBatch.from_pydict(cols)

    def scan(self, batch: pa.RecordBatch) -> None:
        """Remember the ids, the keep-rule values and each method's keys of `batch`."""
        self._ids.append(batch.column(C.ID).cast(pa.large_string()))
        if self._seen is not None:  # the keys alone, without an engine's own columns
            engine = [n for n in (POSITION, BUCKET) if n in batch.schema.names]
            self._key_rows.append(batch.drop_columns(engine) if engine else batch)
        if self.keep_column:
            self._values.append(batch.column(self.keep_column))
        for method in self.methods:
            method.scan(batch, self._n)
        self._n += batch.num_rows

    def finish_scan(self) -> None:
        """Run each method on the rows still kept, apply the keep rule, number the clusters."""
        n = self._n
        seen = self._scan_index() if self._seen is not None else 0
        self._ids = pa.chunked_array(self._ids, pa.large_string()).combine_chunks()
        values = pa.chunked_array(self._values, self._keep_type) if self.keep_column else None
        prio = priority(pa.chunked_array([self._ids]), values, self.keep_mode)
        prio = np.r_[prio, np.arange(seen, dtype=np.int64) - seen]  # earlier runs' rows win
        self._values = []
        total = n + seen
        self._state = np.full(total, ALIVE, dtype=np.int8)
        self._rejects: dict[int, tuple[str, str]] = {}
        # Per row: the row kept instead of a duplicate (-1: none) and how close it is.
        self._kept = np.full(total if self._tied else 0, -1, dtype=np.int64)
        self._value = np.full(total if self._tied else 0, np.nan)
        members, keepers = [], []
        for k, method in enumerate(self.methods):
            for pos, why in method.failures.items():
                if self._state[pos] == ALIVE:
                    self._state[pos], self._rejects[pos] = REJECTED, why
            active = np.flatnonzero(self._state == ALIVE)
            grouping = keep_best(method.labels(active), prio[active])
            if self._tied:
                dropped = np.flatnonzero(grouping.drop)
                at, kept = active[dropped], active[grouping.keeper[dropped]]
                self._kept[at], self._value[at] = kept, method.values(at, kept)
            method.release()
            self._state[active[grouping.drop]] = k
            members.append(active[grouping.members])
            keepers.append(active[grouping.keepers])
            ours = grouping.drop & (active < n)  # the index's own rows are never output
            self.stats[method.name] = {
                "clusters": grouping.groups,
                "duplicates": int(ours.sum()),
            }
            if seen:
                earlier = int((ours & (active[np.maximum(grouping.keeper, 0)] >= n)).sum())
                self.stats[method.name]["of_earlier_runs"] = earlier
            log.info(
                "dedup %s: %d clusters, %d duplicate rows",
                method.name,
                grouping.groups,
                int(ours.sum()),
            )
        if self.config.mark:
            self._cluster = cluster_ids(total, np.concatenate(members), np.concatenate(keepers))
        if self._seen is not None:
            self._stage()

    def bucketed(self) -> DedupMethod | None:
        """The first method, whose groups a groupby on buckets may find (its keys never in one
        place); the ids, keep-rule values and the other methods' keys are scanned in order.
        None with an index: its keys are on the driver, so the keys come there too."""
        return None if self.config.index else self.methods[0]

    # -- pass 2 ----------------------------------------------------------------------------

    def seek(self, rows: int) -> None:
        """The next pass-2 batch starts after `rows` input rows (a resumed run, a Ray worker)."""
        self._pos = rows

    def process(self, batch: pa.RecordBatch) -> Result:
        """Drop (or mark) the duplicates of `batch` and reject the rows no method could key."""
        ids = batch.column(C.ID).cast(pa.large_string())
        start = self._locate(ids)
        state = self._state[start : start + batch.num_rows]
        rejected = np.flatnonzero(state == REJECTED)
        rejects = None
        if len(rejected):
            why = {int(i): self._rejects[start + int(i)] for i in rejected}
            rejects = rejects_at(self.name, batch, rejected, why)
        if self.config.mark:
            keep = state != REJECTED
            out = batch.filter(pa.array(keep))
            return Result(self._marked(out, state[keep], start, keep), rejects)
        dropped = {m.name: int((state == k).sum()) for k, m in enumerate(self.methods)}
        out = batch.filter(pa.array(state == ALIVE))
        drops = None
        if self.ledger and out.num_rows < batch.num_rows - len(rejected):
            kept, value = self._ties(start, batch.num_rows)
            drops = concat_rows(
                *(
                    self.drop_rows(batch, state == k, m.name, value, kept)
                    for k, m in enumerate(self.methods)
                )
            )
        return Result(out, rejects, {k: v for k, v in dropped.items() if v}, drops=drops)

    def _ties(self, start: int, rows: int) -> tuple[pa.Array, np.ndarray]:
        """The ids of the rows kept instead of rows [start, start + rows) (null where none)
        and how close each is to it."""
        kept = self._kept[start : start + rows]
        every = pa.chunked_array([self._ids, self._seen_ids], pa.large_string())
        ids = every.take(pa.array(kept, pa.int64(), mask=kept < 0)).combine_chunks()
        ids = ids.cast(pa.string())
        return ids, self._value[start : start + rows]

    def _marked(self, out: pa.RecordBatch, state: np.ndarray, start: int, keep: np.ndarray):
        cluster = self._cluster[start : start + len(keep)][keep]
        kept, value = self._ties(start, len(keep))
        names = [n for n in out.schema.names if n not in MARKS]
        cols = [out.column(n) for n in names]
        cols.append(pa.array(cluster, pa.int64(), mask=cluster < 0))
        cols.append(pa.array(state >= 0, pa.bool_()))
        methods = pa.array([m.name for m in self.methods], pa.string())
        cols.append(methods.take(pa.array(state, pa.int64(), mask=state < 0)))
        cols.append(kept.filter(pa.array(keep)))
        cols.append(pa.array(value[keep], pa.float64(), from_pandas=True))
        return pa.RecordBatch.from_arrays(cols, names=[*names, *MARKS])

    def _locate(self, ids: pa.Array) -> int:
        """Input position of this batch's first row, checked against the ids of pass 1."""
        if self._pos is None:
            self._pos = self._align(ids)
        start, self._pos = self._pos, self._pos + len(ids)
        if start + len(ids) > len(self._ids) or not self._ids.slice(start, len(ids)).equals(ids):
            raise DataContractError("the input changed between dedup's two passes; rerun dedup")
        return start

    def _align(self, ids: pa.Array) -> int:
        # The engine does not tell a step where a resumed pass 2 starts: find the batch's ids.
        if len(ids) == 0 or self._ids.slice(0, len(ids)).equals(ids):
            return 0
        hits = np.flatnonzero(pc.equal(self._ids, ids[0]).to_numpy(zero_copy_only=False))
        found = [int(p) for p in hits if self._ids.slice(p, len(ids)).equals(ids)]
        if len(found) > 1:
            log.warning(
                "dedup: resumed at one of %d places with the same ids; took the first", len(found)
            )
        return found[0] if found else 0


def _orderable(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_temporal(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
    )


__all__ = ["METHODS", "Dedup", "DedupConfig"]
