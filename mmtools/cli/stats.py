"""`mmtools stats`."""

from __future__ import annotations

import json as jsonlib
import os
import sys
from dataclasses import replace
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, open_source, setup_logging
from mmtools.tools.stats import StatsConfig

OPTIONS = O.Bundle(
    StatsConfig,
    {
        "columns": Annotated[
            str | None,
            typer.Option(
                "-c",
                "--columns",
                help="Comma-separated columns to describe (default: all "
                "but media bytes; name a media column to measure its byte sizes).",
                show_default=False,
            ),
        ],
        "sample_size": Annotated[
            int, typer.Option(min=1, help="Values kept per column for quantiles and histograms.")
        ],
        "top": Annotated[int, typer.Option(min=0, help="Most frequent string values to show.")],
        "bins": Annotated[int, typer.Option(min=1, help="Histogram bins.")],
    },
)


@O.expand(
    config=OPTIONS,
    common=O.LIGHT.only("inputs", "batch_size", "verbose"),
)
def stats(
    config: StatsConfig,
    common: Common,
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
    cut: Annotated[
        list[str] | None,
        typer.Option(
            "--cut",
            metavar="COLUMN=VALUE",
            help="Count the rows a threshold keeps (>=) and drops, and draw it on the "
            "column's plot (repeatable).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Show per-column distributions: counts, nulls, range, mean, quantiles, top values.

    Example: mmtools stats scored/ --plot plots/ --cut clip_score=0.28

    Also measures caption length (words, characters), image aspect ratio and smaller side,
    embedding norms and, for a media column named in --columns, byte sizes; numeric columns
    such as clip_score, width or duration get a histogram. One streaming pass with bounded
    memory: count, nulls, min, max and mean are exact; quantiles and histograms are exact up
    to --sample-size values per column and come from a uniform sample beyond. The report
    goes to stdout (a table, or JSON with --json); nothing is written unless --plot is given.
    --cut COLUMN=VALUE counts exactly the rows with COLUMN >= VALUE (kept) and below it
    (dropped), and draws the cut on that column's histogram.
    """
    from mmtools.tools.stats import plot as plot_report

    setup_logging(common.verbose, False)
    config = replace(config, columns=tuple(O.split_commas(config.columns)) or None, cuts=_cuts(cut))
    report = _profile(common, config, plot)
    if plot:
        from mmtools.errors import writing

        with writing(plot):
            paths = plot_report(report, plot)
        print(f"mmtools stats: wrote {len(paths)} plots to {plot}", file=sys.stderr)
    if json:
        typer.echo(jsonlib.dumps(report, indent=2, sort_keys=True, allow_nan=False, default=str))
    else:
        from mmtools.tools.stats import render

        typer.echo(render(report))


def _cuts(specs: list[str] | None) -> tuple[tuple[str, float], ...]:
    """--cut clip_score=0.28 -> (("clip_score", 0.28),)."""
    from mmtools.errors import UsageError

    out = []
    for spec in specs or []:
        name, _, value = spec.rpartition("=")
        try:
            out.append((name.strip(), float(value)))
        except ValueError:
            raise UsageError(
                f"--cut takes COLUMN=VALUE (e.g. clip_score=0.28), not {spec!r}"
            ) from None
        if not name.strip():
            raise UsageError(f"--cut takes COLUMN=VALUE (e.g. clip_score=0.28), not {spec!r}")
    return tuple(out)


def _profile(common: Common, config: StatsConfig, plot: str | None) -> dict:
    """The report over the whole input (checking first that a plot can be drawn)."""
    from mmtools.tools.stats import profile

    if plot:
        from mmtools.errors import require_module

        require_module("matplotlib", "plot")  # fail before the pass, not after it
        from mmtools.errors import writing

        with writing(plot):
            os.makedirs(plot, exist_ok=True)
    source = open_source(common.inputs)
    try:
        return profile(source, config, batch_size=common.batch_size)
    finally:
        source.close()


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("stats")(stats)
