"""`ingest`: read media and captions into a dataset, probing every file and rejecting bad ones."""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import pyarrow as pa

from mmtools import columns as C
from mmtools.media import DEFAULT_MAX_PIXELS, MediaError, probe_audio, probe_image, read_path
from mmtools.step import Result, Step, reject_batch
from mmtools.steps.ingest.listing import (
    LISTING_SCHEMA,
    ListingOptions,
    build_listing,
    listing_digest,
)

IMAGE_FIELDS = [
    pa.field(C.WIDTH, pa.int32()),
    pa.field(C.HEIGHT, pa.int32()),
    pa.field(C.IMAGE_FORMAT, pa.string()),
    pa.field(C.IMAGE_NBYTES, pa.int64()),
    pa.field(C.IMAGE_SHA256, pa.string()),
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
    timeout: float = 30.0
    listing: ListingOptions = field(default_factory=ListingOptions)


class ListingSource:
    """The listing of files to ingest, served like a dataset source (resumable by row)."""

    def __init__(self, inputs: list[str], opts: ListingOptions):
        self.table = _mark_duplicates(build_listing(inputs, opts))
        self.schema = LISTING_SCHEMA
        self.upstream: list[dict] = []
        self.on_rejects = lambda rejects: None
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
    transient = ("_pool",)
    counts_successes = True

    def __init__(self, config: IngestConfig, kinds: set[str], workers: int = 8):
        super().__init__(config)
        self.kinds = kinds
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None

    def params(self) -> dict:
        """Options that change the output (not the listing options, already in the input)."""
        c = self.config
        return {"embed_media": c.embed_media, "max_pixels": c.max_pixels, "verify": c.verify}

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """id, media, text, source, then media metadata for the kinds present."""
        fields = [pa.field(C.ID, pa.string())]
        if "image" in self.kinds:
            fields.append(pa.field(C.IMAGE, C.MEDIA_TYPE))
        if "audio" in self.kinds:
            fields.append(pa.field(C.AUDIO, C.MEDIA_TYPE))
        fields += [pa.field(C.TEXT, pa.string()), pa.field(C.SOURCE, pa.string())]
        if "image" in self.kinds:
            fields += IMAGE_FIELDS
        if "audio" in self.kinds:
            fields += AUDIO_FIELDS
        return pa.schema(fields)

    def setup(self) -> None:
        """Start the I/O and decoding threads (Pillow and hashlib release the GIL)."""
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ingest")

    def close(self) -> None:
        """Stop the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def process(self, batch: pa.RecordBatch) -> Result:
        """Read and probe every listed file of the batch in parallel."""
        rows = batch.to_pylist()  # one file per row: per-row work is inherent here
        return self._result(batch, list(self._pool.map(self._one, rows)))

    def run(self, batches) -> Iterator[Result]:
        """Like `process` per batch, with the next batch's files already reading while one
        finishes (no reader idles at a batch's slow tail); progress as each file is done."""
        window: deque = deque()
        for batch in batches:
            window.append((batch, [self._pool.submit(self._one, r) for r in batch.to_pylist()]))
            if len(window) > 1:
                yield self._finish(*window.popleft())
        while window:
            yield self._finish(*window.popleft())

    def _finish(self, batch: pa.RecordBatch, futures: list) -> Result:
        for _ in as_completed(futures):
            self.advance(1)
        return self._result(batch, [f.result() for f in futures])

    def _result(self, batch: pa.RecordBatch, results: list) -> Result:
        """The batch's rows and reject rows from what `_one` made of each listed file."""
        good = [r for r in results if not isinstance(r, tuple)]
        bad = [r for r in results if isinstance(r, tuple)]
        rejects = reject_batch(self.name, *zip(*bad, strict=True)) if bad else None
        schema = self.output_schema(batch.schema)
        cols = {f.name: [g.get(f.name) for g in good] for f in schema if f.name not in C.MEDIA}
        arrays = []
        for f in schema:
            if f.name in C.MEDIA:
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
        """Ingest one listed sample: a row dict, or an (id, reason, detail) reject."""
        key = row["key"]
        try:
            if row["kind"] == "none":
                raise MediaError("no_media", "no image or audio file for this sample")
            if row["kind"] == "duplicate":
                raise MediaError("duplicate_id", f"{key} is listed more than once")
            caption = row["caption"]
            if row["sidecar"]:
                caption = read_sidecar(row["sidecar"])
            if caption is not None:
                caption = caption.replace("\x00", "").strip()
            data = read_bytes(row["location"], row["offset"], row["size"], self.config.timeout)
            out = {C.ID: key, C.TEXT: caption, C.SOURCE: source_name(row)}
            out.update(self._describe(row["kind"], data))
            path = row["location"] if row["offset"] is None else source_name(row)
            out[row["kind"]] = (data if self.config.embed_media else None, path)
            return out
        except MediaError as e:
            return (key, e.reason, e.detail)

    def _describe(self, kind: str, data: bytes) -> dict:
        sha = hashlib.sha256(data).hexdigest()
        if kind == "image":
            info = probe_image(data, self.config.max_pixels, self.config.verify)
            return {
                C.WIDTH: info.width,
                C.HEIGHT: info.height,
                C.IMAGE_FORMAT: info.format,
                C.IMAGE_NBYTES: len(data),
                C.IMAGE_SHA256: sha,
            }
        info = probe_audio(data)
        return {
            C.SAMPLE_RATE: info.sample_rate,
            C.CHANNELS: info.channels,
            C.DURATION: info.duration,
            C.AUDIO_FORMAT: info.format,
            C.AUDIO_NBYTES: len(data),
            C.AUDIO_SHA256: sha,
        }


def source_name(row: dict) -> str:
    """Where a sample came from, for humans: a path, a URL, or tar::offset."""
    if row["offset"] is not None:
        return f"{row['location']}::{row['key'].split('/', 1)[-1]}"
    return row["location"]


def read_sidecar(path: str) -> str | None:
    """Caption from a .txt or .json sidecar file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise MediaError("missing_file", f"cannot read caption file: {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MediaError("bad_caption", "caption file is not valid UTF-8") from None
    if path.endswith(".json"):
        try:
            meta = json.loads(text)
        except ValueError:
            raise MediaError("bad_caption", "caption JSON does not parse") from None
        value = next(
            (
                meta.get(k)
                for k in ("caption", "text")
                if isinstance(meta, dict) and meta.get(k) is not None
            ),
            None,
        )
        return None if value is None else str(value)
    return text


def read_bytes(location: str, offset: int | None, size: int | None, timeout: float) -> bytes:
    """Bytes of a file (local, URL or object store), or of a slice of a local tar."""
    if offset is None:
        return read_path(location, timeout)
    try:
        with open(location.removeprefix("file://"), "rb") as f:
            f.seek(offset)
            return f.read(size)
    except OSError as e:
        raise MediaError("missing_file", f"{location}: {e.strerror or e}") from None
