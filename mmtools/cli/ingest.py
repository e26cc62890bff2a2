"""`mmtools ingest`."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute, setup_logging
from mmtools.models.device import cpus
from mmtools.steps.ingest.listing import ListingOptions
from mmtools.steps.ingest.resize import ResizeOptions
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


def _resize(kind, help: str, *names: str, **kw) -> object:
    """A resizing option, named and meaning as img2dataset's."""
    return Annotated[kind, typer.Option(*names, help=help, **kw)]


_NONE = {"show_default": False}
RESIZE = O.Bundle(
    ResizeOptions,
    {
        "image_size": _resize(int, "Target side in pixels.", min=1),
        "resize_mode": _resize(
            str,
            "no (keep images), keep_ratio (shorter side = N), keep_ratio_largest (longer side = "
            "N), center_crop (N x N from the centre), border (longer side = N, padded white to "
            "N x N).",
        ),
        "resize_only_if_bigger": _resize(
            bool,
            "Keep images whose deciding side is at most N as they are.",
            "--resize-only-if-bigger",
        ),
        "min_image_size": _resize(
            int, "Reject (too_small) images with a shorter side under this.", min=0
        ),
        "max_image_area": _resize(
            float | None, "Reject (too_large_area) images with more pixels than this.", **_NONE
        ),
        "max_aspect_ratio": _resize(
            float | None,
            "Reject (bad_aspect) images with a long/short side ratio over this.",
            **_NONE,
        ),
        "encode_format": _resize(
            str | None,
            "jpg, png or webp; default: jpg when resizing, else the source bytes.",
            **_NONE,
        ),
        "encode_quality": _resize(
            int | None, "JPEG/WebP quality (default 95); PNG compression 0-9 (default 9).", **_NONE
        ),
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


Workers = Annotated[
    int,
    typer.Option(
        min=1,
        help="Parallel readers of URLs and object-store keys; local files take at most "
        "one per CPU (more only contend for Python's lock).",
    ),
]


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
    workers: Workers = min(16, 4 * cpus()),
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
    a CSV/TSV/JSONL/Parquet listing with a path-or-URL column and a caption column (found
    without flags: url/URL, caption/TEXT, ...; every other column is kept with its type, as
    listing_<name> where mmtools has a column of that name, e.g. listing_width); or
    WebDataset .tar shards as img2dataset writes them (key.jpg + key.txt/key.json). Each
    file is read and fully decoded; width, height, format, byte size and sha256 are added
    (sample rate, channels and duration for audio). Files that cannot be read become reject
    rows in _rejects/ with a reason (zero_byte, not_image, truncated, corrupt,
    decompression_bomb, missing_file, not_audio, ...); a URL that cannot be downloaded gives
    timeout, http_error, connection_error, dns_error, too_large or opted_out.
    Rejects name their source. Caption files that are not UTF-8 are read as cp1252 and
    flagged in text_encoding. Files of a folder that are not media are counted in the
    summary (listed with -v).

    Resizing, as img2dataset does it and with its pixels: --image-size 256 --resize-mode
    keep_ratio|keep_ratio_largest|center_crop|border re-encodes each image (--encode-format,
    default jpg) and keeps its size in original_width/original_height; --min-image-size,
    --max-image-area and --max-aspect-ratio reject (too_small, too_large_area, bad_aspect).

    Rerun the same command to resume an interrupted run; add --retry-failed to a finished
    one to re-attempt the downloads that failed for a transient reason.
    """
    from mmtools.steps.ingest.step import Ingest, ListingSource

    setup_logging(common.verbose, common.quiet)  # the listing logs what it passes over
    source = ListingSource(inputs, listing)
    step = Ingest(replace(config, listing=listing, resize=resize), source.kinds, workers=workers)
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
    if common.max_reject_rate is None:  # its rows were rejects already: failing again is news,
        common = replace(common, max_reject_rate=1.0)  # not a disaster (unless asked)
    execute("ingest", source, [step], common, dataset=sink)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("ingest")(ingest)
