"""Dataset input: a dataset directory, Parquet files, a glob, or `-` (an Arrow stream on stdin)."""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from mmtools.errors import DataContractError, UsageError
from mmtools.io.layout import MANIFEST, RUN_FILE
from mmtools.io.manifest import read_json
from mmtools.io.stream import read_stream


@dataclass(frozen=True)
class Shard:
    """One Parquet input file."""

    path: str
    rows: int
    size: int
    mtime_ns: int


def resolve(inputs: list[str]) -> list[str]:
    """Expand directories and globs to a sorted list of Parquet files; `-` stays `-`."""
    if inputs == ["-"]:
        return ["-"]
    if "-" in inputs:
        raise UsageError("'-' (standard input) cannot be combined with other inputs")
    paths: list[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            paths.extend(_dataset_files(spec))
        elif os.path.isfile(spec):
            paths.append(spec)
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise UsageError(f"no file matches {spec}")
            paths.extend(found)
        else:
            raise UsageError(f"input {spec} does not exist")
    return paths


def _dataset_files(directory: str) -> list[str]:
    manifest = os.path.join(directory, MANIFEST)
    if os.path.exists(manifest):
        with open(manifest) as f:
            shards = json.load(f)["shards"]
        return [os.path.join(directory, s["name"]) for s in shards]
    if os.path.exists(os.path.join(directory, RUN_FILE)):
        raise DataContractError(
            f"{directory} is an incomplete mmtools dataset (no {MANIFEST}): its run is still "
            "going or was interrupted; rerun that command to finish it"
        )
    files = sorted(glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True))
    files = [f for f in files if not os.path.basename(f).startswith(("_", "."))]
    if not files:
        raise UsageError(f"{directory} holds no Parquet files")
    return files


def _schema_diff(a: pa.Schema, b: pa.Schema) -> str:
    parts = []
    if missing := [n for n in a.names if n not in b.names]:
        parts.append(f"missing {', '.join(missing)}")
    if extra := [n for n in b.names if n not in a.names]:
        parts.append(f"extra {', '.join(extra)}")
    for f in b:
        if f.name in a.names and a.field(f.name).type != f.type:
            parts.append(f"{f.name} is {f.type}, was {a.field(f.name).type}")
    return "; ".join(parts) or "column order differs"


class Source:
    """Readable input of record batches with a known schema; resumable by row offset."""

    def __init__(self, inputs: list[str], stdin=None):
        self.paths = resolve(inputs)
        self.upstream: list[dict] = []
        self.on_rejects = lambda rejects: None
        self._spool: str | None = None
        if self.paths == ["-"]:
            self.shards = None
            self._stdin = stdin if stdin is not None else sys.stdin.buffer
            self.schema, self._stream = read_stream(self._stdin, self._rejects, self._end)
        else:
            self.shards, self.schema = self._open_files()
            if len(inputs) == 1 and os.path.isdir(inputs[0]):
                manifest = read_json(os.path.join(inputs[0], MANIFEST)) or {}
                self.upstream = manifest.get("lineage", [])

    def _rejects(self, rejects: pa.RecordBatch) -> None:
        self.on_rejects(rejects)

    def _end(self, trailer: dict) -> None:
        self.upstream = trailer.get("lineage", [])

    def _open_files(self) -> tuple[list[Shard], pa.Schema]:
        shards, schema = [], None
        for path in self.paths:
            try:
                meta = pq.read_metadata(path)
                file_schema = meta.schema.to_arrow_schema()
            except (pa.ArrowException, OSError) as e:
                raise DataContractError(f"{path} is not a readable Parquet file: {e}") from None
            st = os.stat(path)
            shards.append(Shard(path, meta.num_rows, st.st_size, st.st_mtime_ns))
            if schema is None:
                schema = file_schema
            elif not file_schema.remove_metadata().equals(schema.remove_metadata()):
                raise DataContractError(
                    f"schema drift: {path} differs from {self.paths[0]} "
                    f"({_schema_diff(schema, file_schema)}); convert the shards to one schema first"
                )
        return shards, schema

    @property
    def is_stream(self) -> bool:
        """True when reading standard input (a single pass unless spooled)."""
        return self.shards is None and self._spool is None

    @property
    def total_rows(self) -> int | None:
        """Number of rows, when known before reading."""
        return None if self.shards is None else sum(s.rows for s in self.shards)

    def identity(self) -> list:
        """What the input is, for the resume fingerprint."""
        if self.shards is None:
            return ["-"]
        return [[os.path.abspath(s.path), s.size, s.mtime_ns] for s in self.shards]

    def locate(self, start: int, end: int) -> list[dict]:
        """Which input shards (and row ranges in them) rows [start, end) came from."""
        if self.shards is None:
            return [{"shard": "-", "start": start, "end": end}]
        out, offset = [], 0
        for s in self.shards:
            a, b = max(start, offset), min(end, offset + s.rows)
            if a < b:
                out.append(
                    {"shard": os.path.abspath(s.path), "start": a - offset, "end": b - offset}
                )
            offset += s.rows
        return out

    def spool(self) -> None:
        """Copy a stdin stream to a temporary Arrow file so it can be read twice."""
        if not self.is_stream:
            return
        fd, self._spool = tempfile.mkstemp(prefix="mmtools-spool-", suffix=".arrow")
        with os.fdopen(fd, "wb") as f, pa.ipc.new_file(f, self.schema) as w:
            for batch in self._stream:
                w.write_batch(batch)

    def close(self) -> None:
        """Remove the spool file, if any."""
        if self._spool:
            os.unlink(self._spool)
            self._spool = None

    def batches(
        self, columns: list[str] | None = None, batch_size: int = 1024, skip_rows: int = 0
    ) -> Iterator[pa.RecordBatch]:
        """Stream batches of at most `batch_size` rows, starting after `skip_rows` rows."""
        if columns is not None:
            columns = [c for c in self.schema.names if c in columns]
        if self._spool:
            yield from _rebatch(_spooled(self._spool, columns), batch_size, skip_rows)
        elif self.shards is None:
            stream = (b.select(columns) if columns is not None else b for b in self._stream)
            yield from _rebatch(stream, batch_size, skip_rows)
        else:
            for shard in self.shards:
                if skip_rows >= shard.rows:
                    skip_rows -= shard.rows
                    continue
                yield from _read_parquet(shard.path, columns, batch_size, skip_rows)
                skip_rows = 0


def _rebatch(batches, batch_size: int, skip_rows: int) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        if skip_rows >= batch.num_rows:
            skip_rows -= batch.num_rows
            continue
        batch, skip_rows = batch.slice(skip_rows), 0
        for start in range(0, batch.num_rows, batch_size):
            yield batch.slice(start, batch_size)


def _spooled(path: str, columns) -> Iterator[pa.RecordBatch]:
    reader = pa.ipc.open_file(pa.memory_map(path))
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        yield batch.select(columns) if columns is not None else batch


def _read_parquet(path: str, columns, batch_size: int, skip: int) -> Iterator[pa.RecordBatch]:
    try:
        pf = pq.ParquetFile(path)
        groups = []
        for i in range(pf.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if not groups and skip >= n:  # only whole groups before the resume point
                skip -= n
            else:
                groups.append(i)
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns):
            if skip:
                batch, skip = batch.slice(skip), max(0, skip - batch.num_rows)
            if batch.num_rows:
                yield batch.replace_schema_metadata(None)
    except (pa.ArrowException, OSError) as e:
        raise DataContractError(f"cannot read {path}: {e}") from None
