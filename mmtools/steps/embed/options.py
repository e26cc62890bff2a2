"""The embedding steps `embed` (and `score`, for missing embeddings) make from one config."""

from __future__ import annotations

from dataclasses import replace

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.steps.embed.clap import ClapEmbed
from mmtools.steps.embed.clip import ClipEmbed
from mmtools.steps.embed.step import EmbedConfig


def embed_steps(names: list[str], modalities: list[str] | None, config: EmbedConfig) -> list:
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
        steps.append(ClipEmbed(replace(config, modalities=clip)))
    if clap:
        steps.append(ClapEmbed(replace(config, modalities=clap)))
    return steps
