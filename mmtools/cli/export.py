"""`mmtools export`."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, open_source, setup_logging


@O.expand(common=O.DATASET.only("inputs", "overwrite", "shard_rows", "quiet", "verbose"))
def export(
    common: Common,
    output: Annotated[str, typer.Option("-o", "--output", help="Output directory.")] = ...,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="webdataset (tars), jsonl (data.jsonl + "
            "media/), or folder (media + .txt captions).",
        ),
    ] = "webdataset",
) -> None:
    """Write a dataset out as WebDataset tars, JSONL with a media folder, or a media folder.

    Example: mmtools export ds/ --format webdataset -o shards/

    WebDataset samples are numbered keys with .jpg/.png/.wav, .txt (caption) and .json (the
    other scalar columns, id included), as img2dataset writes them.
    """
    from mmtools.tools.export import export as run_export
    from mmtools.tools.export import prepare_output

    setup_logging(common.verbose, common.quiet)
    t0 = time.monotonic()
    source = open_source(common.inputs)
    prepare_output(output, common.overwrite)
    stats = run_export(source, output, fmt, common.shard_rows)
    if not common.quiet:
        print(
            f"mmtools export: {stats.rows} rows, {stats.files} files "
            f"({stats.skipped_text()}), {time.monotonic() - t0:.1f} s "
            f"-> {output}",
            file=sys.stderr,
        )


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("export")(export)
