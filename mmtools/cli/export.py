"""`mmtools export`."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute, open_source

Output = Annotated[
    str,
    typer.Option("-o", "--output", help="Output directory (the tars, JSONL or media files)."),
]
ShardRows = Annotated[
    int,
    typer.Option(
        "--shard-rows",
        min=1,
        help="Samples per output shard: per .tar (webdataset) or .jsonl file (jsonl); "
        "folder writes no shards but commits (and resumes) every this many samples.",
    ),
]
Format = Annotated[
    str,
    typer.Option(
        "--format",
        "-f",
        help="webdataset (tars), jsonl (NNNNN.jsonl + media/), or folder (media + .txt "
        "captions + .json metadata).",
    ),
]
EXPORT = O.LIGHT.without("engine", "ray_address", "ray_concurrency", "num_gpus_per_worker")


@O.expand(common=EXPORT.declare(output=Output, shard_rows=ShardRows).but(output=...))
def export(common: Common, fmt: Format = "webdataset") -> None:
    """Write a dataset out as WebDataset tars, JSONL with a media folder, or a media folder.

    Example: mmtools export ds/ --format webdataset -o shards/

    Every sample keeps its id, its media bytes and every other column. WebDataset: tars
    00000.tar, ... of samples KEY.jpg (.png, .wav, ...), KEY.txt (the caption), KEY.json
    (every other column but embeddings, id included) and KEY.COLUMN.npy (each embedding), as
    img2dataset writes them; KEY is the id with every character but letters, digits, _ and
    - (and a leading _) %-escaped. jsonl: one object per row (every column, embeddings as
    lists, `file`: the media file under media/). folder: KEY.jpg, KEY.txt and KEY.json side
    by side. `mmtools ingest shards/*.tar` (or *.jsonl, or the folder) reads it back: the
    same ids, bytes and columns.

    Like every command it commits as it goes and resumes when rerun; a finished export is
    left as it is; another input or format behind the same output is refused unless
    --overwrite (which empties the directory first).
    """
    from mmtools.tools.export import ExportSink

    execute("export", open_source(common.inputs), [], common, dataset=partial(ExportSink, fmt=fmt))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("export")(export)
