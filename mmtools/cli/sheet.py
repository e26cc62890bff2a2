"""`mmtools sheet`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, open_source, setup_logging
from mmtools.errors import UsageError

Rows = Annotated[
    int | None,
    typer.Option(
        "-n",
        "--rows",
        min=1,
        help="Tiles to draw (default 48); with --groups, groups (default 8).",
        show_default=False,
    ),
]
Sort = Annotated[
    str | None,
    typer.Option(
        "--sort",
        metavar="COLUMN",
        help="Draw the top rows by this numeric column.",
        show_default=False,
    ),
]
Ascending = Annotated[bool, typer.Option("--ascending", help="With --sort: the lowest rows first.")]
Around = Annotated[
    float | None,
    typer.Option(
        "--around",
        metavar="VALUE",
        help="With --sort: the rows either side of this cut, those kept (>=) above a line, "
        "those dropped below.",
        show_default=False,
    ),
]
Groups = Annotated[
    bool,
    typer.Option(
        "--groups", help="Duplicate groups of dedup --mark, one a row, the kept row first."
    ),
]
Labels = Annotated[
    str | None,
    typer.Option(
        "-c",
        "--columns",
        help="Comma-separated columns printed under each tile (default: the --sort column).",
        show_default=False,
    ),
]
Cols = Annotated[int, typer.Option("--cols", min=1, help="Tiles per row.")]
Tile = Annotated[int, typer.Option("--tile", min=32, help="Thumbnail side, pixels.")]
Html = Annotated[
    str | None,
    typer.Option(
        "--html", metavar="FILE", help="Also write the tiles as an HTML page.", show_default=False
    ),
]


Output = Annotated[
    str | None,
    typer.Option("-o", "--output", metavar="PNG", help="The PNG to write.", show_default=False),
]


@O.expand(common=O.DATASET.only("inputs", "output", "quiet", "verbose").declare(output=Output))
def sheet(
    common: Common,
    n: Rows = None,
    sort: Sort = None,
    ascending: Ascending = False,
    around: Around = None,
    groups: Groups = False,
    labels: Labels = None,
    cols: Cols = 8,
    tile: Tile = 160,
    html: Html = None,
) -> None:
    """Draw rows as a contact sheet: image tiles with id, caption and values (PNG).

    Example: mmtools sheet scored/ --sort clip_score --around 0.28 -o cut.png

    Without --sort, the first rows; --sort COLUMN, the top rows by it; --around VALUE, the
    rows nearest a threshold on both sides, the cut drawn between them (green: kept, red:
    dropped); --groups, the duplicate groups that dedup --mark found, largest first.
    """
    from mmtools.tools.sheet import SheetConfig, render_html, render_png, select

    setup_logging(common.verbose, common.quiet)
    if not common.output or common.output == "-":
        raise UsageError("give the PNG to write with -o sheet.png")
    config = SheetConfig(
        n=n,
        cols=cols,
        sort=sort,
        ascending=ascending,
        around=around,
        groups=groups,
        labels=tuple(O.split_commas(labels)),
        tile=tile,
    )
    source = open_source(common.inputs)
    try:
        layout = select(source, config)
    finally:
        source.close()
    width, height = render_png(layout, config, common.output)
    if html:
        render_html(layout, config, html)
    if not common.quiet:
        tiles = sum(s is not None for s in layout.slots)
        also = f" and {html}" if html else ""
        print(
            f"mmtools sheet: {tiles} tiles, {width}x{height} px -> {common.output}{also}",
            file=sys.stderr,
        )


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("sheet")(sheet)
