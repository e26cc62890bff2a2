"""The machinery `embed`'s model families share: schema, prefetching run loop, rejects.

Decoding and preprocessing run in worker threads (images in worker processes with
`--decode-in processes`: see `decoders`) for the next batches while the model runs the
current one; each batch's inputs are written straight into one preallocated (pinned, on
CUDA) tensor, so the model never waits on a copy. A row is rejected (never output) when one
of its media cannot be decoded (the decoder's reason: corrupt, truncated, not_image, ...),
its text is null or blank (`no_text`), or its embedding comes out NaN, infinite or zero
(`bad_embedding`).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools import models
from mmtools.errors import DataContractError, UsageError
from mmtools.media import DEFAULT_MAX_PIXELS, cells
from mmtools.models.device import PRECISIONS, check_precision, cpus, resolve_device
from mmtools.step import Result, Step, rejects_at
from mmtools.steps.embed.decoders import Workers, check_decode_in

log = logging.getLogger("mmtools")

PREFETCH = 2  # batches decoded ahead of the one the model is running
MIN_PIECE = 8  # rows per decoding task, at least
DTYPES = ("float16", "float32")

Reason = tuple[str, str] | None


@dataclass
class EmbedConfig:
    """Options of an embedding step: open_clip reads `model` and `pretrained`, CLAP reads
    `audio_model`; `embed` and `score` fill one from the command line for all their steps.
    A model of None (score's default) means the one recorded for the embedding present."""

    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    model: str | None = models.DEFAULT_MODEL
    pretrained: str | None = None
    audio_model: str | None = models.DEFAULT_AUDIO_MODEL
    device: str = "auto"
    precision: str = "fp32"
    dtype: str = "float16"
    batch_size: int = 256
    workers: int = min(8, cpus())
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_in: str = "threads"  # or "processes" (images; see mmtools.steps.embed.decoders)
    reduced_jpeg: bool = False  # large JPEGs decoded at 1/2-1/8 scale (see mmtools.media)


class EmbedStep(Step):
    """Shared machinery: schema, prefetching run loop, normalisation, reject rows."""

    media: str = ""  # the media column this family embeds
    allowed: tuple[str, ...] = ()
    loads_model = True
    # A copy sent to another worker resolves its own device and loads its own model.
    transient = ("device", "_towers")

    def __init__(self, config: EmbedConfig):
        super().__init__(config)
        bad = [m for m in config.modalities if m not in self.allowed] or (
            [] if config.modalities else ["(none)"]
        )
        if bad:
            raise UsageError(f"{self.name} embeds {' and '.join(self.allowed)}, not {bad[0]}")
        if config.dtype not in DTYPES:
            raise UsageError(f"--dtype must be float16 or float32, not {config.dtype!r}")
        if config.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
        check_decode_in(config.decode_in)
        self.modalities = list(config.modalities)
        sources = {"text": C.TEXT, self.media: self.media}
        self.requires = (C.ID, *[sources[m] for m in self.modalities])
        self.produces = tuple(C.EMBEDDINGS[m] for m in self.modalities)
        self.num_gpus = 1.0 if config.device.startswith("cuda") else 0.0
        self._spec = None
        self.device = None
        self._towers: dict = {}

    def spec(self):
        """The resolved model (fetched on first use)."""
        raise NotImplementedError

    def params(self) -> dict:
        """What changes the output; device, batch size and the decoding workers do not."""
        spec, c = self.spec(), self.config
        return {
            self.name: {
                "modalities": self.modalities,
                "model": spec.name,
                "pretrained": getattr(spec, "pretrained", None),
                "precision": c.precision,
                "dtype": c.dtype,
                "max_pixels": c.max_pixels,
                "model_files": spec.files(),
                # only when set: outputs made before the option existed still resume
                **({"reduced_jpeg": True} if c.reduced_jpeg else {}),
            }
        }

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The input columns plus one embedding column per modality (replacing any old one)."""
        C.require(schema, self.requires, self.name)
        if self.media in self.modalities and schema.field(self.media).type != C.MEDIA_TYPE:
            raise DataContractError(
                f"column {self.media} is {schema.field(self.media).type}, "
                "not the struct<bytes, path> that mmtools ingest writes"
            )
        self._device()  # a bad --device or --precision fails before any output is written
        dim = self.spec().dim
        fields = [f for f in schema if f.name not in self.produces]
        fields += [pa.field(c, C.embedding_type(dim, self.config.dtype)) for c in self.produces]
        return C.with_metadata(pa.schema(fields, metadata=schema.metadata), self.column_info())

    def column_info(self) -> dict:
        """Model, weights, size and precision of each produced embedding."""
        info = self.spec().info(self.config.precision)
        return {c: dict(info) for c in self.produces}

    def setup(self) -> None:
        """Load the model on the chosen device (once; later calls keep it)."""
        if not self._towers:
            self.device = None  # resolved again where it runs: a Ray worker may have a GPU
            self._towers = self._load(self._device())

    def _device(self):
        if self.device is None:
            dev = resolve_device(self.config.device)
            check_precision(self.config.precision, dev)
            self.device = dev
        return self.device

    def _load(self, device) -> dict:
        raise NotImplementedError

    def process(self, batch: pa.RecordBatch) -> Result:
        """Embed one batch."""
        return next(iter(self.run([batch])))

    def run(self, batches: Iterable[pa.RecordBatch]) -> Iterator[Result]:
        """Embed a stream, decoding up to PREFETCH batches ahead of the model."""
        self.setup()
        workers = self.start_workers()
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append((batch, self._submit(workers, batch)))
                if len(pending) > PREFETCH:
                    yield self._finish(*pending.popleft())
            while pending:
                yield self._finish(*pending.popleft())
        finally:
            workers.close()

    def start_workers(self, count: int | None = None, where: str | None = None) -> Workers:
        """The decoding workers of one run: `count` (default --workers) threads, or
        processes for the images when `where` (default --decode-in) says so."""
        c = self.config
        return Workers.start(count or c.workers, where or c.decode_in, self._towers, self.name)

    def _submit(self, workers: Workers, batch: pa.RecordBatch):
        """Start filling a batch's buffers: per modality, the futures of its slices' reasons
        in row order. Media are split among the workers; a tower that fills under a lock
        (a tokenizer) takes the whole batch in one task, which holds no worker waiting."""
        n = batch.num_rows
        pin = self.device.type == "cuda"
        piece = max(MIN_PIECE, math.ceil(n / self.config.workers))
        bufs: dict[str, dict] = {}
        jobs: dict[str, list[Future]] = {}
        for m in sorted(self._towers, key=lambda m: not self._towers[m].serial):
            size = max(n, 1) if self._towers[m].serial else piece
            starts = range(0, n, size)
            if n and workers.runs_in_processes(m):
                pieces = [(s, self._values(m, batch, s, min(n, s + size))) for s in starts]
                into = self._towers[m].alloc(n, pin) if pin else None
                bufs[m], jobs[m] = workers.submit(m, n, pieces, into)
                continue
            bufs[m] = self._towers[m].alloc(n, pin)
            jobs[m] = [
                workers.threads.submit(self._fill, m, bufs[m], batch, s, min(n, s + size))
                for s in starts
            ]
        return bufs, jobs

    def _fill(self, modality: str, bufs: dict, batch: pa.RecordBatch, start: int, end: int):
        return self._towers[modality].fill(bufs, start, self._values(modality, batch, start, end))

    def _values(self, modality: str, batch: pa.RecordBatch, start: int, end: int) -> list:
        column = C.TEXT if modality == "text" else self.media
        return column_values(batch.slice(start, end - start), column)

    def _finish(self, batch: pa.RecordBatch, job: tuple[dict, dict[str, list[Future]]]) -> Result:
        bufs, jobs = job
        reasons = {m: [r for f in jobs[m] for r in f.result()] for m in self._towers}
        embeddings = {m: self._encode(m, bufs[m], reasons[m]) for m in self._towers}
        row_reason = [
            next((r[i] for r in reasons.values() if r[i]), None) for i in range(batch.num_rows)
        ]
        keep = np.array([r is None for r in row_reason], dtype=bool)
        out = batch.filter(pa.array(keep)).drop_columns(
            [c for c in self.produces if c in batch.schema.names]
        )
        for m in self.modalities:
            out = out.append_column(C.EMBEDDINGS[m], self._to_arrow(embeddings[m][keep]))
        if keep.all():
            return Result(out)
        return Result(out, rejects_at(self.name, batch, np.flatnonzero(~keep), row_reason))

    def _encode(self, modality: str, bufs: dict, reasons: list[Reason]) -> np.ndarray:
        """Run the model over the rows in model-sized chunks; normalise; flag bad vectors."""
        tower, n, size = self._towers[modality], len(reasons), self.config.batch_size
        parts = []
        for start in range(0, n, size):
            chunk = {
                k: v[start : start + size].to(self.device, non_blocking=True)
                for k, v in bufs.items()
            }
            parts.append(tower.encode(chunk).cpu().numpy())
        emb = np.concatenate(parts) if parts else np.zeros((0, self.spec().dim), np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            norm = np.linalg.norm(emb, axis=1, keepdims=True)
            bad = ~np.isfinite(emb).all(axis=1) | ~np.isfinite(norm[:, 0]) | (norm[:, 0] == 0)
            emb = emb / np.where(bad[:, None], 1.0, norm)
        for i in np.flatnonzero(bad):
            if reasons[i] is None:
                reasons[i] = ("bad_embedding", f"the {modality} embedding is NaN, infinite or zero")
        return emb

    def _to_arrow(self, emb: np.ndarray) -> pa.Array:
        dim = self.spec().dim
        values = pa.array(emb.astype(self.config.dtype).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(
            values, type=C.embedding_type(dim, self.config.dtype)
        )


def column_values(piece: pa.RecordBatch, column: str) -> list:
    """Texts, or the (bytes, path) cells of a media column, as Python values."""
    if column == C.TEXT:
        return piece.column(column).to_pylist()
    return cells(piece.column(column))


def split_preprocess(preprocess):
    """The PIL part of a `[..., ToTensor, Normalize]` transform and its mean and std."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor):
        return None, None, None
    if not isinstance(steps[-1], T.Normalize):
        return None, None, None
    mean = np.asarray(steps[-1].mean, np.float32)
    std = np.asarray(steps[-1].std, np.float32)
    return T.Compose(steps[:-2]), mean, std


def text_reasons(texts: list) -> list[Reason]:
    return [
        None if t is not None and t.strip() else ("no_text", "the text is null or blank")
        for t in texts
    ]
