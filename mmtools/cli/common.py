"""The thin glue every command uses: open the input and output, run the steps, report."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass

from mmtools.errors import FailSafeError, UsageError, writing

log = logging.getLogger("mmtools")


@dataclass
class Common:
    """The shared options of a dataset-to-dataset command (declared in `options.DATASET`)."""

    inputs: list[str] | None = None
    output: str | None = None
    overwrite: bool = False
    shard_rows: int = 10_000
    shard_bytes: int = 1 << 30
    batch_size: int | None = 1024  # None: sized by bytes (Source.batch_rows)
    engine: str = "local"
    quiet: bool = False
    verbose: bool = False
    json: bool = False
    wait_lock: bool = False
    ray_address: str | None = None
    ray_concurrency: int | None = None
    num_gpus_per_worker: float | None = None
    ledger: bool = True
    max_reject_rate: float | None = None  # None: only a run that rejects every row trips
    max_drop_rate: float | None = None  # None: no limit


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


def execute(command: str, source, steps: list, c: Common, dataset=None, marked=None):
    """Run `steps` from `source` to the output (a dataset directory made by `dataset`, default
    `DatasetSink`), print the summary, then hold the run to its fail-safes; return the summary.

    `marked`, where given, says after the run how many rows were marked rather than dropped,
    by rule (dedup --mark): they count as drops for the warnings and the fail-safe.
    """
    from mmtools.engines import run

    setup_logging(c.verbose, c.quiet)
    if c.engine not in ("local", "ray"):
        raise UsageError(f"--engine must be 'local' or 'ray', not {c.engine!r}")
    ray_only = {"--ray-address": c.ray_address, "--concurrency": c.ray_concurrency}
    ray_only["--num-gpus-per-worker"] = c.num_gpus_per_worker
    if c.engine == "local" and (given := [k for k, v in ray_only.items() if v is not None]):
        log.warning("%s applies to --engine ray only; ignored", ", ".join(given))
    argv = ["mmtools", *sys.argv[1:]]
    with writing(c.output):
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
    batch_size = min(c.batch_size or source.batch_rows(), c.shard_rows)
    with writing(c.output):  # a read-only or vanished output: one line, exit 73
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
    summary.notes.update(getattr(sink, "notes", {}))  # an export's own counts (files)
    guard = FailSafe(command, summary, c, marked() if marked else None)
    report(summary, c, {"warnings": guard.warnings} if guard.warnings else None)
    guard.check()
    return summary


def report(summary, c: Common, extra: dict | None = None) -> None:
    """Print the summary: one line, or JSON with --json (with `extra` in it); nothing with -q.
    Warnings (in `extra`) come first, each on its own line, so that the summary stays last."""
    warnings = (extra or {}).get("warnings", [])
    if not c.quiet:
        for w in warnings:
            print(w, file=sys.stderr)
    if c.json:
        print(json.dumps({**summary.as_dict(), **(extra or {})}, sort_keys=True), file=sys.stderr)
    elif not c.quiet:
        print(summary.line(), file=sys.stderr)


@dataclass
class Tally:
    """Rows a run rejected or dropped: how many, what happened to them, by reason or rule."""

    rows: int
    what: str
    why: str
    option: str


class FailSafe:
    """The checks on a finished run's counts, over the rows this command read as input (rows
    an upstream command rejected are not its input; a resumed run counts what it read).

    A warning for a run that rejected, or dropped, more than half of them; a `FailSafeError`
    (exit 7, after the output is committed) for one that rejected every row or more than
    --max-reject-rate, or dropped more than --max-drop-rate.
    """

    def __init__(self, command: str, summary, c: Common, marked: dict[str, int] | None = None):
        self.summary, self.c = summary, c
        self.rows = 0 if summary.already_complete else summary.rows_in
        dropped = marked if marked is not None else summary.dropped
        self.rejects = Tally(
            summary.rejected, "rejected", _by(summary.reasons), "--max-reject-rate"
        )
        verb = "marked as duplicates" if marked is not None else "dropped"
        self.drops = Tally(sum(dropped.values()), verb, _by(dropped), "--max-drop-rate")
        self.tripped = self._trip()
        self.warnings = [
            f"mmtools {command}: warning: {self.say(t)}"
            for t in (self.rejects, self.drops)
            if self.rows and 2 * t.rows > self.rows and t is not self.tripped
        ]

    def _trip(self) -> Tally | None:
        if not self.rows:
            return None
        limit = self.c.max_reject_rate
        n = self.rejects.rows
        if (n >= self.rows) if limit is None else (n > limit * self.rows):
            return self.rejects
        limit = self.c.max_drop_rate
        if limit is not None and self.drops.rows > limit * self.rows:
            return self.drops
        return None

    def say(self, t: Tally) -> str:
        """'21 of 21 input rows (100.0%) were rejected (no_text 21)'."""
        line = f"{t.rows} of {self.rows} input rows ({t.rows / self.rows:.1%}) were {t.what}"
        return line + (f" ({t.why})" if t.why else "")

    def check(self) -> None:
        """Raise FailSafeError (exit 7) when the run tripped a fail-safe."""
        t = self.tripped
        if t is None:
            return
        where = "" if self.summary.output == "-" else f" to {self.summary.output}"
        raise FailSafeError(
            f"{self.say(t)}; the output is committed{where}: check the input and the options, "
            f"or pass {t.option} 1 to accept such a run"
        )


def _by(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v)


def report_line(text: str, c: Common, as_json: dict | None = None) -> None:
    """A line of news on stderr: `text`, or `as_json` with --json (nothing without it)."""
    if c.json:
        if as_json is not None:
            print(json.dumps(as_json, sort_keys=True), file=sys.stderr)
    elif not c.quiet:
        print(text, file=sys.stderr)
