"""`mmtools score`."""

from __future__ import annotations

from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute, open_source
from mmtools.steps.embed.step import EmbedConfig

Media = Annotated[
    str | None,
    typer.Option(
        "--media",
        help="Score image (clip_score) or audio (audio_text_score) against "
        "the text; default: the one the input has.",
        show_default=False,
    ),
]
ScoreModel = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="open_clip model for missing embeddings (default: the model "
        "of the embedding present, else ViT-B-32).",
        show_default=False,
    ),
]
ScoreAudioModel = Annotated[
    str | None,
    typer.Option(
        "--audio-model",
        help="CLAP model for missing embeddings (default: the model "
        "of the embedding present, else laion/clap-htsat-unfused).",
        show_default=False,
    ),
]
# The models default to the one recorded for the embedding present (None: not given).
MODEL = O.MODEL.declare(model=ScoreModel, audio_model=ScoreAudioModel).but(
    model=None, audio_model=None
)


@O.expand(common=O.DATASET.but(batch_size=256), config=MODEL)
def score(common: Common, config: EmbedConfig, media: Media = None) -> None:
    """Add clip_score (image-text) or audio_text_score: the cosine of the two embeddings.

    Example: mmtools score embedded/ -o scored/

    Scores are raw cosines in [-1, 1]; LAION-400M's threshold of 0.28 is on this scale for
    OpenAI's ViT-B/32 (--model ViT-B-32 --pretrained openai, then mmtools filter --where
    "clip_score >= 0.28"); other models need their own threshold. Embeddings missing from
    the input are computed first, exactly as mmtools embed would (same options), and kept
    in the output; the model defaults to the one recorded for the embedding already
    present. Embeddings made by different models (per the metadata) are refused. Rows with
    a null, NaN or zero embedding become reject rows.
    """
    from mmtools.steps.score.step import score_steps

    source = open_source(common.inputs)
    steps = score_steps(source.schema, media, config)
    execute("score", source, steps, common)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("score")(score)
