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
Heads = Annotated[
    list[str] | None,
    typer.Option(
        "--head",
        metavar="NAME=PATH",
        help="Add column NAME from a head over the embeddings (repeatable): LAION's aesthetic "
        "(.pth, linear or MLP) and NSFW heads, or one made by mmtools train-head.",
        show_default=False,
    ),
]
Queries = Annotated[
    list[str] | None,
    typer.Option(
        "--query",
        metavar="TEXT",
        help="Add the cosine of each media embedding and TEXT, embedded by the same model "
        "(repeatable); column sim_<text> unless named with --query-name.",
        show_default=False,
    ),
]
QueryNames = Annotated[
    list[str] | None,
    typer.Option(
        "--query-name",
        metavar="NAME",
        help="Column name of each --query, then of each --query-image, in order.",
        show_default=False,
    ),
]
QueryImages = Annotated[
    list[str] | None,
    typer.Option(
        "--query-image",
        metavar="FILE",
        help="Like --query, with an example image (column sim_<file name>).",
        show_default=False,
    ),
]
Force = Annotated[
    bool,
    typer.Option("--force", help="Use a head made for another model of the same size."),
]
NoPair = Annotated[
    bool,
    typer.Option(
        "--no-clip-score",
        help="With --head or --query: leave out clip_score (added when the input has text).",
    ),
]
# The models default to the one recorded for the embedding present (None: not given).
MODEL = O.MODEL.declare(model=ScoreModel, audio_model=ScoreAudioModel).but(
    model=None, audio_model=None
)


@O.expand(common=O.DATASET.but(batch_size=256), config=MODEL)
def score(
    common: Common,
    config: EmbedConfig,
    media: Media = None,
    head: Heads = None,
    query: Queries = None,
    query_name: QueryNames = None,
    query_image: QueryImages = None,
    force: Force = False,
    no_clip_score: NoPair = False,
) -> None:
    """Add clip_score (image-text) or audio_text_score: the cosine of the two embeddings;
    and scores from heads and queries over the media embedding.

    Example: mmtools score embedded/ -o scored/

    Example: mmtools score embedded/ --head aesthetic=sa_0_4_vit_l_14_linear.pth --query
    "a watermark" -o scored/

    Scores are raw cosines in [-1, 1]; LAION-400M's threshold of 0.28 is on this scale for
    OpenAI's ViT-B/32 (--model ViT-B-32 --pretrained openai, then mmtools filter --where
    "clip_score >= 0.28"); other models need their own threshold. Embeddings missing from
    the input are computed first, exactly as mmtools embed would (same options), and kept
    in the output; the model defaults to the one recorded for the embedding present.
    Embeddings made by different models (per the metadata) are refused. Rows with a null,
    NaN or zero embedding become reject rows.

    --query and --query-image embed the query with the model recorded for the media
    embedding (a different --model is refused). --head NAME=PATH reads LAION's published
    heads and mmtools' own (mmtools train-head); embeddings are L2-normalised first, and a
    head made for another model or size is refused (exit 3; --force accepts another model).
    """
    from mmtools.steps.score import probe_config, score_steps

    probes = probe_config(head or [], query or [], query_name or [], query_image or [], force)
    source = open_source(common.inputs)
    steps = score_steps(source.schema, media, config, probes, pair=not no_clip_score)
    execute("score", source, steps, common)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("score")(score)
