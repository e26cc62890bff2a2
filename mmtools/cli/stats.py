"""`mmtools stats`."""

from __future__ import annotations

import json as jsonlib
import sys
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import setup_logging


def stats(
    inputs: O.Inputs = None,
    columns: Annotated[
        str | None,
        typer.Option(
            "-c",
            "--columns",
            help="Comma-separated columns to describe (default: all "
            "but media bytes; name a media column to measure its byte sizes).",
            show_default=False,
        ),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            metavar="DIR",
            help="Write one PNG histogram per numeric column "
            "into DIR (needs matplotlib: pip install 'mmtools[plot]').",
            show_default=False,
        ),
    ] = None,
    sample_size: Annotated[
        int, typer.Option(min=1, help="Values kept per column for quantiles and histograms.")
    ] = 100_000,
    top: Annotated[int, typer.Option(min=0, help="Most frequent string values to show.")] = 10,
    bins: Annotated[int, typer.Option(min=1, help="Histogram bins.")] = 20,
    batch_size: O.BatchSize = 8192,
    verbose: O.Verbose = False,
) -> None:
    """Show per-column distributions: counts, nulls, range, mean, quantiles, top values.

    Example: mmtools stats scored/ --plot plots/

    Also measures caption length (words, characters), image aspect ratio and smaller side,
    embedding norms and, for a media column named in --columns, byte sizes; numeric columns
    such as clip_score, width or duration get a histogram. One streaming pass with bounded
    memory: count, nulls, min, max and mean are exact; quantiles and histograms are exact up
    to --sample-size values per column and come from a uniform sample beyond. The report
    goes to stdout (a table, or JSON with --json); nothing is written unless --plot is given.
    """
    from mmtools.cli.common import open_source
    from mmtools.tools.stats import StatsConfig, profile, render
    from mmtools.tools.stats import plot as plot_report

    setup_logging(verbose, False)
    wanted = tuple(c.strip() for c in columns.split(",") if c.strip()) if columns else None
    config = StatsConfig(wanted, sample_size=sample_size, top=top, bins=bins)
    if plot:
        from mmtools.errors import require_module

        require_module("matplotlib", "plot")  # fail before the pass, not after it
    source = open_source(inputs)
    try:
        report = profile(source, config, batch_size=batch_size)
    finally:
        source.close()
    if plot:
        paths = plot_report(report, plot)
        print(f"mmtools stats: wrote {len(paths)} plots to {plot}", file=sys.stderr)
    if json:
        typer.echo(jsonlib.dumps(report, indent=2, sort_keys=True, allow_nan=False, default=str))
    else:
        typer.echo(render(report))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("stats")(stats)
