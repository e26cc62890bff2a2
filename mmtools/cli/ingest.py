"""`mmtools ingest`."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute


def ingest(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT",
            help="Folders of media with sidecar captions, "
            "CSV/TSV/JSONL/Parquet listings, or WebDataset .tar shards.",
        ),
    ],
    output: O.Output = None,
    path_col: Annotated[str | None, typer.Option(help="Listing column with paths or URLs.")] = None,
    caption_col: Annotated[str | None, typer.Option(help="Listing column with captions.")] = None,
    id_col: Annotated[str | None, typer.Option(help="Listing column with ids.")] = None,
    embed_media: Annotated[
        bool, typer.Option("--embed-media/--paths-only", help="Store media bytes, or paths only.")
    ] = True,
    max_pixels: Annotated[
        int, typer.Option(help="Reject images with more pixels (decompression bombs).")
    ] = 89_478_485,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Fully decode images to catch damage.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds per URL download.")] = 30.0,
    workers: Annotated[int, typer.Option(min=1, help="Parallel readers.")] = min(
        16, 4 * (os.cpu_count() or 1)
    ),
    overwrite: O.Overwrite = False,
    shard_rows: O.ShardRows = 10_000,
    shard_bytes: O.ShardBytes = 1 << 30,
    batch_size: O.BatchSize = 256,
    engine: O.Engine = "local",
    ray_address: O.RayAddress = None,
    ray_concurrency: O.Concurrency = None,
    num_gpus_per_worker: O.GpusPerWorker = None,
    quiet: O.Quiet = False,
    verbose: O.Verbose = False,
    json: O.Json = False,
    wait_lock: O.WaitLock = False,
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
    from mmtools.steps.ingest.listing import ListingOptions
    from mmtools.steps.ingest.step import Ingest, IngestConfig, ListingSource

    opts = ListingOptions(path_col, caption_col, id_col)
    config = IngestConfig(embed_media, max_pixels, verify, timeout, opts)
    source = ListingSource(inputs, opts)
    step = Ingest(config, source.kinds, workers=workers)
    common = Common.of(locals())
    execute("ingest", source, [step], common)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("ingest")(ingest)
