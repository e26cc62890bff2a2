"""Dataset input: a dataset directory, Parquet files, a glob, or `-` (an Arrow stream on stdin)."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import queue
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from mmtools.errors import DataContractError, UsageError
from mmtools.io.fs import is_remote, join, locate, reaching, stat, store
from mmtools.io.layout import MANIFEST, RUN_FILE
from mmtools.io.stream import read_stream
from mmtools.models.device import cpus

READ_BUFFER = 1 << 20  # bytes of a column chunk read from the file at a time
# A batch size chosen by bytes: about this much decoded data per batch. Reading a batch of
# wide rows takes several times its size (levels, page buffers), so a row count that suits
# narrow rows would multiply a wide dataset's peak memory.
BATCH_BYTES = 4 << 20
AUTO_BATCH_ROWS = 8192  # the most rows of a batch sized by bytes
READ_AHEAD_BYTES = 512 << 20  # bytes of input files read ahead of the one being consumed
AHEAD_BATCHES = 8  # decoded batches a file read ahead holds at most


@dataclass(frozen=True)
class Shard:
    """One Parquet input file."""

    path: str
    rows: int
    size: int
    mtime_ns: int


def resolve(inputs: list[str]) -> list[str]:
    """Expand directories and globs to a sorted list of Parquet files; `-` stays `-`.

    Local paths and object-store URIs (s3://bucket/dataset, gs://...) both work.
    """
    if inputs == ["-"]:
        return ["-"]
    if "-" in inputs:
        raise UsageError("'-' (standard input) cannot be combined with other inputs")
    paths: list[str] = []
    for spec in inputs:
        kind = _kind(spec)
        if kind == "dir":
            paths.extend(_dataset_files(spec))
        elif kind == "file":
            paths.append(spec)
        elif glob.has_magic(spec):
            found = _glob(spec)
            if not found:
                raise UsageError(f"no file matches {spec}")
            paths.extend(found)
        else:
            raise UsageError(f"input {spec} does not exist")
    return paths


def _kind(spec: str) -> str | None:
    """'dir', 'file' or None (not there)."""
    if not is_remote(spec):
        return "dir" if os.path.isdir(spec) else "file" if os.path.isfile(spec) else None
    from pyarrow.fs import FileType

    if glob.has_magic(spec):
        return None
    with reaching(spec):
        fs, inner = locate(spec)
        info = fs.get_file_info(inner.rstrip("/"))
    return {FileType.Directory: "dir", FileType.File: "file"}.get(info.type)


def _glob(spec: str) -> list[str]:
    if not is_remote(spec):
        return sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    head = spec[: min(spec.find(c) for c in "*?[" if c in spec)].rsplit("/", 1)[0]
    with reaching(spec):
        names = store(head).files()
    return [join(head, n) for n in names if fnmatch.fnmatchcase(join(head, n), spec)]


def _dataset_files(directory: str) -> list[str]:
    st = store(directory)
    manifest = st.read_json(MANIFEST)
    if manifest is not None:
        return [join(directory, s["name"]) for s in manifest["shards"]]
    if st.exists(RUN_FILE):
        raise DataContractError(
            f"{directory} is an incomplete mmtools dataset (no {MANIFEST}): its run is still "
            "going or was interrupted; rerun that command to finish it"
        )
    files = [
        join(directory, n)
        for n in st.files()
        if n.endswith(".parquet") and not os.path.basename(n).startswith(("_", "."))
    ]
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
        self.on_drops = lambda drops: None
        self.skipped: dict[str, int] = {}
        self._spool: str | None = None
        self.dataset_dir = False  # a single dataset directory (with a manifest, if complete)
        self._column_bytes: dict[str, int] = {}  # decoded bytes per top-level column
        if self.paths == ["-"]:
            self.shards = None
            self._stdin = stdin if stdin is not None else sys.stdin.buffer
            self.schema, self._stream, self._upstream_fp = read_stream(
                self._stdin, self._rejects, self._end, self._drops
            )
        else:
            self.shards, self.schema = self._open_files()
            self.dataset_dir = len(inputs) == 1 and _kind(inputs[0]) == "dir"
            if self.dataset_dir:
                manifest = store(inputs[0]).read_json(MANIFEST) or {}
                self.upstream = manifest.get("lineage", [])

    def _rejects(self, rejects: pa.RecordBatch) -> None:
        self.on_rejects(rejects)

    def _drops(self, drops: pa.RecordBatch) -> None:
        self.on_drops(drops)

    def _end(self, trailer: dict) -> None:
        self.upstream = trailer.get("lineage", [])

    def _open_files(self) -> tuple[list[Shard], pa.Schema]:
        shards, schema = [], None
        for path in self.paths:
            fs, inner = locate(path)
            try:
                meta = pq.read_metadata(inner, filesystem=fs)
                file_schema = meta.schema.to_arrow_schema()
            except (pa.ArrowException, OSError) as e:
                raise DataContractError(f"{path} is not a readable Parquet file: {e}") from None
            shards.append(Shard(path, meta.num_rows, *stat(path)))
            self._count_bytes(meta)
            if schema is None:
                schema = file_schema
            elif not file_schema.remove_metadata().equals(schema.remove_metadata()):
                raise DataContractError(
                    f"schema drift: {path} differs from {self.paths[0]} "
                    f"({_schema_diff(schema, file_schema)}); convert the shards to one schema first"
                )
        return shards, schema

    def _count_bytes(self, meta: pq.FileMetaData) -> None:
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                name = column.path_in_schema.split(".", 1)[0]
                size = column.total_uncompressed_size
                self._column_bytes[name] = self._column_bytes.get(name, 0) + size

    def batch_rows(self, columns: list[str] | None = None, most: int = AUTO_BATCH_ROWS) -> int:
        """Rows per batch that hold about BATCH_BYTES of `columns` (all: None), at most
        `most`; `most` for a stream, whose batches come as the upstream made them."""
        rows = self.total_rows
        if not rows:
            return most
        names = self.schema.names if columns is None else columns
        row_bytes = sum(self._column_bytes.get(n, 0) for n in names) / rows
        return max(1, min(most, int(BATCH_BYTES / max(row_bytes, 1))))

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
            return ["-", self._upstream_fp]  # the upstream run's fingerprint
        return [[_absolute(s.path), s.size, s.mtime_ns] for s in self.shards]

    def locate(self, start: int, end: int) -> list[dict]:
        """Which input shards (and row ranges in them) rows [start, end) came from."""
        if self.shards is None:
            return [{"shard": "-", "start": start, "end": end}]
        out, offset = [], 0
        for s in self.shards:
            a, b = max(start, offset), min(end, offset + s.rows)
            if a < b:
                out.append({"shard": _absolute(s.path), "start": a - offset, "end": b - offset})
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
            todo = []
            for shard in self.shards:
                if skip_rows >= shard.rows:
                    skip_rows -= shard.rows
                    continue
                todo.append((shard, skip_rows))
                skip_rows = 0
            yield from _read_shards(todo, columns, batch_size)


def _absolute(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)


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


def _read_shards(todo: list[tuple[Shard, int]], columns, batch_size: int):
    """The batches of each (shard, rows to skip) of `todo`, in order. Where polars reads the
    files (local, with a list column), the next ones are read ahead in threads: polars decodes
    a row group on one core, so two files read at once take about half the time of one after
    the other. At most one reader per CPU, and READ_AHEAD_BYTES of files ahead of the one being
    consumed; each reader holds at most AHEAD_BATCHES batches besides polars' own row group."""
    local = all(not is_remote(s.path) for s, _ in todo)  # the files share one schema
    if len(todo) < 2 or cpus() < 2 or not local or not _by_polars(todo[0][0].path, columns):
        for shard, skip in todo:
            yield from _read_parquet(shard.path, columns, batch_size, skip)
        return
    readers: deque[_Reader] = deque()
    try:
        for i, (shard, skip) in enumerate(todo):
            readers.append(_Reader(shard, skip, columns, batch_size))
            while readers and not _room(readers, todo[i + 1 :]):
                yield from _drain(readers.popleft(), columns, batch_size)
        while readers:
            yield from _drain(readers.popleft(), columns, batch_size)
    finally:
        for reader in readers:
            reader.stopped.set()


def _room(readers: deque, rest: list) -> bool:
    """Whether another reader may start: a CPU and read-ahead bytes free for the next file."""
    if not rest or len(readers) >= cpus():
        return False
    ahead = sum(r.shard.size for r in list(readers)[1:])
    return ahead + rest[0][0].size <= READ_AHEAD_BYTES


def _drain(reader: _Reader, columns, batch_size: int) -> Iterator[pa.RecordBatch]:
    """The batches of one reader's file, as they come."""
    try:
        read = yield from reader.batches()
    finally:
        reader.stopped.set()
    # all of it, or up to where polars gave up: pyarrow goes on from there and reports it
    fs, inner = locate(reader.shard.path)
    yield from _read_arrow(fs, inner, reader.shard.path, columns, batch_size, reader.skip + read)


class _Reader(threading.Thread):
    """One local file read by polars in a thread; its batches wait in a short queue."""

    def __init__(self, shard: Shard, skip: int, columns, batch_size: int):
        super().__init__(daemon=True, name=f"read {os.path.basename(shard.path)}")
        self.shard, self.skip = shard, skip
        self._args = (shard.path, columns, batch_size, skip)
        self._queue: queue.Queue = queue.Queue(AHEAD_BATCHES)
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        read = 0
        try:
            for batch in _read_local(*self._args):
                read += batch.num_rows
                if not self._put(batch):
                    return
            self._put(read)
        except BaseException as e:  # handed to the consuming thread, which raises it
            self._put(e)

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return True
        return False

    def batches(self) -> Generator[pa.RecordBatch, None, int]:
        """The file's batches; returns how many rows polars read."""
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, int):
                return item
            yield item


def _read_parquet(path: str, columns, batch_size: int, skip: int) -> Iterator[pa.RecordBatch]:
    fs, inner = locate(path)
    if fs is None:
        read = 0
        for batch in _read_local(path, columns, batch_size, skip):
            read += batch.num_rows
            yield batch
        skip += read  # all of it, or up to where the fast reader gave up
    yield from _read_arrow(fs, inner, path, columns, batch_size, skip)


def _by_polars(path: str, columns) -> pa.Schema | None:
    """The schema of `columns` of a local file that polars reads faster than pyarrow: one with
    a list column (an embedding: a dictionary-encoded float16 one decodes about 2x faster) in
    plain types polars gives back exactly; None for other files (no faster there, and polars'
    import alone costs about 35 MiB)."""
    if locate(path)[0] is not None:
        return None
    try:
        schema = pq.read_schema(path).remove_metadata()
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
    except (pa.ArrowException, OSError, KeyError):
        return None
    if not all(_plain(f.type) for f in schema) or not any(_is_list(f.type) for f in schema):
        return None
    return schema


def _read_local(path: str, columns, batch_size: int, skip: int) -> Iterator[pa.RecordBatch]:
    """A local file through polars' reader (see _by_polars), in the file's own Arrow types;
    nothing for other files. It stops at the first error: pyarrow's reader then goes on from
    there and reports it."""
    schema = _by_polars(path, columns)
    if schema is None:
        return
    import polars as pl

    if not hasattr(pl.LazyFrame, "collect_batches"):
        return
    try:
        frame = pl.scan_parquet(path).select(schema.names).slice(skip)
        # polars hands out chunks of its own sizes; batches keep pyarrow's: `batch_size`
        # rows, the last one shorter. Most chunks are already that size and pass as they are:
        # no empty leftover is kept, as joining it to the next chunk would copy every column.
        pending: list[pa.Table] = []
        held = 0
        for chunk in frame.collect_batches(chunk_size=batch_size):
            pending.append(chunk.to_arrow().cast(schema))
            held += pending[-1].num_rows
            if held >= batch_size:
                table = pa.concat_tables(pending).combine_chunks()
                whole = held - held % batch_size
                yield from table.slice(0, whole).to_batches(batch_size)
                held -= whole
                pending = [table.slice(whole)] if held else []
        if held:
            yield from pa.concat_tables(pending).combine_chunks().to_batches(batch_size)
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError):
        return


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _plain(t: pa.DataType) -> bool:
    """Read back by polars exactly: numbers, booleans, text, bytes, lists of those."""
    if _is_list(t):
        return _plain(t.value_type)
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    )


def _read_arrow(fs, inner: str, path: str, columns, batch_size: int, skip: int):
    try:
        # A buffered stream of each column chunk, not the whole row group read up front:
        # on a 250 MB row group of embeddings the peak RSS is 290 MB rather than 510 MB.
        pf = pq.ParquetFile(inner, filesystem=fs, buffer_size=READ_BUFFER, pre_buffer=False)
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
                _validate(batch, path)
                yield batch.replace_schema_metadata(None)
    except (pa.ArrowException, OSError) as e:
        raise DataContractError(f"cannot read {path}: {e}") from None


def _validate(batch: pa.RecordBatch, path: str) -> None:
    """Parquet does not check what it reads: strings must be UTF-8, offsets in bounds."""
    try:
        batch.validate(full=True)
    except pa.ArrowInvalid as e:
        raise DataContractError(
            f"cannot read {path}: {' '.join(str(e).split())} (text columns must be valid UTF-8)"
        ) from None
