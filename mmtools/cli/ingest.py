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
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            help="On a finished -o output of this same command: re-attempt only the rows "
            "rejected for a transient reason (timeout, connection error, HTTP 429/5xx) and "
            "add those that succeed as new shards.",
        ),
    ] = False,
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

    Rerun the same command to resume an interrupted run; add --retry-failed to a finished
    one to re-attempt the downloads that failed for a transient reason.
    """
    from mmtools.steps.ingest.step import Ingest, ListingSource

    source = ListingSource(inputs, listing)
    step = Ingest(replace(config, listing=listing), source.kinds, workers=workers)
    if retry_failed:
        return retry(source, step, common)
    execute("ingest", source, [step], common)


def retry(source, step, common: Common) -> None:
    """Ingest again the rows of the finished output that failed for a transient reason."""
    from functools import partial

    from mmtools.cli.common import report_line
    from mmtools.errors import UsageError
    from mmtools.io.retry import RetrySink, finished_rejects, generation
    from mmtools.steps.ingest.retry import restrict, retry_ids

    if common.output in (None, "-") or common.overwrite:
        raise UsageError("--retry-failed takes the -o directory of a finished run, no --overwrite")
    manifest, rejects = finished_rejects(common.output)
    ids = retry_ids(rejects)
    if not ids:
        report_line(
            f"mmtools ingest: nothing to retry in {common.output}: none of its "
            f"{rejects.num_rows} rejected rows failed for a transient reason",
            common,
            {"command": "ingest", "output": common.output, "retried": 0},
        )
        return
    restrict(source, ids)
    report_line(f"mmtools ingest: retrying {source.total_rows} failed rows", common)
    sink = partial(RetrySink, ids=ids, generation=generation(manifest) + 1)
    execute("ingest", source, [step], common, dataset=sink)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("ingest")(ingest)
