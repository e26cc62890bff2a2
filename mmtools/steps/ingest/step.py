"""`ingest`: read media and captions into a dataset, probing every file and rejecting bad ones."""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.io.fs import is_remote
from mmtools.io.http import DISALLOWED_DIRECTIVES, MAX_BYTES, USER_AGENT, DownloadOptions
from mmtools.media import DEFAULT_MAX_PIXELS, MediaError, probe_audio, probe_image, read_path
from mmtools.models.device import cpus
from mmtools.step import Result, Step, reject_batch
from mmtools.steps.ingest.listing import (
    LISTING_SCHEMA,
    ListingOptions,
    build_listing,
    extra_columns,
    listing_digest,
    skipped_counts,
)
from mmtools.steps.ingest.resize import ResizeOptions, check_size, resize_image

log = logging.getLogger("mmtools")

IMAGE_FIELDS = [
    pa.field(C.WIDTH, pa.int32()),
    pa.field(C.HEIGHT, pa.int32()),
    pa.field(C.IMAGE_FORMAT, pa.string()),
    pa.field(C.IMAGE_NBYTES, pa.int64()),
    pa.field(C.IMAGE_SHA256, pa.string()),
]
ORIGINAL_SIZE_FIELDS = [  # only when images are resized or re-encoded
    pa.field(C.ORIGINAL_WIDTH, pa.int32()),
    pa.field(C.ORIGINAL_HEIGHT, pa.int32()),
]
AUDIO_FIELDS = [
    pa.field(C.SAMPLE_RATE, pa.int32()),
    pa.field(C.CHANNELS, pa.int16()),
    pa.field(C.DURATION, pa.float64()),
    pa.field(C.AUDIO_FORMAT, pa.string()),
    pa.field(C.AUDIO_NBYTES, pa.int64()),
    pa.field(C.AUDIO_SHA256, pa.string()),
]


@dataclass
class IngestConfig:
    """Options of `ingest`."""

    embed_media: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    verify: bool = True
    timeout: float = 10.0
    retries: int = 2
    max_bytes: int = MAX_BYTES
    user_agent: str = USER_AGENT
    disallowed_header_directives: str = ",".join(DISALLOWED_DIRECTIVES)
    listing: ListingOptions = field(default_factory=ListingOptions)
    resize: ResizeOptions = field(default_factory=ResizeOptions)

    def download(self) -> DownloadOptions:
        """How URLs are fetched."""
        directives = self.disallowed_header_directives.split(",")
        return DownloadOptions(
            timeout=self.timeout,
            retries=self.retries,
            max_bytes=self.max_bytes,
            user_agent=self.user_agent,
            disallowed=tuple(d.strip().lower() for d in directives if d.strip()),
        )


class ListingSource:
    """The listing of files to ingest, served like a dataset source (resumable by row)."""

    def __init__(self, inputs: list[str], opts: ListingOptions):
        table, skipped = build_listing(inputs, opts)
        self.table = _mark_duplicates(table)
        self.schema = self.table.schema  # the standard columns, then the kept listing columns
        self.skipped = skipped_counts(skipped)
        self.upstream: list[dict] = []
        self.on_rejects = lambda rejects: None
        self.on_drops = lambda drops: None
        self.total_rows = self.table.num_rows
        self._digest = listing_digest(self.table, inputs)
        self._inputs = [os.path.abspath(p) for p in inputs]
        self.kinds = set(self.table.column("kind").unique().to_pylist())

    def identity(self) -> list:
        """The inputs and a digest of every file they list."""
        return [self._inputs, self._digest]

    def locate(self, start: int, end: int) -> list[dict]:
        """Lineage of rows [start, end): listing rows."""
        return [{"shard": "listing", "start": start, "end": end}]

    def batches(self, columns=None, batch_size: int = 256, skip_rows: int = 0):
        """Listing rows in batches, after `skip_rows`."""
        yield from self.table.slice(skip_rows).to_batches(max_chunksize=batch_size)

    def spool(self) -> None:
        """The listing is in memory already."""

    def close(self) -> None:
        """Nothing to release."""


def _mark_duplicates(table: pa.Table) -> pa.Table:
    """Mark every repeat of an id so that ingest rejects it instead of writing it twice."""
    seen: set[str] = set()
    kinds = table.column("kind").to_pylist()
    changed = False
    for i, key in enumerate(table.column("key").to_pylist()):
        if key in seen:
            kinds[i], changed = "duplicate", True
        seen.add(key)
    if not changed:
        return table
    return table.set_column(1, "kind", pa.array(kinds, pa.string()))


class Ingest(Step):
    """Read, verify and describe each listed media file."""

    name = "ingest"
    transient = ("_pool", "_local")
    counts_successes = True

    def __init__(self, config: IngestConfig, kinds: set[str], workers: int = 8):
        super().__init__(config)
        if config.resize.reencodes and not config.embed_media:
            raise UsageError(
                "--paths-only stores no image bytes to resize; "
                "drop --paths-only or --resize-mode/--encode-format"
            )
        self.kinds = kinds
        self.workers = workers
        self._download = config.download()
        self._restored: dict = {}  # set by output_schema
        self._pool: ThreadPoolExecutor | None = None
        self._local: ThreadPoolExecutor | None = None  # for batches of local files only
        self._tar_bytes_noted = False  # --paths-only met a tar (warned once)

    def params(self) -> dict:
        """Options that change the output (not the listing options, already in the input)."""
        c = self.config
        params = {"embed_media": c.embed_media, "max_pixels": c.max_pixels, "verify": c.verify}
        if c.resize != ResizeOptions():  # outputs made without resizing keep their fingerprint
            params["resize"] = asdict(c.resize)
        return params

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """id, media, text, source, media metadata for the kinds present, text_encoding,
        then the kept listing columns with their types."""
        fields = [pa.field(C.ID, pa.string())]
        if "image" in self.kinds:
            fields.append(pa.field(C.IMAGE, C.MEDIA_TYPE))
        if "audio" in self.kinds:
            fields.append(pa.field(C.AUDIO, C.MEDIA_TYPE))
        fields += [pa.field(C.TEXT, pa.string()), pa.field(C.SOURCE, pa.string())]
        if "image" in self.kinds:
            fields += IMAGE_FIELDS
            if self.config.resize.reencodes:
                fields += ORIGINAL_SIZE_FIELDS
        if "audio" in self.kinds:
            fields += AUDIO_FIELDS
        fields.append(pa.field(C.TEXT_ENCODING, pa.string()))
        extras = extra_columns(schema)
        # columns restored from an mmtools export keep the provenance it recorded
        self._restored = {n: i for n, i in C.column_info(schema).items() if n in extras}
        return pa.schema(fields + [pa.field(n, schema.field(x).type) for n, x in extras.items()])

    def column_info(self) -> dict:
        """The provenance of the columns restored from an mmtools export (their model)."""
        return dict(self._restored)

    def setup(self) -> None:
        """Start the I/O and decoding threads (Pillow and hashlib release the GIL): `workers`
        for batches that wait on a network (URLs, object stores), at most one per CPU for
        local files, where more only contend for Python's lock (2,000 small JPEGs on 2 CPUs:
        8 threads take about twice as long as 2)."""
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ingest")
        self._local_width = min(self.workers, cpus())
        self._local = self._pool
        if self._local_width < self.workers:
            self._local = ThreadPoolExecutor(self._local_width, thread_name_prefix="ingest-local")

    def close(self) -> None:
        """Stop the threads."""
        for pool in {id(p): p for p in (self._pool, self._local) if p is not None}.values():
            pool.shutdown(wait=False, cancel_futures=True)

    def _pool_for(self, rows: list[dict]) -> tuple[ThreadPoolExecutor, int]:
        """The threads for a batch of `rows`, and how many: few where all are local."""
        if all(not is_remote(row["location"] or "") for row in rows):
            return self._local, self._local_width
        return self._pool, self.workers

    def process(self, batch: pa.RecordBatch) -> Result:
        """Read and probe every listed file of the batch in parallel."""
        rows = _listed(batch)
        return self._result(batch, list(self._pool_for(rows)[0].map(self._one, rows)))

    def run(self, batches) -> Iterator[Result]:
        """Like `process` per batch, with the next batch's files already reading while one
        finishes (no reader idles at a batch's slow tail); progress as files are done."""
        window: deque = deque()
        for batch in batches:
            rows = _listed(batch)
            pool, width = self._pool_for(rows)
            per_task = max(1, min(LOCAL_TASK_ROWS, len(rows) // width))
            tasks = [pool.submit(self._many, run) for run in _tasks(rows, per_task)]
            window.append((batch, tasks))
            if len(window) > 1:
                yield self._finish(*window.popleft())
        while window:
            yield self._finish(*window.popleft())

    def _finish(self, batch: pa.RecordBatch, tasks: list) -> Result:
        for task in as_completed(tasks):
            self.advance(len(task.result()))
        return self._result(batch, [r for task in tasks for r in task.result()])

    def _many(self, rows: list[dict]) -> list:
        return [self._one(row) for row in rows]

    def _result(self, batch: pa.RecordBatch, results: list) -> Result:
        """The batch's rows and reject rows from what `_one` made of each listed file."""
        in_tars = batch.column("offset").null_count < batch.num_rows
        if in_tars and not self.config.embed_media and not self._tar_bytes_noted:
            log.warning("--paths-only: members of a tar have no path of their own; kept as bytes")
            self._tar_bytes_noted = True
        kept = [i for i, r in enumerate(results) if not isinstance(r, tuple)]
        good = [results[i] for i in kept]
        bad = [r for r in results if isinstance(r, tuple)]
        rejects = reject_batch(self.name, *zip(*bad, strict=True)) if bad else None
        schema = self.output_schema(batch.schema)
        extras = extra_columns(batch.schema)
        own = [f.name for f in schema if f.name not in C.MEDIA and f.name not in extras]
        cols = {name: [g.get(name) for g in good] for name in own}
        arrays = []
        for f in schema:
            if f.name in extras:
                arrays.append(batch.column(extras[f.name]).take(pa.array(kept, pa.int64())))
            elif f.name in C.MEDIA:
                items = [g.get(f.name) or (None, None) for g in good]
                arr = C.media_array([i[0] for i in items], [i[1] for i in items])
                mask = pa.array([g.get(f.name) is None for g in good], pa.bool_())
                arrays.append(
                    pa.StructArray.from_arrays(arr.flatten(), fields=list(C.MEDIA_TYPE), mask=mask)
                )
            else:
                arrays.append(pa.array(cols[f.name], f.type))
        return Result(pa.RecordBatch.from_arrays(arrays, schema=schema), rejects)

    def _one(self, row: dict) -> dict | tuple:
        """Ingest one listed sample: a row dict, or an (id, reason, detail, source) reject."""
        key = row["key"]
        try:
            if row["kind"] == "none":
                raise MediaError("no_media", "no image or audio file for this sample")
            if row["kind"] == "duplicate":
                raise MediaError("duplicate_id", f"{key} is listed more than once")
            caption, encoding = row["caption"], None
            if row["sidecar"]:
                caption, encoding = read_sidecar(row["sidecar"])
            if caption is not None:
                caption = caption.replace("\x00", "").strip()
            data = read_bytes(row["location"], row["offset"], row["size"], self._download)
            out = {C.ID: key, C.TEXT: caption, C.SOURCE: source_name(row)}
            out[C.TEXT_ENCODING] = encoding
            described, data = self._describe(row["kind"], data)
            out.update(described)
            path = row["location"] if row["offset"] is None else source_name(row)
            keep = self.config.embed_media or row["offset"] is not None  # a tar's: no path
            out[row["kind"]] = (data if keep else None, path)
            return out
        except MediaError as e:
            return (key, e.reason, e.detail, source_name(row))

    def _describe(self, kind: str, data: bytes) -> tuple[dict, bytes]:
        """The metadata columns of one file, and the bytes to store (resized images)."""
        if kind == "image":
            return self._describe_image(data)
        sha = hashlib.sha256(data).hexdigest()
        info = probe_audio(data)
        return {
            C.SAMPLE_RATE: info.sample_rate,
            C.CHANNELS: info.channels,
            C.DURATION: info.duration,
            C.AUDIO_FORMAT: info.format,
            C.AUDIO_NBYTES: len(data),
            C.AUDIO_SHA256: sha,
        }, data

    def _describe_image(self, data: bytes) -> tuple[dict, bytes]:
        opts = self.config.resize
        # Re-encoding decodes every image, and that decode verifies it: none before it.
        verify = self.config.verify and not opts.reencodes
        info = probe_image(data, self.config.max_pixels, verify)
        check_size(opts, info.width, info.height)
        out = {}
        if opts.reencodes:
            out = {C.ORIGINAL_WIDTH: info.width, C.ORIGINAL_HEIGHT: info.height}
            resized = resize_image(data, info, opts)
            if resized is not None:
                data, info = resized.data, resized
        return {
            C.WIDTH: info.width,
            C.HEIGHT: info.height,
            C.IMAGE_FORMAT: info.format,
            C.IMAGE_NBYTES: len(data),
            C.IMAGE_SHA256: hashlib.sha256(data).hexdigest(),
            **out,
        }, data


LOCAL_TASK_ROWS = 8  # local files per thread task at most: a task per small file costs as
# much as reading it, in hand-offs between threads


def _tasks(rows: list[dict], per_task: int) -> list[list[dict]]:
    """The rows in thread tasks, in row order (results are joined task by task): a URL or
    object-store key alone (each waits on the network by itself), runs of up to `per_task`
    local files together."""
    tasks: list[list[dict]] = []
    run: list[dict] = []
    for row in rows:
        location = row["location"] or ""
        if "://" in location and not location.startswith("file://"):
            if run:  # the local files listed before it go first
                tasks.append(run)
                run = []
            tasks.append([row])
            continue
        run.append(row)
        if len(run) == per_task:
            tasks.append(run)
            run = []
    if run:
        tasks.append(run)
    return tasks


def _listed(batch: pa.RecordBatch) -> list[dict]:
    """The listing rows of a batch as dicts: one file per row, so per-row work is inherent
    here (the kept listing columns stay columns)."""
    return batch.select(LISTING_SCHEMA.names).to_pylist()


def source_name(row: dict) -> str | None:
    """Where a sample came from, for humans: a path, a URL, or tar::key."""
    location = row["location"]
    in_tar = location is not None and "://" not in location and location.endswith(".tar")
    if row["offset"] is not None or in_tar:
        return f"{location}::{row['member'] or row['key'].split('/', 1)[-1]}"
    return location


CAPTION_FALLBACK = "cp1252"  # what a caption file that is not UTF-8 is read as
_BINARY = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def read_sidecar(path: str) -> tuple[str | None, str | None]:
    """Caption from a .txt or .json sidecar file, and the encoding read where not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise MediaError("missing_file", f"cannot read caption file: {e}") from None
    text, encoding = decode_caption(raw, path)
    if path.endswith(".json"):
        try:
            meta = json.loads(text)
        except ValueError:
            raise MediaError("bad_caption", f"{path}: caption JSON does not parse") from None
        value = next(
            (
                meta.get(k)
                for k in ("caption", "text")
                if isinstance(meta, dict) and meta.get(k) is not None
            ),
            None,
        )
        return (None if value is None else str(value)), encoding
    return text, encoding


def decode_caption(raw: bytes, path: str) -> tuple[str, str | None]:
    """Text of a caption file: UTF-8 (encoding None), UTF-16 with a byte-order mark, else
    CAPTION_FALLBACK; `bad_caption` when none of them reads it as text."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            raise MediaError("bad_caption", f"{path}: damaged UTF-16 caption file") from None
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode(CAPTION_FALLBACK)
    except UnicodeDecodeError:
        text = None
    # Control characters mean binary data that the fallback decoded as mojibake.
    if text is None or _BINARY.search(text):
        raise MediaError(
            "bad_caption", f"{path}: caption file is neither UTF-8 nor {CAPTION_FALLBACK} text"
        )
    return text, CAPTION_FALLBACK


def read_bytes(
    location: str, offset: int | None, size: int | None, download: DownloadOptions
) -> bytes:
    """Bytes of a file (local, URL or object store), or of a slice of a local tar."""
    if offset is None:
        return read_path(location, download=download)
    try:
        with open(location.removeprefix("file://"), "rb") as f:
            f.seek(offset)
            return f.read(size)
    except OSError as e:
        raise MediaError("missing_file", f"{location}: {e.strerror or e}") from None
