"""Dataset output: rolling Parquet shards, atomic commits, resume, rejects and the manifest.

Crash-only design: each commit unit (a data shard, its reject shard and a progress record
naming the input rows it consumed) is written to temporary names and renamed; the progress
record is the unit's commit. `_manifest.json`, written last, marks the dataset complete. A
rerun of the same command reads the progress records and resumes after the last committed
input row; anything written after that (an orphaned shard, a temporary file) is removed.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mmtools import columns as C
from mmtools.errors import DriftError, UsageError, uninterrupted
from mmtools.io import layout as L
from mmtools.io.fs import reaching, store
from mmtools.io.manifest import build_manifest

ROW_GROUP_ROWS = 8192
ROW_GROUP_BYTES = 32 << 20
PAGE_BYTES = 1 << 20  # rows handed to the Parquet encoder at a time: about this many bytes


@dataclass
class Position:
    """How far the input has been consumed: data rows, and the reject and ledger rows received
    from upstream."""

    rows: int = 0
    upstream_rejects: int = 0
    upstream_drops: int = 0

    def as_dict(self) -> dict:
        """As the progress records and the manifest store it."""
        return {
            "rows": self.rows,
            "upstream_rejects": self.upstream_rejects,
            "upstream_drops": self.upstream_drops,
        }

    @classmethod
    def of(cls, record: dict) -> Position:
        """From a stored position (one written before the ledger has no ledger count)."""
        return cls(record["rows"], record["upstream_rejects"], record.get("upstream_drops", 0))


@dataclass
class Unit:
    """The commit unit being written."""

    index: int
    start: Position
    rows: int = 0
    bytes: int = 0
    rejects: list[pa.RecordBatch] = field(default_factory=list)
    drops: list[pa.RecordBatch] = field(default_factory=list)  # ledger rows
    dropped: dict[str, int] = field(default_factory=dict)
    generated: int = 0
    started: float = field(default_factory=time.monotonic)


class DatasetSink:
    """Write a dataset directory: rolling shards, rejects, progress records and the manifest."""

    def __init__(
        self,
        path: str,
        *,
        shard_rows: int = 10_000,
        shard_bytes: int = 1 << 30,
        overwrite: bool = False,
        wait_lock: bool = False,
        command: list[str] | None = None,
    ):
        self.path = path
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.overwrite = overwrite
        self.command = command or []
        self.store = store(path)
        self._lock = self.store.lock(wait_lock)
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
        self.complete = False
        self._base = 0  # index of this run's first commit unit (a retry's come after others)

    @property
    def remote(self) -> bool:
        """True when the dataset is on an object store."""
        return self.store.remote

    # -- opening and resuming -------------------------------------------------------------

    def open(self, schema: pa.Schema, fingerprint: dict, locate=None) -> Position:
        """Lock the directory and return the input position to resume from."""
        with reaching(self.path):
            self.store.makedirs()
            self._lock.acquire()
            try:
                return self._open(schema, fingerprint, locate)
            except BaseException:  # refused (another run's output, foreign files): let go
                self._lock.release()
                raise

    def _open(self, schema: pa.Schema, fingerprint: dict, locate) -> Position:
        self.schema = schema
        self.fingerprint = fingerprint
        self._locate = locate or (lambda start, end: [])
        if self.overwrite:
            self._clear()
        manifest = self.store.read_json(L.MANIFEST)
        run = self.store.read_json(L.RUN_FILE)
        found = manifest or run
        if found is not None and found.get("fingerprint") != fingerprint:
            raise DriftError(
                f"{self.path} was made by a different command, input or model "
                f"({_first_difference(found.get('fingerprint'), fingerprint)}); "
                "use --overwrite to start over or choose another output"
            )
        if manifest is not None:
            self.complete = True
            self.manifest = manifest
            self._finish_cleanup()
            return Position.of(manifest["position"])
        if run is None:
            self._refuse_foreign()
            self.store.write_json(L.RUN_FILE, {"fingerprint": fingerprint, "command": self.command})
        return self._resume()

    def _resume(self) -> Position:
        """Load this run's committed units, drop what came after them; where to go on from."""
        self.records = self._load_records()
        self._remove_orphans()
        pos = Position.of(self.records[-1]["position"]) if self.records else Position()
        self._unit = Unit(self._base + len(self.records), pos)
        self.position = Position.of(pos.as_dict())
        return pos

    def _clear(self) -> None:
        for pattern in ("part-*.parquet", L.MANIFEST, L.RUN_FILE, L.TMP_PREFIX + "*"):
            for name in self.store.list(pattern):
                self.store.unlink(name)
        for d in (L.PROGRESS_DIR, L.REJECTS_DIR, L.DROPPED_DIR):
            self.store.rmtree(d)

    def _refuse_foreign(self) -> None:
        # A run killed while writing its first file leaves only that file's temporary.
        ours = (L.LOCK_FILE, L.CACHE_DIR, L.TMP_PREFIX + L.RUN_FILE)
        foreign = [n for n in self.store.names() if n not in ours]
        if foreign:
            raise UsageError(
                f"output {self.path} is not empty and holds no mmtools run "
                f"(found {foreign[0]}); choose an empty or new directory, or pass --overwrite"
            )

    def _load_records(self) -> list[dict]:
        records = []
        while (
            rec := self.store.read_json(f"{L.PROGRESS_DIR}/{self._base + len(records):05d}.json")
        ) is not None:
            records.append(rec)
        return records

    def _kept(self) -> set[str]:
        """Files committed before this run (none; a retry keeps the finished dataset's)."""
        return set()

    def _remove_orphans(self) -> None:
        keep = self._kept() | {r["shard"] for r in self.records if r["shard"]}
        keep |= {r["rejects"] for r in self.records if r["rejects"]}
        keep |= {r["drops"] for r in self.records if r.get("drops")}
        names = self.store.list("part-*.parquet") + self.store.list(L.REJECTS_DIR + "/*")
        for name in names + self.store.list(L.DROPPED_DIR + "/*"):
            if name not in keep:
                self.store.unlink(name)
        for name in self._temporaries():
            self.store.unlink(name)
        n = self._base + len(self.records)
        for name in self.store.list(f"{L.PROGRESS_DIR}/*.json"):
            if int(name.rsplit("/", 1)[-1].split(".")[0]) >= n:
                self.store.unlink(name)

    def _temporaries(self) -> list[str]:
        pattern = L.TMP_PREFIX + "*"
        return self.store.list(pattern) + self.store.list("*/" + pattern)

    # -- writing ----------------------------------------------------------------------------

    def write(
        self,
        batch: pa.RecordBatch | None,
        rejects,
        dropped: dict,
        consumed: Position,
        generated: int = 0,
        drops=(),
    ) -> None:
        """Add one processed input batch (with its ledger rows, `drops`); commit the current
        shard when it is full."""
        unit = self._unit
        if batch is not None and batch.num_rows:
            self._pending.append(batch)
            self._pending_bytes += batch.nbytes
            unit.rows += batch.num_rows
            unit.bytes += batch.nbytes
            if len(self._pending) and (
                sum(b.num_rows for b in self._pending) >= ROW_GROUP_ROWS
                or self._pending_bytes >= ROW_GROUP_BYTES
            ):
                self._flush_pending()
        unit.rejects.extend(r for r in rejects if r is not None and r.num_rows)
        unit.drops.extend(d for d in drops if d is not None and d.num_rows)
        for rule, n in dropped.items():
            unit.dropped[rule] = unit.dropped.get(rule, 0) + n
        unit.generated += generated
        self.position = consumed
        if unit.rows >= self.shard_rows or unit.bytes >= self.shard_bytes:
            self._commit()

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._tmp = L.TMP_PREFIX + L.shard_name(self._unit.index)
            rows = sum(b.num_rows for b in self._pending)
            self._writer = pq.ParquetWriter(
                self.store.path(self._tmp),
                self.schema,
                filesystem=self.store.filesystem(),
                write_batch_size=write_batch_rows(self._pending_bytes / max(rows, 1)),
                use_dictionary=dictionary_columns(self.schema),
                write_statistics=dictionary_columns(self.schema),
            )
        self._writer.write_table(pa.Table.from_batches(self._pending, self.schema))
        self._pending, self._pending_bytes = [], 0

    def _commit(self) -> None:
        with uninterrupted():  # SIGTERM/SIGINT wait for the unit's record
            self._commit_unit()

    def _commit_unit(self) -> None:
        unit = self._unit
        if self.position == unit.start and not unit.rows:
            return
        self._flush_pending()
        shard = rejects_name = drops_name = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            shard = L.shard_name(unit.index)
            self.store.commit(self._tmp, shard)
        if unit.rejects:
            rejects_name = L.rejects_name(unit.index)
            self.store.makedirs(L.REJECTS_DIR)
            tmp = f"{L.REJECTS_DIR}/{L.TMP_PREFIX}{unit.index:05d}"
            rows = [C.upgrade_rejects(r) for r in unit.rejects]
            self._write_table(pa.Table.from_batches(rows, C.REJECT_SCHEMA), tmp)
            self.store.commit(tmp, rejects_name)
        if unit.drops:
            drops_name = L.dropped_name(unit.index)
            self.store.makedirs(L.DROPPED_DIR)
            tmp = f"{L.DROPPED_DIR}/{L.TMP_PREFIX}{unit.index:05d}"
            ledger = pa.Table.from_batches(unit.drops, C.LEDGER_SCHEMA)
            # Ids are unique: a dictionary is only worth it for the step and rule names.
            self._write_table(ledger, tmp, use_dictionary=[C.REJECT_STEP, C.DROP_RULE])
            self.store.commit(tmp, drops_name)
        record = {
            "shard": shard,
            "rows": unit.rows,
            "bytes": self.store.size(shard) if shard else 0,
            "rejects": rejects_name,
            "rejected": sum(r.num_rows for r in unit.rejects),
            "reject_reasons": _reason_counts(unit.rejects),
            "dropped": unit.dropped,
            "drops": drops_name,
            "drop_rows": sum(d.num_rows for d in unit.drops),
            "generated": unit.generated,
            "seconds": round(time.monotonic() - unit.started, 3),
            "inputs": self._locate(unit.start.rows, self.position.rows),
            "position": self.position.as_dict(),
        }
        self.store.makedirs(L.PROGRESS_DIR)
        self.store.write_json(f"{L.PROGRESS_DIR}/{unit.index:05d}.json", record)
        self.records.append(record)
        self._unit = Unit(unit.index + 1, Position.of(self.position.as_dict()))

    def close(self, summary: dict, lineage: list[dict], column_info: dict) -> dict:
        """Commit the last shard and write the manifest: the dataset is complete."""
        with uninterrupted():
            self._complete(summary, lineage, column_info)
        self._lock.release()
        return self.manifest

    def _complete(self, summary: dict, lineage: list[dict], column_info: dict) -> None:
        if not self.complete:
            self._commit()
            if not any(r["shard"] for r in self.records):
                self._write_empty_shard()
            self.manifest = build_manifest(
                self.records,
                self.schema,
                self.fingerprint,
                self.command,
                summary,
                lineage,
                column_info,
                self.position,
            )
            self.store.write_json(L.MANIFEST, self.manifest)
            self.complete = True
            self._finish_cleanup()

    def _finish_cleanup(self) -> None:
        """After the manifest: drop the run's bookkeeping (again, if a kill interrupted it)."""
        self.store.rmtree(L.PROGRESS_DIR)
        for name in [L.RUN_FILE, *self._temporaries()]:
            self.store.unlink(name)

    def _write_empty_shard(self) -> None:
        """A dataset with no rows still gets one (empty) shard: it carries the schema."""
        name = L.shard_name(len(self.records))
        tmp = L.TMP_PREFIX + name
        self._write_table(pa.Table.from_batches([], self.schema), tmp)
        self.store.commit(tmp, name)
        # Only what the manifest reads of a record (the counts it lacks are zero).
        self.records.append(
            {
                "shard": name,
                "rows": 0,
                "bytes": self.store.size(name),
                "inputs": [],
                "rejects": None,
                "reject_reasons": {},
                "dropped": {},
            }
        )

    def abort(self) -> None:
        """Drop the uncommitted shard and release the lock; committed work stays for resume."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                # A store that is gone must not hide the error that stopped the run (exit 4)
                with contextlib.suppress(OSError):
                    self.store.unlink(self._tmp)
        self._lock.release()

    def _write_table(self, table: pa.Table, name: str, **options) -> None:
        pq.write_table(table, self.store.path(name), filesystem=self.store.filesystem(), **options)


def write_batch_rows(row_bytes: float) -> int:
    """Rows the Parquet writer encodes at a time for rows of `row_bytes` bytes. Its default,
    1024, makes one page of a whole row group of images (~100 KB each) and holds it twice
    (plain and compressed) while it is encoded; rows of about PAGE_BYTES at a time keep that
    to a few pages, and write faster."""
    return int(max(1, min(1024, PAGE_BYTES // max(row_bytes, 1))))


def dictionary_columns(schema: pa.Schema) -> bool | list[str]:
    """The columns written with a dictionary and min/max statistics: not embeddings (lists
    of floats) nor media bytes. Their values rarely repeat, yet the writer hashes every one
    of them first (a float16 embedding, with at most 65,536 distinct values, even stays
    dictionary-encoded), and no reader prunes by their minimum element: without both a
    512-d float16 column writes about 6x and reads about 5x faster. Compression stays: on
    such a column it saves little (0.5%) but costs little (3% of the write)."""
    plain = [f.name for f in schema if _no_dictionary(f.type)]
    return [n for n in schema.names if n not in plain] if plain else True


def _no_dictionary(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    lists = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return lists and pa.types.is_floating(t.value_type)


def read_rejects(path: str) -> pa.Table | None:
    """The reject rows of a dataset directory in the current schema (shards written before
    rejects carried their source read with a null source), or None when it has none."""
    st = store(path)
    names = sorted(st.list(L.REJECTS_DIR + "/part-*.parquet"))
    tables = [
        C.upgrade_rejects(pq.read_table(st.path(n), filesystem=st.filesystem())) for n in names
    ]
    return pa.concat_tables(tables) if tables else None


def read_dropped(path: str) -> pa.Table | None:
    """The drop ledger of a dataset directory (`_dropped/`), or None when it has none."""
    st = store(path)
    names = sorted(st.list(L.DROPPED_DIR + "/part-*.parquet"))
    tables = [pq.read_table(st.path(n), filesystem=st.filesystem()) for n in names]
    return pa.concat_tables(tables) if tables else None


def _reason_counts(rejects: list[pa.RecordBatch]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rejects:
        for reason in r.column(C.REJECT_REASON).to_pylist():
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def _first_difference(old, new) -> str:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "unknown format"
    for key in ("command", "params", "inputs", "input_schema"):
        if old.get(key) != new.get(key):
            if key == "params" and isinstance(old.get(key), dict):
                diff = sorted(
                    k
                    for k in set(old[key]) | set(new[key] or {})
                    if old[key].get(k) != (new[key] or {}).get(k)
                )
                return f"options differ: {', '.join(diff)}"
            return f"{key} differs"
    return "fingerprint differs"
