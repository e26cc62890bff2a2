"""CLAP audio and text towers (transformers): `ClapEmbed`."""

from __future__ import annotations

import threading

import numpy as np

from mmtools import columns as C
from mmtools import models
from mmtools.media import MediaError, read
from mmtools.steps.embed.step import (
    EmbedStep,
    Reason,
    text_reasons,
)

CLAP_TEXT_TOKENS = 77  # LAION-CLAP pads and truncates captions to 77 tokens


class _AudioTower:
    """Decode, resample, mix down and cut audio to the model's window; CLAP features."""

    serial = False  # filled in slices by every decoding worker at once

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
                wav, _ = decode_audio(read(value, "audio"), sample_rate=sr, mono=True)
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

    serial = True  # one task at a time (the tokenizer is not thread-safe): whole batches

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
        return text_reasons(texts)

    def encode(self, chunk: dict):
        return self.encoder.encode_text(chunk)


class ClapEmbed(EmbedStep):
    """Audio and/or text embeddings from a CLAP model (Hugging Face transformers)."""

    name = "clap_embed"
    media = C.AUDIO
    allowed = ("audio", "text")

    def spec(self) -> models.ClapSpec:
        """The resolved CLAP model."""
        if self._spec is None:
            self._spec = models.resolve_clap(self.config.audio_model)
        return self._spec

    def _load(self, device) -> dict:
        encoder = models.load_clap(self.spec(), device, self.config.precision)
        towers = {"audio": lambda: _AudioTower(encoder), "text": lambda: _ClapTextTower(encoder)}
        return {m: towers[m]() for m in self.modalities}
