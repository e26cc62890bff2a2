"""`mmtools mixup`."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute, open_source
from mmtools.models.device import cpus
from mmtools.steps.mixup.step import MixupConfig

OPTIONS = O.Bundle(
    MixupConfig,
    {
        "mode": Annotated[
            str, typer.Option(help="image-text (MixGen), audio-text, or embedding (geodesic).")
        ],
        "alpha": Annotated[float, typer.Option(help="λ is drawn from Beta(α, α).")],
        "lam": Annotated[
            float | None,
            typer.Option(
                "--lam",
                help="Fixed λ (weight of the first parent) instead of Beta(α, α).",
                show_default=False,
            ),
        ],
        "fraction": Annotated[
            float, typer.Option(help="Mixed rows to make, as a fraction of the pairable rows.")
        ],
        "pairing": Annotated[
            str,
            typer.Option(
                help="random, nearest[:COLUMN] (nearest neighbour in an embedding "
                "column) or same:COLUMN (within a label or group)."
            ),
        ],
        "columns": Annotated[
            str | None,
            typer.Option(
                help="Embedding mode: comma-separated columns to mix; A:B mixes the first "
                "parent's A with the partner's B (cross-modal). Default: all embeddings.",
                show_default=False,
            ),
        ],
        "keep_originals": Annotated[
            bool,
            typer.Option("--keep-originals", help="Write the input rows too, not only mixes."),
        ],
        "format": Annotated[
            str | None,
            typer.Option(
                "--format",
                help="Encoding of mixed media: jpeg, png or webp (images; "
                "default jpeg), wav or flac (audio; default wav).",
                show_default=False,
            ),
        ],
        "quality": Annotated[int, typer.Option(help="JPEG/WebP quality of mixed images.")],
        "sample_rate": Annotated[
            int | None,
            typer.Option(
                help="Audio rate of the mix (default: the first parent's).", show_default=False
            ),
        ],
        "seed": O.Seed,
    },
).but(columns=None)  # a comma-separated string on the command line; a list in the config


@O.expand(config=OPTIONS, common=O.DATASET.but(batch_size=256))
def mixup(
    config: MixupConfig,
    common: Common,
    workers: Annotated[int, typer.Option(min=1, help="Decoding threads.")] = cpus(),
) -> None:
    """Write mixed rows (MixGen, audio or embedding mixup) with their provenance.

    Example: mmtools mixup ds/ --lam 0.5 --fraction 0.3 --keep-originals -o mixed/

    Each mixed row has a new id mixup:<first>+<second>, mixup_parents (the two ids),
    mixup_lambda (λ, the weight of the first parent) and mixup_mode. image-text blends the
    two images pixel-wise (the second resized, bilinear, to the first's size) and joins the
    captions with a space. audio-text mixes the waveforms as mono at one rate (the shorter
    zero-padded) and scales the mix down by its peak only if it would clip. embedding mixes
    L2-normalised vectors by slerp on the unit hypersphere; mixed rows carry only the mixed
    embeddings and provenance. Columns that would be stale for a mixed row are null; width,
    height, format, size and sha256 are recomputed. Pairs are fixed from the sorted ids and
    --seed, so the output is the same whatever the shard layout, batch size or resume. A
    parent that cannot be decoded becomes a reject row and its pairs are skipped.
    """
    from mmtools.steps.mixup import Mixup

    source = open_source(common.inputs)
    step = Mixup(replace(config, columns=O.split_commas(config.columns)), workers=workers)
    execute("mixup", source, [step], common)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("mixup")(mixup)
