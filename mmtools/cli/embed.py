"""`mmtools embed`."""

from __future__ import annotations

from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute, open_source
from mmtools.steps.embed.step import EmbedConfig

Modalities = Annotated[
    str | None,
    typer.Option(
        "--modalities",
        help="Comma-separated: image, text, audio (default: every one the input has).",
        show_default=False,
    ),
]


@O.expand(common=O.DATASET.but(batch_size=256), config=O.MODEL)
def embed(common: Common, config: EmbedConfig, modalities: Modalities = None) -> None:
    """Add L2-normalised image_embedding, text_embedding and/or audio_embedding columns.

    Example: mmtools embed ds/ --model ViT-B-32 --pretrained laion2b_s34b_b79k -o embedded/

    Images and their text go through an open_clip model: --model takes any open_clip
    architecture with --pretrained (a tag, a checkpoint file or directory, or 'none' for a
    random init from the config), an hf-hub: id, a local open_clip directory, a model config
    .json, or mmtools-shapes (the bundled offline model). Audio and its text go through CLAP
    (--audio-model); audio is decoded, mixed down, resampled to the model's rate and cut to
    its window (10 s for LAION CLAP). Text goes with the image model when images are embedded.
    Model, weights and precision are stored in the output metadata. Rows whose media cannot
    be decoded, whose text is null or blank (no_text), or whose embedding is NaN or zero
    (bad_embedding) become reject rows in _rejects/. --batch-size is also the model batch.
    """
    from mmtools.steps.embed import embed_steps

    source = open_source(common.inputs)
    steps = embed_steps(source.schema.names, O.split_commas(modalities), config)
    execute("embed", source, steps, common)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("embed")(embed)
