"""`embed`: L2-normalised image/text embeddings (open_clip) and audio/text embeddings (CLAP).

Decoding and preprocessing run in a thread pool for the next batches while the model runs
the current one; each batch's inputs are written straight into one preallocated (pinned, on
CUDA) tensor, so the model never waits on a copy. A row is rejected (never output) when one
of its media cannot be decoded (the decoder's reason: corrupt, truncated, not_image, ...),
its text is null or blank (`no_text`), or its embedding comes out NaN, infinite or zero
(`bad_embedding`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools import models
from mmtools.errors import DataContractError, UsageError
from mmtools.media import DEFAULT_MAX_PIXELS, MediaError
from mmtools.step import Result, Step, reject_batch

log = logging.getLogger("mmtools")

PREFETCH = 2  # batches decoded ahead of the one the model is running
MIN_PIECE = 8  # rows per decoding task, at least
DTYPES = ("float16", "float32")
CLAP_TEXT_TOKENS = 77  # LAION-CLAP pads and truncates captions to 77 tokens

Reason = tuple[str, str] | None


@dataclass
class EmbedConfig:
    """Options of an embedding step; `model` is an open_clip model or a CLAP model."""

    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    model: str = models.DEFAULT_MODEL
    pretrained: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    dtype: str = "float16"
    batch_size: int = 256
    workers: int = min(8, os.cpu_count() or 1)
    max_pixels: int = DEFAULT_MAX_PIXELS


class _Embed(Step):
    """Shared machinery: schema, prefetching run loop, normalisation, reject rows."""

    media: str = ""  # the media column this family embeds
    allowed: tuple[str, ...] = ()
    loads_model = True

    def __init__(self, config: EmbedConfig):
        super().__init__(config)
        bad = [m for m in config.modalities if m not in self.allowed] or (
            [] if config.modalities else ["(none)"]
        )
        if bad:
            raise UsageError(f"{self.name} embeds {' and '.join(self.allowed)}, not {bad[0]}")
        if config.dtype not in DTYPES:
            raise UsageError(f"--dtype must be float16 or float32, not {config.dtype!r}")
        if config.precision not in models.PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(models.PRECISIONS)}")
        self.modalities = list(config.modalities)
        sources = {"text": C.TEXT, self.media: self.media}
        self.requires = (C.ID, *[sources[m] for m in self.modalities])
        self.produces = tuple(C.EMBEDDINGS[m] for m in self.modalities)
        self.num_gpus = 1.0 if config.device.startswith("cuda") else 0.0
        self._spec = None
        self.device = None
        self._towers: dict = {}

    def __getstate__(self) -> dict:
        # A copy sent to another worker resolves its own device and loads its own model.
        return {**self.__dict__, "device": None, "_towers": {}}

    def spec(self):
        """The resolved model (fetched on first use)."""
        raise NotImplementedError

    def params(self) -> dict:
        """What changes the output; device, batch size and workers do not."""
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
            device = models.resolve_device(self.config.device)
            models.check_precision(self.config.precision, device)
            self.device = device
        return self.device

    def _load(self, device) -> dict:
        raise NotImplementedError

    def process(self, batch: pa.RecordBatch) -> Result:
        """Embed one batch."""
        return next(iter(self.run([batch])))

    def run(self, batches: Iterable[pa.RecordBatch]) -> Iterator[Result]:
        """Embed a stream, decoding up to PREFETCH batches ahead of the model."""
        self.setup()
        pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix=f"mmtools-{self.name}")
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append((batch, self._submit(pool, batch)))
                if len(pending) > PREFETCH:
                    yield self._finish(*pending.popleft())
            while pending:
                yield self._finish(*pending.popleft())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, pool: ThreadPoolExecutor, batch: pa.RecordBatch):
        n = batch.num_rows
        pin = self.device.type == "cuda"
        bufs = {m: t.alloc(n, pin) for m, t in self._towers.items()}
        step = max(MIN_PIECE, math.ceil(n / self.config.workers))
        futures = [
            pool.submit(self._fill, bufs, batch, start, min(n, start + step))
            for start in range(0, n, step)
        ]
        return bufs, futures

    def _fill(self, bufs: dict, batch: pa.RecordBatch, start: int, end: int) -> dict:
        piece = batch.slice(start, end - start)
        reasons = {}
        for m, tower in self._towers.items():
            values = _column_values(piece, C.TEXT if m == "text" else self.media)
            reasons[m] = tower.fill(bufs[m], start, values)
        return reasons

    def _finish(self, batch: pa.RecordBatch, job: tuple[dict, list[Future]]) -> Result:
        bufs, futures = job
        pieces = [f.result() for f in futures]
        reasons = {m: [r for p in pieces for r in p[m]] for m in self._towers}
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
        bad = np.flatnonzero(~keep)
        ids = batch.column(C.ID).take(pa.array(bad)).to_pylist()
        rejects = reject_batch(
            self.name, ids, [row_reason[i][0] for i in bad], [row_reason[i][1] for i in bad]
        )
        return Result(out, rejects)

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


def _column_values(piece: pa.RecordBatch, column: str) -> list:
    """Texts, or (bytes, path) pairs of a media column, as Python values."""
    col = piece.column(column)
    if column == C.TEXT:
        return col.to_pylist()
    nulls = col.is_null().to_pylist()
    data, paths = col.field("bytes").to_pylist(), col.field("path").to_pylist()
    return [None if z else (d, p) for z, d, p in zip(nulls, data, paths, strict=True)]


def _media_bytes(value, kind: str) -> bytes:
    """The media bytes of a row, read from its path when only the path was ingested."""
    data, path = value if value is not None else (None, None)
    if data == b"":
        raise MediaError("zero_byte", "empty file")
    if data is not None:
        return data
    if not path:
        raise MediaError(f"no_{kind}", f"the row has no {kind}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise MediaError("missing_file", f"{path}: {e.strerror or e}") from None


def _split_preprocess(preprocess):
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


def _text_reasons(texts: list) -> list[Reason]:
    return [
        None if t is not None and t.strip() else ("no_text", "the text is null or blank")
        for t in texts
    ]


class _ImageTower:
    """Decode + preprocess images into a pixel buffer; encode with open_clip."""

    def __init__(self, encoder: models.ClipEncoder, max_pixels: int):
        from PIL import Image

        self.encoder, self.max_pixels = encoder, max_pixels
        self.shape = tuple(encoder.preprocess(Image.new("RGB", (8, 8))).shape)
        self.resize, self.mean, self.std = _split_preprocess(encoder.preprocess)

    def alloc(self, n: int, pin: bool) -> dict:
        import torch

        return {"pixels": torch.empty((n, *self.shape), pin_memory=pin)}

    def fill(self, bufs: dict, offset: int, values: list) -> list[Reason]:
        from mmtools.media import decoded_image

        pixels = bufs["pixels"].numpy()
        reasons: list[Reason] = []
        for i, value in enumerate(values):
            try:
                with decoded_image(_media_bytes(value, "image"), self.max_pixels) as img:
                    pixels[offset + i] = self._pixels(img)
                reasons.append(None)
            except MediaError as e:
                reasons.append((e.reason, e.detail))
        return reasons

    def _pixels(self, img) -> np.ndarray:
        if self.resize is None:
            return self.encoder.preprocess(img).numpy()
        # ToTensor + Normalize in numpy: torch ops from many threads would oversubscribe the
        # cores the model runs on.
        arr = np.asarray(self.resize(img), dtype=np.float32) / 255.0
        return ((arr - self.mean) / self.std).transpose(2, 0, 1)

    def encode(self, chunk: dict):
        return self.encoder.encode_image(chunk["pixels"])


class _ClipTextTower:
    """Tokenise captions (one thread at a time: tokenizers are not thread-safe)."""

    def __init__(self, encoder: models.ClipEncoder):
        self.encoder = encoder
        self.length = int(encoder.tokenizer(["x"]).shape[1])
        self.lock = threading.Lock()

    def alloc(self, n: int, pin: bool) -> dict:
        import torch

        return {"tokens": torch.zeros((n, self.length), dtype=torch.long, pin_memory=pin)}

    def fill(self, bufs: dict, offset: int, texts: list) -> list[Reason]:
        with self.lock:
            tokens = self.encoder.tokenizer([t or "" for t in texts])
        bufs["tokens"].numpy()[offset : offset + len(texts)] = tokens.numpy()
        return _text_reasons(texts)

    def encode(self, chunk: dict):
        return self.encoder.encode_text(chunk["tokens"])


class ClipEmbed(_Embed):
    """Image and/or text embeddings from an open_clip model."""

    name = "clip_embed"
    media = C.IMAGE
    allowed = ("image", "text")

    def spec(self) -> models.ClipSpec:
        """The resolved open_clip model (weights fetched on first use)."""
        if self._spec is None:
            self._spec = models.resolve_clip(self.config.model, self.config.pretrained)
        return self._spec

    def _load(self, device) -> dict:
        encoder = models.load_clip(self.spec(), device, self.config.precision)
        towers = {
            "image": lambda: _ImageTower(encoder, self.config.max_pixels),
            "text": lambda: _ClipTextTower(encoder),
        }
        return {m: towers[m]() for m in self.modalities}


class _AudioTower:
    """Decode, resample, mix down and cut audio to the model's window; CLAP features."""

    def __init__(self, encoder: models.ClapEncoder):
        self.encoder = encoder
        sr = encoder.sample_rate
        probe = encoder.features([np.zeros(sr, np.float32)], sampling_rate=sr, return_tensors="np")
        self.shape = tuple(probe["input_features"].shape[1:])

    def alloc(self, n: int, pin: bool) -> dict:
        import torch

        return {
            "input_features": torch.empty((n, *self.shape), pin_memory=pin),
            "is_longer": torch.zeros((n, 1), dtype=torch.bool, pin_memory=pin),
        }

    def fill(self, bufs: dict, offset: int, values: list) -> list[Reason]:

        from mmtools.media import decode_audio

        sr, reasons, waves, rows = self.encoder.sample_rate, [], [], []
        for i, value in enumerate(values):
            try:
                wav, _ = decode_audio(_media_bytes(value, "audio"), sample_rate=sr, mono=True)
                # Cut to the first window: longer clips would get random crops otherwise.
                waves.append(wav[: self.encoder.max_samples])
                rows.append(offset + i)
                reasons.append(None)
            except MediaError as e:
                reasons.append((e.reason, e.detail))
        if waves:
            feats = self.encoder.features(waves, sampling_rate=sr, return_tensors="np")
            bufs["input_features"].numpy()[rows] = feats["input_features"]
        # No clip is longer than the window now; the extractor's random pick is undone.
        return reasons

    def encode(self, chunk: dict):
        return self.encoder.encode_audio(chunk)


class _ClapTextTower:
    """Tokenise captions for CLAP's text tower, padded to a fixed length."""

    def __init__(self, encoder: models.ClapEncoder):
        self.encoder = encoder
        self.length = min(CLAP_TEXT_TOKENS, int(encoder.tokenizer.model_max_length))
        self.lock = threading.Lock()

    def alloc(self, n: int, pin: bool) -> dict:
        import torch

        shape = (n, self.length)
        return {
            "input_ids": torch.ones(shape, dtype=torch.long, pin_memory=pin),
            "attention_mask": torch.ones(shape, dtype=torch.long, pin_memory=pin),
        }

    def fill(self, bufs: dict, offset: int, texts: list) -> list[Reason]:

        with self.lock:
            tok = self.encoder.tokenizer(
                [t or "" for t in texts],
                padding="max_length",
                truncation=True,
                max_length=self.length,
                return_tensors="np",
            )
        rows = slice(offset, offset + len(texts))
        bufs["input_ids"].numpy()[rows] = tok["input_ids"]
        bufs["attention_mask"].numpy()[rows] = tok["attention_mask"]
        return _text_reasons(texts)

    def encode(self, chunk: dict):
        return self.encoder.encode_text(chunk)


class ClapEmbed(_Embed):
    """Audio and/or text embeddings from a CLAP model (Hugging Face transformers)."""

    name = "clap_embed"
    media = C.AUDIO
    allowed = ("audio", "text")

    def spec(self) -> models.ClapSpec:
        """The resolved CLAP model."""
        if self._spec is None:
            self._spec = models.resolve_clap(self.config.model)
        return self._spec

    def _load(self, device) -> dict:
        encoder = models.load_clap(self.spec(), device, self.config.precision)
        towers = {"audio": lambda: _AudioTower(encoder), "text": lambda: _ClapTextTower(encoder)}
        return {m: towers[m]() for m in self.modalities}


@dataclass
class ModelOptions:
    """The model options `embed` and `score` share."""

    model: str | None = None
    pretrained: str | None = None
    audio_model: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    dtype: str = "float16"
    batch_size: int = 256
    workers: int = EmbedConfig.workers

    def config(self, modalities: list[str], model: str, pretrained: str | None) -> EmbedConfig:
        """An embedding step's config with these options."""
        return EmbedConfig(
            modalities,
            model,
            pretrained,
            self.device,
            self.precision,
            self.dtype,
            self.batch_size,
            self.workers,
        )


def embed_steps(names: list[str], modalities: list[str] | None, opts: ModelOptions) -> list:
    """The embedding steps for `modalities` (default: every media and text the input has).

    Text goes to the image model when images are embedded, else to the audio model when
    audio is; text alone goes to the model of the media the input holds.
    """
    if not modalities:
        have = {"image": C.IMAGE, "audio": C.AUDIO, "text": C.TEXT}
        modalities = [m for m, col in have.items() if col in names]
        if not modalities:
            raise UsageError("nothing to embed: the input has no image, audio or text column")
    unknown = [m for m in modalities if m not in C.EMBEDDINGS]
    if unknown:
        raise UsageError(f"--modalities takes image, text and audio, not {unknown[0]!r}")
    audio_text = "image" not in modalities and (
        "audio" in modalities or (C.AUDIO in names and C.IMAGE not in names)
    )
    clip = [m for m in ("image", "text") if m in modalities and not (m == "text" and audio_text)]
    clap = [m for m in ("audio", "text") if m in modalities and (m == "audio" or audio_text)]
    steps: list = []
    if clip:
        steps.append(
            ClipEmbed(opts.config(clip, opts.model or models.DEFAULT_MODEL, opts.pretrained))
        )
    if clap:
        steps.append(
            ClapEmbed(opts.config(clap, opts.audio_model or models.DEFAULT_AUDIO_MODEL, None))
        )
    return steps
