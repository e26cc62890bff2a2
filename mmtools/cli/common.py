"""The thin glue every command uses: open the input and output, run the steps, report."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass

from mmtools.errors import UsageError

log = logging.getLogger("mmtools")


@dataclass
class Common:
    """The shared options of a dataset-to-dataset command (declared in `options.DATASET`)."""

    inputs: list[str] | None = None
    output: str | None = None
    overwrite: bool = False
    shard_rows: int = 10_000
    shard_bytes: int = 1 << 30
    batch_size: int = 1024
    engine: str = "local"
    quiet: bool = False
    verbose: bool = False
    json: bool = False
    wait_lock: bool = False
    ray_address: str | None = None
    ray_concurrency: int | None = None
    num_gpus_per_worker: float | None = None
    ledger: bool = True


def setup_logging(verbose: bool, quiet: bool) -> None:
    """Log to stderr: warnings by default, info with -v, errors only with -q."""
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="mmtools: %(message)s")
    log.setLevel(level)


def stdin_inputs(inputs: list[str] | None) -> list[str]:
    """Inputs as given, or `-` when none are given and stdin is a pipe."""
    if inputs:
        return inputs
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError(
            "no INPUT given; pass a dataset directory or Parquet file, or pipe a stream"
        )
    return ["-"]


def open_source(inputs: list[str] | None):
    """A dataset source for the command's inputs."""
    from mmtools.io.source import Source

    return Source(stdin_inputs(inputs))


def open_sink(c: Common, argv: list[str], dataset=None):
    """A dataset directory (made by `dataset`, default `DatasetSink`), or an Arrow stream on
    stdout."""
    from mmtools.io.dataset import DatasetSink
    from mmtools.io.stdout import StreamSink

    if c.output is None and sys.stdout.isatty():
        raise UsageError("no -o/--output given and stdout is a terminal; pass -o DIR or pipe it")
    if c.output in (None, "-"):
        return StreamSink()
    return (dataset or DatasetSink)(
        c.output,
        shard_rows=c.shard_rows,
        shard_bytes=c.shard_bytes,
        overwrite=c.overwrite,
        wait_lock=c.wait_lock,
        command=argv,
    )


def execute(command: str, source, steps: list, c: Common, dataset=None):
    """Run `steps` from `source` to the output (a dataset directory made by `dataset`, default
    `DatasetSink`) and print the summary; return it."""
    from mmtools.engines import run

    setup_logging(c.verbose, c.quiet)
    if c.engine not in ("local", "ray"):
        raise UsageError(f"--engine must be 'local' or 'ray', not {c.engine!r}")
    ray_only = {"--ray-address": c.ray_address, "--concurrency": c.ray_concurrency}
    ray_only["--num-gpus-per-worker"] = c.num_gpus_per_worker
    if c.engine == "local" and (given := [k for k, v in ray_only.items() if v is not None]):
        log.warning("%s applies to --engine ray only; ignored", ", ".join(given))
    argv = ["mmtools", *sys.argv[1:]]
    sink = open_sink(c, argv, dataset)
    if c.engine == "ray":
        from mmtools.engines.ray.executor import RayExecutor, RayOptions

        options = RayOptions(
            address=c.ray_address or None,
            concurrency=c.ray_concurrency,
            gpus_per_worker=c.num_gpus_per_worker,
        )
        executor = RayExecutor(options)  # a missing Ray fails here, before the output is opened
    else:
        from mmtools.engines.local import LocalExecutor

        executor = LocalExecutor()
    # Batches no larger than a shard, so that shards come out close to --shard-rows.
    batch_size = min(c.batch_size, c.shard_rows)
    summary, _ = run(
        command,
        source,
        steps,
        sink,
        executor=executor,
        batch_size=batch_size,
        quiet=c.quiet,
        argv=argv,
        ledger=c.ledger,
    )
    report(summary, c)
    return summary


def report(summary, c: Common) -> None:
    """Print the summary: one line, or JSON with --json; nothing with -q."""
    if c.json:
        print(json.dumps(summary.as_dict(), sort_keys=True), file=sys.stderr)
    elif not c.quiet:
        print(summary.line(), file=sys.stderr)


def report_line(text: str, c: Common, as_json: dict | None = None) -> None:
    """A line of news on stderr: `text`, or `as_json` with --json (nothing without it)."""
    if c.json:
        if as_json is not None:
            print(json.dumps(as_json, sort_keys=True), file=sys.stderr)
    elif not c.quiet:
        print(text, file=sys.stderr)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
