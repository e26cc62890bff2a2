"""`mmtools ingest`."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute
from mmtools.steps.ingest.listing import ListingOptions
from mmtools.steps.ingest.resize import ResizeOptions
from mmtools.steps.ingest.step import IngestConfig

LISTING = O.Bundle(
    ListingOptions,
    {
        "path_col": Annotated[str | None, typer.Option(help="Listing column with paths or URLs.")],
        "caption_col": Annotated[str | None, typer.Option(help="Listing column with captions.")],
        "id_col": Annotated[str | None, typer.Option(help="Listing column with ids.")],
    },
)
_RESIZE = "Resizing (img2dataset's options)"
RESIZE = O.Bundle(
    ResizeOptions,
    {
        "image_size": Annotated[
            int, typer.Option(min=1, help="Target side in pixels.", rich_help_panel=_RESIZE)
        ],
        "resize_mode": Annotated[
            str,
            typer.Option(
                help="no (keep images), keep_ratio (shorter side = N), keep_ratio_largest "
                "(longer side = N), center_crop (N x N from the centre), border (longer side "
                "= N, padded white to N x N).",
                rich_help_panel=_RESIZE,
            ),
        ],
        "resize_only_if_bigger": Annotated[
            bool,
            typer.Option(
                "--resize-only-if-bigger",
                help="Keep images whose deciding side is at most N as they are.",
                rich_help_panel=_RESIZE,
            ),
        ],
        "min_image_size": Annotated[
            int,
            typer.Option(
                min=0,
                help="Reject (too_small) images with a shorter side under this.",
                rich_help_panel=_RESIZE,
            ),
        ],
        "max_image_area": Annotated[
            float | None,
            typer.Option(
                help="Reject (too_large_area) images with more pixels than this.",
                rich_help_panel=_RESIZE,
                show_default=False,
            ),
        ],
        "max_aspect_ratio": Annotated[
            float | None,
            typer.Option(
                help="Reject (bad_aspect) images whose long/short side ratio is over this.",
                rich_help_panel=_RESIZE,
                show_default=False,
            ),
        ],
        "encode_format": Annotated[
            str | None,
            typer.Option(
                help="jpg, png or webp; default: jpg when resizing, else keep the source bytes.",
                rich_help_panel=_RESIZE,
                show_default=False,
            ),
        ],
        "encode_quality": Annotated[
            int | None,
            typer.Option(
                help="JPEG/WebP quality (default 95) or PNG compression level 0-9 (default 9).",
                rich_help_panel=_RESIZE,
                show_default=False,
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


@O.expand(
    listing=LISTING,
    resize=RESIZE,
    config=OPTIONS,
    common=O.DATASET.without("inputs").but(batch_size=256),
)
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
    resize: ResizeOptions,
    config: IngestConfig,
    common: Common,
    workers: Annotated[int, typer.Option(min=1, help="Parallel readers.")] = min(
        16, 4 * (os.cpu_count() or 1)
    ),
) -> None:
    """Read media and captions into a dataset.

    Example: mmtools ingest photos/ -o ds/

    Sources: a folder tree of images/audio with sidecar captions (x.jpg + x.txt or x.json);
    a CSV/TSV/JSONL/Parquet listing with a path-or-URL column and a caption column; or
    WebDataset .tar shards as img2dataset writes them (key.jpg + key.txt/key.json). Each
    file is read and fully decoded; width, height, format, byte size and sha256 are added
    (sample rate, channels and duration for audio). Files that cannot be read become reject
    rows in _rejects/ with a reason (zero_byte, not_image, truncated, corrupt,
    decompression_bomb, missing_file, not_audio, ...).
    """
    from mmtools.steps.ingest.step import Ingest, ListingSource

    source = ListingSource(inputs, listing)
    step = Ingest(replace(config, listing=listing, resize=resize), source.kinds, workers=workers)
    execute("ingest", source, [step], common)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("ingest")(ingest)
