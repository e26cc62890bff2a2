"""`mmtools demo`."""

from __future__ import annotations

import json as jsonlib
import shutil
from pathlib import Path
from typing import Annotated

import typer

from mmtools.errors import UsageError, writing


def demo(
    directory: Annotated[
        Path, typer.Argument(help="Where to put the sample, outputs and plots.")
    ] = Path("demo-out"),
    rows: Annotated[
        int,
        typer.Option(
            min=500,
            help="Generated image–caption pairs (at least 500: the blur head needs 10 labelled "
            "blurred rows).",
        ),
    ] = 600,
    seed: Annotated[int, typer.Option(help="Seed of the sample and of every random step.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DIRECTORY.")] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run the whole chain on generated sample data, offline, and report what it removed.

    Example: mmtools demo demo-out/

    Generates captioned shape images with planted noise (captions on the wrong images, exact
    copies, near-duplicates, corrupt files), then runs ingest | embed | score (the bundled
    mmtools-shapes model), filter, dedup, rewrite | mixup and stats --plot as real pipes, and
    prints rows per stage, precision and recall against the planted truth, rejects by reason
    and time per step. Needs no network; about 30 s on two idle CPU cores at the default size.
    """
    from mmtools.demo.chain import DemoConfig, calibrate_threshold, format_report, run_demo
    from mmtools.models.shapes import weights_path

    if not weights_path().exists():
        raise UsageError(
            "the bundled mmtools-shapes weights are not built; run "
            "python -m mmtools.demo.train (a few minutes on a CPU)"
        )
    if directory.is_dir() and any(directory.iterdir()):
        if not overwrite:
            raise UsageError(f"{directory} is not empty; pass --overwrite or another directory")
        shutil.rmtree(directory)
    with writing(str(directory)):
        directory.mkdir(parents=True, exist_ok=True)
        log = open(directory / "demo.log", "wb")  # noqa: SIM115 (closed below)
    with log:
        cfg = DemoConfig(rows=rows, seed=seed)
        threshold = calibrate_threshold(cfg.mismatch)
        report = run_demo(directory, cfg, threshold, log)
    (directory / "report.json").write_text(jsonlib.dumps(report, indent=2))
    if json:
        typer.echo(jsonlib.dumps(report, indent=2))
    else:
        typer.echo(format_report(report))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("demo")(demo)
