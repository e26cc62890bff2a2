"""`mmtools explain`."""

from __future__ import annotations

from typing import Annotated

import typer

from mmtools.cli.common import setup_logging
from mmtools.errors import EXIT_DATA
from mmtools.io.jsonout import dumps

NOT_FOUND = EXIT_DATA  # an id no dataset of the chain holds


def explain(
    dataset: Annotated[
        str, typer.Argument(metavar="DATASET", help="A finished dataset directory.")
    ],
    ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Row ids to explain.")],
    json: Annotated[
        bool, typer.Option("--json", help="One JSON object per id, a line each.")
    ] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="More logging.")] = False,
) -> None:
    """Say what happened to rows: where each came from and what every step decided.

    Example: mmtools explain curated/ photos/cat.jpg

    Follows the lineage in the manifests back to the ingest, through runs chained with -o
    and through pipes, and reports for each id every step it passed (and the columns that
    step added), then where it ended: in the output (shard and row), rejected (reason,
    detail) or dropped (rule, the value that decided, the row kept instead of a duplicate).
    Exit 0 when every id was found, 3 when some id is in none of the datasets.
    """
    from mmtools.tools.explain import explain as trace
    from mmtools.tools.explain import render

    setup_logging(verbose, False)
    reports = trace(dataset, ids)
    for report in reports:
        typer.echo(dumps(report, sort_keys=True) if json else render(report))
    if any(r["fate"] == "not_found" for r in reports):
        raise typer.Exit(NOT_FOUND)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("explain")(explain)
