"""`mmtools ingest`."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute, setup_logging
from mmtools.steps.ingest.listing import ListingOptions
from mmtools.steps.ingest.step import IngestConfig

LISTING = O.Bundle(
    ListingOptions,
    {
        "path_col": Annotated[str | None, typer.Option(help="Listing column with paths or URLs.")],
        "caption_col": Annotated[str | None, typer.Option(help="Listing column with captions.")],
        "id_col": Annotated[str | None, typer.Option(help="Listing column with ids.")],
        "drop_extra": Annotated[
            bool,
            typer.Option(
                "--drop-extra", help="Drop the listing's other columns (kept by default)."
            ),
        ],
    },
)
OPTIONS = O.Bundle(
    IngestConfig,
    {
        "embed_media": Annotated[
            bool,
            typer.Option("--embed-media/--paths-only", help="Store media bytes, or paths only."),
        ],
        "max_pixels": Annotated[
            int, typer.Option(help="Reject images with more pixels (decompression bombs).")
        ],
        "verify": Annotated[
            bool, typer.Option("--verify/--no-verify", help="Fully decode images to catch damage.")
        ],
        "timeout": Annotated[float, typer.Option(help="Seconds per URL download.")],
    },
)


@O.expand(listing=LISTING, config=OPTIONS, common=O.DATASET.without("inputs").but(batch_size=256))
def ingest(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT",
            help="Folders of media with sidecar captions, "
            "CSV/TSV/JSONL/Parquet listings, or WebDataset .tar shards.",
        ),
    ],
    listing: ListingOptions,
    config: IngestConfig,
    common: Common,
    workers: Annotated[int, typer.Option(min=1, help="Parallel readers.")] = min(
        16, 4 * (os.cpu_count() or 1)
    ),
) -> None:
    """Read media and captions into a dataset.

    Example: mmtools ingest photos/ -o ds/

    Sources: a folder tree of images/audio with sidecar captions (x.jpg + x.txt or x.json);
    a CSV/TSV/JSONL/Parquet listing with a path-or-URL column and a caption column (found
    without flags: url/URL, caption/TEXT, ...; every other column is kept with its type, as
    listing_<name> where mmtools has a column of that name, e.g. listing_width); or
    WebDataset .tar shards as img2dataset writes them (key.jpg + key.txt/key.json). Each
    file is read and fully decoded; width, height, format, byte size and sha256 are added
    (sample rate, channels and duration for audio). Files that cannot be read become reject
    rows in _rejects/ with a reason (zero_byte, not_image, truncated, corrupt,
    decompression_bomb, missing_file, not_audio, ...) naming their source. Caption files
    that are not UTF-8 are read as cp1252 and flagged in text_encoding. Files of a folder
    that are not media are counted in the summary (listed with -v).
    """
    from mmtools.steps.ingest.step import Ingest, ListingSource

    setup_logging(common.verbose, common.quiet)  # the listing logs what it passes over
    source = ListingSource(inputs, listing)
    step = Ingest(replace(config, listing=listing), source.kinds, workers=workers)
    execute("ingest", source, [step], common)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("ingest")(ingest)
