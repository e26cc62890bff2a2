"""open_clip image and text towers: `ClipEmbed`."""

from __future__ import annotations

import logging
import threading

import numpy as np

from mmtools import columns as C
from mmtools import models
from mmtools.media import MediaError, read
from mmtools.steps.embed.step import (
    EmbedStep,
    Reason,
    split_preprocess,
    text_reasons,
)

log = logging.getLogger(__name__)


class _ImageTower:
    """Decode + preprocess images into a pixel buffer; encode with open_clip."""

    def __init__(self, encoder: models.ClipEncoder, max_pixels: int):
        from PIL import Image

        self.encoder, self.max_pixels = encoder, max_pixels
        self.shape = tuple(encoder.preprocess(Image.new("RGB", (8, 8))).shape)
        self.resize, self.mean, self.std = split_preprocess(encoder.preprocess)

    def alloc(self, n: int, pin: bool) -> dict:
        import torch

        return {"pixels": torch.empty((n, *self.shape), pin_memory=pin)}

    def fill(self, bufs: dict, offset: int, values: list) -> list[Reason]:
        from mmtools.media import decoded_image

        pixels = bufs["pixels"].numpy()
        reasons: list[Reason] = []
        for i, value in enumerate(values):
            try:
                with decoded_image(read(value, "image"), self.max_pixels) as img:
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
        return text_reasons(texts)

    def encode(self, chunk: dict):
        return self.encoder.encode_text(chunk["tokens"])


DOMAIN_SAMPLE = 256  # images of a run checked against the bundled model's domain
DOMAIN_MIN = 8  # images checked before it can warn


class ClipEmbed(EmbedStep):
    """Image and/or text embeddings from an open_clip model."""

    name = "clip_embed"
    media = C.IMAGE
    allowed = ("image", "text")
    _checked = _outside = 0  # images checked against mmtools-shapes' domain; how many fell out

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

    def _finish(self, batch, job):
        shapes_model = self.spec().name == models.SHAPES_MODEL
        if shapes_model and self._checked < DOMAIN_SAMPLE and "image" in self._towers:
            self._check_domain(job)
        return super()._finish(batch, job)

    def _check_domain(self, job) -> None:
        """One warning when most of the first images look nothing like the bundled model's
        generated shapes (photographs, say): its embeddings and scores mean little there."""
        from mmtools.models import shapes

        bufs, futures = job
        tower = self._towers["image"]
        if tower.mean is None:
            return
        decoded = [r is None for f in futures for r in f.result()["image"]]
        pixels = bufs["image"]["pixels"].numpy()[np.flatnonzero(decoded)]
        if not len(pixels):  # no image of the batch decoded: nothing to look at
            return
        rgb = (pixels.transpose(0, 2, 3, 1) * tower.std + tower.mean) * 255
        self._checked += len(rgb)
        self._outside += int((shapes.palette_share(rgb) < shapes.IN_DOMAIN_SHARE).sum())
        if self._checked >= DOMAIN_MIN and 2 * self._outside > self._checked:
            log.warning(
                "%s: %d of the first %d images look unlike the generated shapes it was "
                "trained on (photographs?); its embeddings and scores mean little for them",
                models.SHAPES_MODEL,
                self._outside,
                self._checked,
            )
            self._checked = DOMAIN_SAMPLE  # warn once
