"""The model options `embed` and `score` share, and the embedding steps they make."""

from __future__ import annotations

from dataclasses import dataclass

from mmtools import columns as C
from mmtools import models
from mmtools.errors import UsageError
from mmtools.steps.embed.clap import ClapEmbed
from mmtools.steps.embed.clip import ClipEmbed
from mmtools.steps.embed.step import EmbedConfig


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
