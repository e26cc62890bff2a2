"""`embed`: L2-normalised image/text embeddings (open_clip) and audio/text embeddings (CLAP).

The shared machinery (prefetching decode, preallocated buffers, reject rows) is in `step`;
the model families' towers in `clip` and `clap`; the steps a command makes in `options`.
"""

from mmtools.steps.embed.clap import ClapEmbed
from mmtools.steps.embed.clip import ClipEmbed
from mmtools.steps.embed.options import embed_steps
from mmtools.steps.embed.step import EmbedConfig, EmbedStep

__all__ = ["ClapEmbed", "ClipEmbed", "EmbedConfig", "EmbedStep", "embed_steps"]
