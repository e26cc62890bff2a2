"""`mmtools ingest`."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute
from mmtools.steps.ingest.listing import ListingOptions
from mmtools.steps.ingest.step import IngestConfig

LISTING = O.Bundle(
    ListingOptions,
    {
        "path_col": Annotated[str | None, typer.Option(help="Listing column with paths or URLs.")],
        "caption_col": Annotated[str | None, typer.Option(help="Listing column with captions.")],
        "id_col": Annotated[str | None, typer.Option(help="Listing column with ids.")],
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
        "timeout": Annotated[
            float,
            typer.Option(
                min=0.1,
                help="Deadline in seconds for each URL: connecting, reading and every retry.",
            ),
        ],
        "retries": Annotated[
            int,
            typer.Option(
                min=0,
                help="Retries of a URL after a transient failure (timeout, connection error, "
                "HTTP 429 or 5xx), with backoff, within the deadline.",
            ),
        ],
        "max_bytes": Annotated[
            int,
            typer.Option(min=1, help="Reject a download over this many bytes (too_large)."),
        ],
        "user_agent": Annotated[str, typer.Option(help="User-Agent header of downloads.")],
        "disallowed_header_directives": Annotated[
            str,
            typer.Option(
                help="X-Robots-Tag directives that opt a URL out (opted_out), comma-separated; "
                "'' honours none. 'agent: noai' applies when agent is our User-Agent's name.",
            ),
        ],
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
    a CSV/TSV/JSONL/Parquet listing with a path-or-URL column and a caption column; or
    WebDataset .tar shards as img2dataset writes them (key.jpg + key.txt/key.json). Each
    file is read and fully decoded; width, height, format, byte size and sha256 are added
    (sample rate, channels and duration for audio). Files that cannot be read become reject
    rows in _rejects/ with a reason (zero_byte, not_image, truncated, corrupt,
    decompression_bomb, missing_file, not_audio, ...); a URL that cannot be downloaded gives
    timeout, http_error, connection_error, dns_error, too_large or opted_out.
    """
    from mmtools.steps.ingest.step import Ingest, ListingSource

    source = ListingSource(inputs, listing)
    step = Ingest(replace(config, listing=listing), source.kinds, workers=workers)
    execute("ingest", source, [step], common)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("ingest")(ingest)
