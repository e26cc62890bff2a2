"""Export a dataset to WebDataset tars, JSONL shards with a media folder, or a media folder.

`ExportSink` is an output like a dataset directory, driven by the same run lifecycle: it
takes the output lock, writes each shard under a temporary name and renames it into place
durably, records how far the input was consumed after each shard (the commit), resumes
after the last commit when rerun, refuses an output that another command, input or format
made (`--overwrite`), and writes `_export.json` last. Every sample keeps its id (the key,
made safe for file names, and in its metadata), every other column (scalars in JSON,
embeddings as `.npy` members in tars and as lists in JSON) and its media bytes, so that
`mmtools ingest ... --id-col id` reads the export back.
"""

from __future__ import annotations

import io
import os
import re
import tarfile

import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import DriftError, UsageError, uninterrupted
from mmtools.io import layout as L
from mmtools.io.dataset import Position
from mmtools.io.fs import is_remote, store
from mmtools.io.jsonout import dumps
from mmtools.io.manifest import fsync_path, schema_text, versions
from mmtools.media import MediaError, read, sniff_format

FORMATS = ("webdataset", "jsonl", "folder")
MANIFEST = L.EXPORT_MANIFEST  # written last: the export is complete
MEDIA_DIR = "media"  # the jsonl format's media files
FILE = "file"  # a jsonl row's media file, relative to the shard
_EXT = {"jpeg": "jpg", "bytes": "bin", "riff": "bin"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
MAX_KEY = 200  # characters; file names stop at 255 bytes


def sample_key(sample_id: str | None, row: int) -> str:
    """The id as a key that is a safe file or tar member name: every character but letters,
    digits, `_` and `-` is %-escaped (as UTF-8 bytes), so no two ids share a key and the
    key has no `.` (WebDataset splits a member name at its first dot) and no `/`; a leading
    `_` too, so that no sample's file is taken for the export's own (`_export.json`)."""
    if not sample_id:
        return f"_row{row:09d}"
    key = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), sample_id)
    if key.startswith("_"):
        key = "%5F" + key[1:]
    if len(key) > MAX_KEY:
        import hashlib

        key = key[: MAX_KEY - 21] + "_" + hashlib.sha1(sample_id.encode()).hexdigest()[:20]
    return key


def extension(data: bytes) -> str:
    """The file extension of media bytes, from their format."""
    kind = sniff_format(data)
    return _EXT.get(kind, kind)


def is_embedding(t: pa.DataType) -> bool:
    """A fixed-size list of floats: written as `.npy` in tars, as a list in JSON."""
    return pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)


def media_of(row: dict) -> tuple[str, bytes]:
    """The row's first media cell that holds bytes or a path, read; else `no_media`."""
    for kind in C.MEDIA:
        m = row.get(kind)
        if m and (m.get("bytes") is not None or m.get("path")):
            return kind, read(m, kind)
    raise MediaError("no_media", "the row holds no media bytes and no path")


def metadata(row: dict, schema: pa.Schema, embeddings: bool) -> dict:
    """A row's columns as JSON values: all but the media (and the embeddings, unless asked);
    binary cells are null."""
    out = {}
    for f in schema:
        if f.name in C.MEDIA or (is_embedding(f.type) and not embeddings):
            continue
        v = row.get(f.name)
        out[f.name] = None if isinstance(v, bytes) else v
    return out


def _json(obj) -> bytes:
    """Strict JSON (other readers refuse NaN): a NaN or infinite number is written as null."""
    return dumps(obj).encode()


def _npy(values: list, t: pa.DataType) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=t.value_type.to_pandas_dtype()))
    return buf.getvalue()


class _Shard:
    """The shard being written: a tar or a JSONL file under a temporary name, and the media
    files written beside it (jsonl, folder) that its commit makes durable."""

    def __init__(self, directory: str, fmt: str, index: int):
        self.fmt, self.directory = fmt, directory
        self.name = {"webdataset": f"{index:05d}.tar", "jsonl": f"{index:05d}.jsonl"}.get(fmt)
        self.tmp = L.TMP_PREFIX + self.name if self.name else None
        self.files: list[str] = []  # media files written directly (deterministic names)
        self.tar = self.jsonl = None
        if fmt == "webdataset":
            self.tar = tarfile.open(os.path.join(directory, self.tmp), "w")  # noqa: SIM115
        elif fmt == "jsonl":
            os.makedirs(os.path.join(directory, MEDIA_DIR), exist_ok=True)
            self.jsonl = open(os.path.join(directory, self.tmp), "wb")  # noqa: SIM115

    def member(self, name: str, data: bytes) -> None:
        """Add one file to the tar."""
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644  # mtime 0: the same rows, the same bytes
        self.tar.addfile(info, io.BytesIO(data))

    def file(self, name: str, data: bytes) -> None:
        """Write one file beside the shard (a media file or a sidecar)."""
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        self.files.append(path)

    def close(self) -> None:
        """Finish writing (the commit renames it)."""
        for f in (self.tar, self.jsonl):
            if f is not None:
                f.close()
        self.tar = self.jsonl = None

    def sync(self) -> None:
        """Make the files written beside the shard durable (with MMTOOLS_FSYNC, the default)."""
        for path in self.files:
            fsync_path(path)
        for d in {os.path.dirname(p) for p in self.files}:
            fsync_path(d)


class ExportSink:
    """An export directory, written and committed shard by shard; resumable."""

    remote = False

    def __init__(
        self,
        path: str,
        *,
        fmt: str = "webdataset",
        shard_rows: int = 10_000,
        shard_bytes: int = 1 << 30,
        overwrite: bool = False,
        wait_lock: bool = False,
        command: list[str] | None = None,
    ):
        if fmt not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        if is_remote(path):
            raise UsageError(f"export writes a local directory, not {path}")
        self.path, self.fmt = path, fmt
        self.shard_rows, self.shard_bytes = shard_rows, shard_bytes
        self.overwrite, self.command = overwrite, command or []
        self.store = store(path)
        self._lock = self.store.lock(wait_lock)
        self.complete = False
        self.notes: dict[str, int] = {}  # files written, rows without media by reason
        self._shard: _Shard | None = None
        self._taken: set[str] = set()  # the keys of this run
        self._row = 0  # input position of the next sample

    # -- opening and resuming -------------------------------------------------------------

    def open(self, schema: pa.Schema, fingerprint: dict, locate=None) -> Position:
        """Lock the directory; return the input position to resume from."""
        self.store.makedirs()
        self._lock.acquire()
        self.schema, self.fingerprint = schema, {**fingerprint, "format": self.fmt}
        if self.overwrite:
            self._clear()
        manifest, run = self.store.read_json(MANIFEST), self.store.read_json(L.RUN_FILE)
        found = manifest or run
        if found is not None and found.get("fingerprint") != self.fingerprint:
            raise DriftError(
                f"{self.path} holds an export made by a different command, input or format; "
                "use --overwrite to start over or choose another output"
            )
        if manifest is not None:
            self.complete, self.manifest = True, manifest
            return Position(**manifest["position"])
        if run is None:
            self._refuse_foreign()
            self.store.write_json(L.RUN_FILE, {"fingerprint": self.fingerprint})
        self.records = self._load_records()
        self._remove_orphans()
        last = self.records[-1]["position"] if self.records else {}
        self.position = Position(**last)
        self._unit = self._new_unit()
        self._row = self.position.rows
        return Position(**last)

    def _clear(self) -> None:
        for name in self.store.names():
            if name != L.LOCK_FILE:
                path = self.store.path(name)
                if os.path.isdir(path):
                    self.store.rmtree(name)
                else:
                    self.store.unlink(name)

    def _refuse_foreign(self) -> None:
        foreign = [n for n in self.store.names() if n != L.LOCK_FILE]
        if foreign:
            raise UsageError(
                f"output {self.path} is not empty and holds no mmtools export (found "
                f"{foreign[0]}); choose an empty or new directory, or pass --overwrite to "
                "empty it first"
            )

    def _load_records(self) -> list[dict]:
        records = []
        while (
            rec := self.store.read_json(f"{L.PROGRESS_DIR}/{len(records):05d}.json")
        ) is not None:
            records.append(rec)
        return records

    def _remove_orphans(self) -> None:
        """Shards and reject files written after the last commit; temporaries."""
        n = len(self.records)
        for pattern in ("*.tar", "*.jsonl", f"{L.REJECTS_DIR}/*", f"{L.PROGRESS_DIR}/*"):
            for name in self.store.list(pattern):
                index = os.path.basename(name).split(".")[0].removeprefix("part-")
                if index.isdigit() and int(index) >= n:
                    self.store.unlink(name)
        for name in self.store.list(L.TMP_PREFIX + "*") + self.store.list(
            "*/" + L.TMP_PREFIX + "*"
        ):
            self.store.unlink(name)

    def _new_unit(self) -> dict:
        return {"rows": 0, "bytes": 0, "files": 0, "without_media": {}, "rejects": [], "drops": []}

    # -- writing ----------------------------------------------------------------------------

    def write(
        self, batch, rejects, dropped, consumed: Position, generated: int = 0, drops=()
    ) -> None:
        """Write the samples of one input batch; commit the shard when it is full. Reject and
        ledger rows (from a pipe) are kept beside the shards, as a dataset keeps them."""
        unit = self._unit
        if batch is not None and batch.num_rows:
            if self._shard is None:
                self._shard = _Shard(self.path, self.fmt, len(self.records))
            for row in batch.to_pylist():  # one sample, one to three files: per row by nature
                self._sample(row, batch.schema, unit)
            unit["rows"] += batch.num_rows
            unit["bytes"] += batch.nbytes
        unit["rejects"] += [r for r in rejects if r is not None and r.num_rows]
        unit["drops"] += [d for d in drops if d is not None and d.num_rows]
        self.position = consumed
        if unit["rows"] >= self.shard_rows or unit["bytes"] >= self.shard_bytes:
            self._commit()

    def _sample(self, row: dict, schema: pa.Schema, unit: dict) -> None:
        key = sample_key(row.get(C.ID), self._row)
        if key in self._taken:  # ids are unique by contract; never let one file hide another
            key = f"{key}_{self._row:09d}"
        self._taken.add(key)
        self._row += 1
        try:
            _, data = media_of(row)
        except MediaError as e:
            data = None
            unit["without_media"][e.reason] = unit["without_media"].get(e.reason, 0) + 1
        media = None if data is None else f"{key}.{extension(data)}"
        text = row.get(C.TEXT)
        shard, files = self._shard, int(data is not None)
        if self.fmt == "webdataset":
            if data is not None:
                shard.member(media, data)
            if text is not None:
                shard.member(f"{key}.txt", text.encode())
            shard.member(f"{key}.json", _json(metadata(row, schema, embeddings=False)))
            for f in schema:
                if is_embedding(f.type) and row.get(f.name) is not None:
                    shard.member(f"{key}.{f.name}.npy", _npy(row[f.name], f.type))
                    files += 1
            files += 1 + (text is not None)
        elif self.fmt == "jsonl":
            if data is not None:
                shard.file(f"{MEDIA_DIR}/{media}", data)
            line = {
                **metadata(row, schema, embeddings=True),
                FILE: media and f"{MEDIA_DIR}/{media}",
            }
            shard.jsonl.write(_json(line) + b"\n")
        else:
            if data is not None:
                shard.file(media, data)
            if text is not None:
                shard.file(f"{key}.txt", text.encode())
            shard.file(f"{key}.json", _json(metadata(row, schema, embeddings=True)))
            files += 1 + (text is not None)
        unit["files"] += files

    def _commit(self) -> None:
        with uninterrupted():  # SIGTERM/SIGINT wait for the shard's record
            self._commit_unit()

    def _side_file(self, folder: str, index: int, name: str, table: pa.Table) -> None:
        """Write `table` as `name` (reject or ledger rows) under a temporary name, then commit."""
        import pyarrow.parquet as pq

        self.store.makedirs(folder)
        tmp = f"{folder}/{L.TMP_PREFIX}{index:05d}"
        pq.write_table(table, self.store.path(tmp))
        self.store.commit(tmp, name)

    def _commit_unit(self) -> None:
        unit, index = self._unit, len(self.records)
        start = Position(**self.records[-1]["position"]) if self.records else Position()
        if self.position == start and not unit["rows"]:
            return
        shard = rejects = ledger = None
        if self._shard is not None:
            self._shard.close()
            self._shard.sync()
            if self._shard.name:
                shard = self._shard.name
                self.store.commit(self._shard.tmp, shard)
                unit["files"] += 1
            self._shard = None
        if unit["rejects"]:
            rejects = L.rejects_name(index)
            table = pa.Table.from_batches([C.upgrade_rejects(r) for r in unit["rejects"]])
            self._side_file(L.REJECTS_DIR, index, rejects, table)
        if unit["drops"]:
            ledger = L.dropped_name(index)
            self._side_file(L.DROPPED_DIR, index, ledger, pa.Table.from_batches(unit["drops"]))
        record = {
            "shard": shard,
            "rows": unit["rows"],
            "files": unit["files"],
            "without_media": unit["without_media"],
            "rejects": rejects,
            "rejected": sum(r.num_rows for r in unit["rejects"]),
            "ledger": ledger,
            "ledger_rows": sum(d.num_rows for d in unit["drops"]),
            "position": self.position.as_dict(),
        }
        self.store.makedirs(L.PROGRESS_DIR)
        self.store.write_json(f"{L.PROGRESS_DIR}/{index:05d}.json", record)
        self.records.append(record)
        self._unit = self._new_unit()

    def close(self, summary: dict, lineage: list[dict], column_info: dict) -> dict:
        """Commit the last shard and write `_export.json`: the export is complete."""
        with uninterrupted():
            if not self.complete:
                self._commit_unit()
                self.manifest = self._manifest(summary, lineage)
                self.store.write_json(MANIFEST, self.manifest)
                self.complete = True
                self.store.rmtree(L.PROGRESS_DIR)
                self.store.unlink(L.RUN_FILE)
        # for the summary line; _export.json has the rows without media by reason
        self.notes = {
            "files": self.manifest["files"],
            "without_media": sum(self.manifest["without_media"].values()),
        }
        self._lock.release()
        return self.manifest

    def _manifest(self, summary: dict, lineage: list[dict]) -> dict:
        without: dict[str, int] = {}
        for r in self.records:
            for reason, n in r["without_media"].items():
                without[reason] = without.get(reason, 0) + n
        return {
            "format": "mmtools-export/1",
            "export_format": self.fmt,
            "command": self.command,
            "fingerprint": self.fingerprint,
            "versions": versions(),
            "columns": [{"name": f.name, "type": str(f.type)} for f in self.schema],
            "arrow_schema": schema_text(self.schema),  # ingest restores the types
            "rows": sum(r["rows"] for r in self.records),
            "files": sum(r["files"] for r in self.records),
            "shards": [r["shard"] for r in self.records if r["shard"]],
            "without_media": without,
            "rejects": {
                "rows": sum(r["rejected"] for r in self.records),
                "shards": [r["rejects"] for r in self.records if r["rejects"]],
            },
            "ledger": {
                "rows": sum(r.get("ledger_rows", 0) for r in self.records),
                "shards": [r["ledger"] for r in self.records if r.get("ledger")],
            },
            "position": self.records[-1]["position"] if self.records else vars(Position()),
            "summary": summary,
            "lineage": lineage,
        }

    def abort(self) -> None:
        """Drop the shard being written; committed shards stay for the rerun to resume after."""
        if self._shard is not None:
            self._shard.close()
            if self._shard.tmp:
                self.store.unlink(self._shard.tmp)
            self._shard = None
        self._lock.release()
