"""`mmtools info`."""

from __future__ import annotations

import json as jsonlib
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, open_source, setup_logging
from mmtools.sizes import human_bytes


@O.expand(common=O.DATASET.only("inputs", "verbose"))
def info(
    common: Common,
    json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    """Describe a dataset: schema, rows, shards, size, rejects and lineage (or a dedup index).

    Example: mmtools info ds/

    For a dataset directory the manifest adds the command lines that made it, the models
    behind each embedding column and the rejects by reason. A stream on stdin is read to the
    end to count its rows.
    """
    from mmtools.tools.info import describe

    setup_logging(common.verbose, False)
    if common.inputs and len(common.inputs) == 1:
        from mmtools.steps.dedup.index import describe as describe_index
        from mmtools.steps.dedup.index import is_index

        if is_index(common.inputs[0]):
            from mmtools.cli.dedup_index import show

            show(describe_index(common.inputs[0]), json)
            return
    source = open_source(common.inputs)
    desc = describe(source, common.inputs or ["-"])
    if json:
        typer.echo(jsonlib.dumps(desc, indent=2, sort_keys=True))
        return
    typer.echo(f"rows:    {desc['rows']}")
    typer.echo(f"shards:  {desc['shards']}  ({human_bytes(desc['bytes'])})")
    if "complete" in desc:
        typer.echo(f"complete: {'yes' if desc['complete'] else 'no (no _manifest.json)'}")
    if desc.get("rejects"):
        by = ", ".join(f"{k} {v}" for k, v in sorted(desc["rejects"]["by_reason"].items()))
        typer.echo(f"rejects: {desc['rejects']['rows']}" + (f" ({by})" if by else ""))
    show_stats(desc, common.verbose)
    typer.echo("schema:")
    width = max((len(f["name"]) for f in desc["schema"]), default=0)
    for f in desc["schema"]:
        extra = desc["columns"].get(f["name"])
        note = "  " + jsonlib.dumps(extra, sort_keys=True) if extra else ""
        typer.echo(f"  {f['name']:<{width}}  {f['type']}{note}")
    if desc.get("lineage"):
        typer.echo("lineage:")
        for step in desc["lineage"]:
            cmd = " ".join(step.get("argv") or [f"mmtools {step.get('command')}"])
            typer.echo(
                f"  {cmd}  ({step.get('rows_in')} in, {step.get('rows_out')} out, "
                f"{step.get('rejected')} rejected)"
            )


def show_stats(desc: dict, verbose: bool) -> None:
    """Successes, failures, success rate, time and retries; with -v, per shard."""
    if stats := desc.get("stats"):
        rate = stats["success_rate"]
        typer.echo(
            f"stats:   {stats['succeeded']} succeeded, {stats['failed']} failed"
            + (f" ({rate:.1%} success)" if rate is not None else "")
            + f", {stats['seconds']:.1f} s"
        )
    if retries := desc.get("retries"):
        done = ", ".join(f"{r['retried']} retried, {r['succeeded']} recovered" for r in retries)
        typer.echo(f"retries: {len(retries)} ({done})")
    if verbose and desc.get("shard_stats"):
        typer.echo("shards:")
        for s in desc["shard_stats"]:
            why = ", ".join(f"{k} {v}" for k, v in sorted(s.get("reject_reasons", {}).items()))
            typer.echo(
                f"  {s['name']}  {s['rows']} rows, {s.get('rejected', 0)} rejected"
                + (f" ({why})" if why else "")
                + f", {human_bytes(s['bytes'])}, {s.get('seconds', 0.0):.1f} s"
            )


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("info")(info)
