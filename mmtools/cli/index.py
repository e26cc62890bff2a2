"""`mmtools index`."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, open_source, setup_logging
from mmtools.errors import UsageError

Column = Annotated[
    str | None,
    typer.Option(
        "--column",
        help="Embedding column to index (default image_embedding; with --append, the index's own).",
        show_default=False,
    ),
]
MaxMemory = Annotated[
    str,
    typer.Option(
        "--max-memory",
        help="Memory the build may use and the finished index must fit in (K, M, G: powers "
        "of 1024).",
    ),
]
ExactBelow = Annotated[
    int,
    typer.Option(
        "--exact-below",
        min=0,
        help="Build an exact (flat) index below this many rows; a compressed (IVF) one above.",
    ),
]
PartRows = Annotated[
    int | None,
    typer.Option(
        "--part-rows",
        min=1,
        help="Rows added per part, the unit a killed build resumes from (default: from "
        "--max-memory).",
        show_default=False,
    ),
]
Append = Annotated[
    bool, typer.Option("--append", help="Add the input's rows to an existing index, same model.")
]
Kmeans = Annotated[
    int | None,
    typer.Option(
        "--kmeans",
        min=1,
        metavar="K",
        help="Index K k-means centres of the input instead of its rows (reference centroids "
        "for filter --near).",
        show_default=False,
    ),
]


Output = Annotated[
    str | None,
    typer.Option(
        "-o", "--output", metavar="INDEX", help="The index directory.", show_default=False
    ),
]
Inputs = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="INPUT",
        help="Dataset directories, Parquet files or globs (not a stream: they are read twice).",
        show_default=False,
    ),
]
OPTIONS = O.DATASET.only(
    "inputs", "output", "overwrite", "quiet", "verbose", "json", "wait_lock"
).declare(inputs=Inputs, output=Output)


@O.expand(common=OPTIONS)
def index(
    common: Common,
    column: Column = None,
    max_memory: MaxMemory = "4GB",
    exact_below: ExactBelow = 100_000,
    part_rows: PartRows = None,
    append: Append = False,
    kmeans: Kmeans = None,
    seed: O.Seed = 0,
) -> None:
    """Build a nearest-neighbour index (faiss) of an embedding column, for search and
    filter --near.

    Example: mmtools index embedded/ -o idx/ --max-memory 4GB

    The index keeps each vector's row id and input row, the embedding model's metadata and
    the input's fingerprint. Exact inner-product search below --exact-below rows; above, an
    IVF index whose lists, code (half floats, 8-bit or product quantization) and nprobe
    follow from the row count and --max-memory. The input is read part by part, never whole;
    a killed build resumes when rerun. --append adds another dataset embedded by the same
    model without rebuilding (another model is refused, exit 6). --kmeans K stores K
    k-means centres of the input instead: reference centroids for `filter --near`.
    """
    from mmtools.sizes import parse_size
    from mmtools.tools.index.build import IndexBuild, IndexConfig

    setup_logging(common.verbose, common.quiet)
    if not common.output or common.output == "-":
        raise UsageError("give the index directory with -o INDEX")
    config = IndexConfig(
        column=column,
        max_memory=parse_size(max_memory),
        exact_below=exact_below,
        part_rows=part_rows,
        kmeans=kmeans,
        seed=seed,
        append=append,
    )
    argv = ["mmtools", *sys.argv[1:]]
    build = IndexBuild(
        common.output,
        config,
        overwrite=common.overwrite,
        wait_lock=common.wait_lock,
        argv=argv,
        quiet=common.quiet,
    )
    source = open_source(common.inputs)
    try:
        report = build.run(source)
    finally:
        source.close()
    if common.json:
        print(json.dumps(report.as_dict(), sort_keys=True), file=sys.stderr)
    elif not common.quiet:
        print(report.line(), file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("index")(index)
