"""`mmtools head`."""

from __future__ import annotations

from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, open_source, setup_logging


@O.expand(common=O.DATASET.only("inputs", "verbose"))
def head(
    common: Common,
    n: Annotated[int, typer.Option("-n", "--rows", min=0, help="Number of rows to show.")] = 5,
    columns: Annotated[
        str | None, typer.Option("-c", "--columns", help="Comma-separated columns to show.")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    width: Annotated[int, typer.Option(help="Widest cell in the table, in characters.")] = 40,
) -> None:
    """Show the first rows of a dataset; media appear as format and size, not bytes.

    Example: mmtools ingest photos/ | mmtools head -n 3

    Reads only what it shows, so it ends a pipe early without errors upstream.
    """
    from mmtools.tools.preview import preview_rows, render_table

    setup_logging(common.verbose, False)
    source = open_source(common.inputs)
    wanted = [c.strip() for c in columns.split(",")] if columns else None
    if wanted:
        from mmtools.columns import require_named

        require_named(source.schema, wanted, "-c/--columns")
    rows = preview_rows(source, n, wanted)
    if json:
        from mmtools.io.jsonout import dumps

        for row in rows:
            typer.echo(dumps(row))
    else:
        typer.echo(render_table(rows, wanted or source.schema.names, width))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("head")(head)
