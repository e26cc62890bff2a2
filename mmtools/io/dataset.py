"""Dataset output: rolling Parquet shards, atomic commits, resume, rejects and the manifest.

Crash-only design: each commit unit (a data shard, its reject shard and a progress record
naming the input rows it consumed) is written to temporary names and renamed; the progress
record is the unit's commit. `_manifest.json`, written last, marks the dataset complete. A
rerun of the same command reads the progress records and resumes after the last committed
input row; anything written after that (an orphaned shard, a temporary file) is removed.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mmtools import columns as C
from mmtools.errors import DriftError, UsageError
from mmtools.io import layout as L
from mmtools.io.lock import DirLock
from mmtools.io.manifest import build_manifest, fsync_path, read_json, write_json_atomic

ROW_GROUP_ROWS = 8192
ROW_GROUP_BYTES = 64 << 20


@dataclass
class Position:
    """How far the input has been consumed: data rows and reject rows received from upstream."""

    rows: int = 0
    upstream_rejects: int = 0


@dataclass
class Unit:
    """The commit unit being written."""

    index: int
    start: Position
    rows: int = 0
    bytes: int = 0
    rejects: list[pa.RecordBatch] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    generated: int = 0


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
        self._lock = DirLock(os.path.join(path, L.LOCK_FILE), wait=wait_lock)
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
        self.complete = False

    # -- opening and resuming -------------------------------------------------------------

    def open(self, schema: pa.Schema, fingerprint: dict, locate=None) -> Position:
        """Lock the directory and return the input position to resume from."""
        os.makedirs(self.path, exist_ok=True)
        self._lock.acquire()
        self.schema = schema
        self.fingerprint = fingerprint
        self._locate = locate or (lambda start, end: [])
        if self.overwrite:
            self._clear()
        manifest = read_json(self._p(L.MANIFEST))
        run = read_json(self._p(L.RUN_FILE))
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
            return Position(manifest["position"]["rows"], manifest["position"]["upstream_rejects"])
        if run is None:
            self._refuse_foreign()
            write_json_atomic(
                self._p(L.RUN_FILE), {"fingerprint": fingerprint, "command": self.command}
            )
        self.records = self._load_records()
        self._remove_orphans()
        last = self.records[-1]["position"] if self.records else {"rows": 0, "upstream_rejects": 0}
        pos = Position(last["rows"], last["upstream_rejects"])
        self._unit = Unit(len(self.records), pos)
        self.position = Position(pos.rows, pos.upstream_rejects)
        return pos

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _clear(self) -> None:
        for pattern in ("part-*.parquet", L.MANIFEST, L.RUN_FILE, L.TMP_PREFIX + "*"):
            for p in glob.glob(self._p(pattern)):
                os.unlink(p)
        for d in (L.PROGRESS_DIR, L.REJECTS_DIR):
            shutil.rmtree(self._p(d), ignore_errors=True)

    def _refuse_foreign(self) -> None:
        foreign = [n for n in os.listdir(self.path) if n not in (L.LOCK_FILE, L.CACHE_DIR)]
        if foreign:
            raise UsageError(
                f"output {self.path} is not empty and holds no mmtools run "
                f"(found {foreign[0]}); choose an empty or new directory, or pass --overwrite"
            )

    def _load_records(self) -> list[dict]:
        records = []
        while (rec := read_json(self._p(f"{L.PROGRESS_DIR}/{len(records):05d}.json"))) is not None:
            records.append(rec)
        return records

    def _remove_orphans(self) -> None:
        keep = {r["shard"] for r in self.records if r["shard"]}
        keep |= {r["rejects"] for r in self.records if r["rejects"]}
        for p in glob.glob(self._p("part-*.parquet")) + glob.glob(self._p(L.REJECTS_DIR + "/*")):
            if os.path.relpath(p, self.path) not in keep:
                os.unlink(p)
        for p in glob.glob(self._p(L.TMP_PREFIX + "*")) + glob.glob(
            self._p("*/" + L.TMP_PREFIX + "*")
        ):
            os.unlink(p)
        n = len(self.records)
        for p in glob.glob(self._p(f"{L.PROGRESS_DIR}/*.json")):
            if int(os.path.basename(p).split(".")[0]) >= n:
                os.unlink(p)

    # -- writing ----------------------------------------------------------------------------

    def write(
        self,
        batch: pa.RecordBatch | None,
        rejects,
        dropped: dict,
        consumed: Position,
        generated: int = 0,
    ) -> None:
        """Add one processed input batch; commit the current shard when it is full."""
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
            self._tmp = self._p(L.TMP_PREFIX + L.shard_name(self._unit.index))
            self._writer = pq.ParquetWriter(self._tmp, self.schema)
        self._writer.write_table(pa.Table.from_batches(self._pending, self.schema))
        self._pending, self._pending_bytes = [], 0

    def _commit(self) -> None:
        unit = self._unit
        if self.position == unit.start and not unit.rows:
            return
        self._flush_pending()
        shard = rejects_name = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            shard = L.shard_name(unit.index)
            _fsync_rename(self._tmp, self._p(shard))
        if unit.rejects:
            rejects_name = L.rejects_name(unit.index)
            os.makedirs(self._p(L.REJECTS_DIR), exist_ok=True)
            tmp = self._p(f"{L.REJECTS_DIR}/{L.TMP_PREFIX}{unit.index:05d}")
            pq.write_table(pa.Table.from_batches(unit.rejects, C.REJECT_SCHEMA), tmp)
            _fsync_rename(tmp, self._p(rejects_name))
        record = {
            "shard": shard,
            "rows": unit.rows,
            "bytes": os.path.getsize(self._p(shard)) if shard else 0,
            "rejects": rejects_name,
            "rejected": sum(r.num_rows for r in unit.rejects),
            "reject_reasons": _reason_counts(unit.rejects),
            "dropped": unit.dropped,
            "generated": unit.generated,
            "inputs": self._locate(unit.start.rows, self.position.rows),
            "position": {
                "rows": self.position.rows,
                "upstream_rejects": self.position.upstream_rejects,
            },
        }
        os.makedirs(self._p(L.PROGRESS_DIR), exist_ok=True)
        write_json_atomic(self._p(f"{L.PROGRESS_DIR}/{unit.index:05d}.json"), record)
        self.records.append(record)
        self._unit = Unit(
            unit.index + 1, Position(self.position.rows, self.position.upstream_rejects)
        )

    def close(self, summary: dict, lineage: list[dict], column_info: dict) -> dict:
        """Commit the last shard and write the manifest: the dataset is complete."""
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
            write_json_atomic(self._p(L.MANIFEST), self.manifest)
            shutil.rmtree(self._p(L.PROGRESS_DIR), ignore_errors=True)
            os.unlink(self._p(L.RUN_FILE))
            self.complete = True
        self._lock.release()
        return self.manifest

    def _write_empty_shard(self) -> None:
        """A dataset with no rows still gets one (empty) shard: it carries the schema."""
        name = L.shard_name(len(self.records))
        tmp = self._p(L.TMP_PREFIX + name)
        pq.write_table(self.schema.empty_table(), tmp)
        _fsync_rename(tmp, self._p(name))
        self.records.append(
            {
                "shard": name,
                "rows": 0,
                "bytes": os.path.getsize(self._p(name)),
                "rejects": None,
                "rejected": 0,
                "reject_reasons": {},
                "dropped": {},
                "generated": 0,
                "inputs": [],
                "position": self.records[-1]["position"]
                if self.records
                else {"rows": 0, "upstream_rejects": 0},
            }
        )

    def abort(self) -> None:
        """Drop the uncommitted shard and release the lock; committed work stays for resume."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                if os.path.exists(self._tmp):
                    os.unlink(self._tmp)
        self._lock.release()


def _reason_counts(rejects: list[pa.RecordBatch]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rejects:
        for reason in r.column(C.REJECT_REASON).to_pylist():
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def _fsync_rename(tmp: str, final: str) -> None:
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(os.path.dirname(final) or ".")


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
