"""open_clip image and text towers: `ClipEmbed`."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmtools import columns as C
from mmtools import models
from mmtools.media import MediaError, read
from mmtools.steps.embed.decoders import tensors
from mmtools.steps.embed.step import (
    EmbedConfig,
    EmbedStep,
    Reason,
    split_preprocess,
    text_reasons,
)

log = logging.getLogger(__name__)


@dataclass
class ImageDecoder:
    """Image cells -> rows of the model's input: what a decoding worker (a thread, or a
    process: it is picklable) needs. With open_clip's usual transform (PIL resize and crop,
    then ToTensor + Normalize) it normalises the resized 8-bit pixels in place, with
    ToTensor + Normalize's float32 operations; `raw` keeps the 8-bit pixels instead."""

    preprocess: Any  # the model's whole transform
    resize: Any  # its PIL part, or None when it does not end in ToTensor + Normalize
    mean: Any
    std: Any
    shape: tuple  # (channels, height, width) of the model's input
    max_pixels: int
    raw: bool = False
    min_side: int = 0  # JPEGs decode at reduced scale down to this shorter side (0: full)

    def specs(self, n: int) -> dict:
        """The buffers of `n` rows: {key: (shape, numpy dtype)}."""
        if self.raw:
            c, h, w = self.shape
            return {"pixels": ((n, h, w, c), np.uint8)}
        return {"pixels": ((n, *self.shape), np.float32)}

    def fill(self, arrays: dict, offset: int, values: list) -> list[Reason]:
        from mmtools.media import decoded_image

        pixels = arrays["pixels"]
        reasons: list[Reason] = []
        for i, value in enumerate(values):
            try:
                data = read(value, "image")
                with decoded_image(data, self.max_pixels, self.min_side) as img:
                    self._put(img, pixels[offset + i])
                reasons.append(None)
            except MediaError as e:
                reasons.append((e.reason, e.detail))
        return reasons

    def _put(self, img, out: np.ndarray) -> None:
        """Write one image's model input into its row of the buffer."""
        if self.resize is None:
            out[:] = self.preprocess(img).numpy()
            return
        rgb = np.asarray(self.resize(img))  # (H, W, 3) uint8
        if self.raw:
            out[:] = rgb
            return
        for k in range(3):  # ToTensor + Normalize in place, the same float32 operations
            np.divide(rgb[..., k], np.float32(255.0), out=out[k], dtype=np.float32)
            np.subtract(out[k], self.mean[k], out=out[k])
            np.divide(out[k], self.std[k], out=out[k])


class _ImageTower:
    """Decode + preprocess images into a pixel buffer (`ImageDecoder`); encode with open_clip.

    On a GPU the buffer holds the 8-bit pixels (a quarter of the floats' size to copy) and
    the device looks each value up in a table of every level's result of ToTensor +
    Normalize's operations: the model sees the same inputs as on the CPU, bit for bit.
    """

    serial = False  # filled in slices by every decoding worker at once

    def __init__(self, encoder: models.ClipEncoder, config: EmbedConfig, on_device: bool):
        from PIL import Image

        self.encoder = encoder
        shape = tuple(encoder.preprocess(Image.new("RGB", (8, 8))).shape)
        resize, mean, std = split_preprocess(encoder.preprocess)
        self.levels = None if resize is None else normalised_levels(mean, std)
        raw = on_device and self.levels is not None  # the buffer holds 8-bit pixels
        # --reduced-jpeg: decoded at no less than twice the model's input (see media)
        min_side = 2 * max(shape[1:]) if config.reduced_jpeg else 0
        self.decoder = ImageDecoder(
            encoder.preprocess, resize, mean, std, shape, config.max_pixels, raw, min_side
        )
        self._device_levels = None

    @property
    def shape(self) -> tuple:
        return self.decoder.shape

    @property
    def raw(self) -> bool:
        return self.decoder.raw

    def alloc(self, n: int, pin: bool) -> dict:
        return tensors(self.decoder.specs(n), pin)

    def fill(self, bufs: dict, offset: int, values: list) -> list[Reason]:
        return self.decoder.fill({k: v.numpy() for k, v in bufs.items()}, offset, values)

    def encode(self, chunk: dict):
        pixels = chunk["pixels"]
        return self.encoder.encode_image(self._normalise(pixels) if self.raw else pixels)

    def _normalise(self, pixels):
        """(n, H, W, 3) uint8 on the device -> (n, 3, H, W) float32, through the table."""
        import torch

        if self._device_levels is None or self._device_levels.device != pixels.device:
            self._device_levels = torch.from_numpy(self.levels).to(pixels.device)
        n, h, w, c = pixels.shape
        out = torch.empty((n, c, h, w), dtype=torch.float32, device=pixels.device)
        for k in range(c):
            out[:, k] = self._device_levels[k][pixels[..., k].int()]
        return out


def normalised_levels(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(3, 256) float32: channel c's value for level v, as ToTensor + Normalize compute it
    (v / 255 in float32, minus the mean, over the std)."""
    levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    return np.ascontiguousarray(((levels - mean) / std).astype(np.float32).T)


class _ClipTextTower:
    """Tokenise captions (one thread at a time: tokenizers are not thread-safe)."""

    serial = True  # one task at a time (the tokenizer is not thread-safe): whole batches

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
            "image": lambda: _ImageTower(encoder, self.config, device.type == "cuda"),
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

        bufs, jobs = job
        tower = self._towers["image"]
        if tower.levels is None:
            return
        decoded = [r is None for f in jobs["image"] for r in f.result()]
        pixels = bufs["image"]["pixels"].numpy()[np.flatnonzero(decoded)]
        if not len(pixels):  # no image of the batch decoded: nothing to look at
            return
        dec = tower.decoder
        rgb = pixels if dec.raw else (pixels.transpose(0, 2, 3, 1) * dec.std + dec.mean) * 255
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
