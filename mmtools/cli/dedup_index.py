"""`mmtools dedup-index`."""

from __future__ import annotations

import json as jsonlib
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import open_source, setup_logging
from mmtools.sizes import human_bytes


def dedup_index(
    path: Annotated[str, typer.Argument(metavar="DIR", help="The index directory.")],
    rebuild_from: Annotated[
        list[str] | None,
        typer.Option(
            "--rebuild-from",
            metavar="DATASET",
            help="Rebuild the index from these datasets (repeat): one generation each, "
            "with the settings the index records; generations of other runs are dropped.",
            show_default=False,
        ),
    ] = None,
    wait_lock: O.WaitLock = False,
    json: O.Json = False,
    verbose: O.Verbose = False,
) -> None:
    """Describe (or rebuild) the index of `dedup --index`: rows, methods, settings, size on
    disk and the runs that fed it.

    Example: mmtools dedup-index seen/   (also: mmtools info seen/)

    Example: mmtools dedup-index seen/ --rebuild-from day1/ --rebuild-from day2/
    """
    from mmtools.steps.dedup.index import describe, is_index

    setup_logging(verbose, json)
    if rebuild_from:
        from mmtools.steps.dedup.rebuild import rebuild

        rows = rebuild(path, rebuild_from, open_source, wait=wait_lock)
        typer.echo(
            f"mmtools dedup-index: rebuilt {path} from {len(rebuild_from)} datasets: {rows} rows",
            err=True,
        )
    elif not is_index(path):
        from mmtools.errors import UsageError

        raise UsageError(
            f"{path} is not a dedup index (no _index.json); make one with "
            "`mmtools dedup DATASET --index DIR -o OUT`"
        )
    show(describe(path), json)


def show(desc: dict, json: bool) -> None:
    """Print an index's description (as JSON with `json`)."""
    if json:
        typer.echo(jsonlib.dumps(desc, indent=2, sort_keys=True))
        return
    typer.echo(f"dedup index: {desc['index']}")
    typer.echo(f"rows:     {desc['rows']}  ({human_bytes(desc['bytes'])} on disk)")
    typer.echo(f"methods:  {', '.join(desc['methods'])}")
    for method in desc["methods"]:
        settings = (desc["params"] or {}).get(method, {})
        typer.echo(f"  {method}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    typer.echo(f"runs:     {len(desc['runs'])}")
    for g in desc["runs"]:
        typer.echo(f"  {g['gen']:>4}  {g['created']}  {g['rows']} rows  {g['output']}")
    if desc["pending"]:
        typer.echo(
            f"pending:  {desc['pending']['rows']} rows of {desc['pending']['output']} "
            "(repaired by the next run)"
        )


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("dedup-index")(dedup_index)
