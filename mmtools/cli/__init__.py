"""The `mmtools` command: a thin Typer layer over the steps; errors become exit codes here."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Mapping

import typer
from typer.core import TyperGroup

from mmtools.errors import EXIT_CODES, DownstreamClosed, MmtoolsError, on_signal
from mmtools.io import lean_arrow

# The reader downstream closed the pipe (`| mmtools head`, or a downstream whose output is
# already complete): not a failure of ours, so a finished pipeline reruns clean under
# `set -o pipefail`; the pipeline's status is the reader's.
EXIT_PIPE = DownstreamClosed.exit_code


def exit_code_help() -> str:
    """The exit codes as the table `mmtools --help` ends with (click keeps a \\b block as is)."""
    return "\b\nExit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in EXIT_CODES.items())


COMMANDS = (
    "ingest",
    "embed",
    "score",
    "train-head",
    "filter",
    "dedup",
    "dedup-index",
    "rewrite",
    "mixup",
    "info",
    "head",
    "stats",
    "export",
    "explain",
    "demo",
    "index",
    "search",
    "sheet",
)


class _Commands(Mapping):
    """The commands by name, each built from its module (mmtools.cli.<name>) when first
    looked up: a run imports and builds its own command only; `--help` builds them all.
    Building all 18 on every start cost about 0.1 s."""

    def __init__(self) -> None:
        self._built: dict = {}

    def __getitem__(self, name: str):
        if name not in self._built:
            if name not in COMMANDS:
                raise KeyError(name)
            self._built[name] = _build(name)
        return self._built[name]

    def __iter__(self):
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


class _Group(TyperGroup):
    def __init__(self, **attrs) -> None:
        super().__init__(**attrs)
        self.commands = _Commands()


def _build(name: str):
    import importlib

    import typer.main

    holder = typer.Typer()
    importlib.import_module(f"mmtools.cli.{name.replace('-', '_')}").register(holder)
    (info,) = holder.registered_commands
    return typer.main.get_command_from_info(
        info,
        pretty_exceptions_short=app.pretty_exceptions_short,
        rich_markup_mode=app.rich_markup_mode,
    )


app = typer.Typer(
    name="mmtools",
    help="Curate multimodal (image, text, audio) training data with composable steps.\n\n"
    "Example: mmtools ingest photos/ | mmtools head -n 3\n\n"
    "Each command reads a dataset (directory, Parquet file or glob, or an Arrow stream on "
    "stdin) and writes one (-o DIR, or an Arrow stream on stdout).",
    epilog=exit_code_help(),
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _mmtools() -> None:
    # Without a callback (and with no command registered up front) Typer would not build a
    # group; the commands come from _Group.
    pass


def _command_name() -> str:
    return next((a for a in sys.argv[1:] if a in COMMANDS), "")


def _quiet_pipe() -> int:
    # Point stdout at /dev/null so the interpreter's final flush does not fail again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE


def main() -> None:
    """Entry point: run the app; map errors, signals and closed pipes to exit codes."""
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cmd = _command_name()
    prefix = f"mmtools {cmd}" if cmd else "mmtools"
    verbose = any(a in ("-v", "--verbose") for a in sys.argv[1:])
    lean_arrow()
    global _ray_before
    _ray_before = _ray_joined()
    try:
        app(
            prog_name="mmtools"
        )  # Typer reports usage errors itself (exit 2) and exits through SystemExit.
    except (BrokenPipeError, DownstreamClosed):
        # Leave at once: the reader is gone, and tearing down torch/Ray can take seconds.
        code = _quiet_pipe()
        if not _ray_before:
            _stop_own_ray_cluster()
        sys.stderr.flush()
        os._exit(code)
    except MmtoolsError as e:
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
        _leave(e.exit_code)
    except Exception as e:
        if verbose:
            raise
        print(
            f"{prefix}: error: {type(e).__name__}: {_one_line(e)} (rerun with -v for details)",
            file=sys.stderr,
        )
        _leave(1)


def _leave(code: int) -> None:
    """Exit with `code` after an error or a signal. A Ray driver leaves without Python's
    teardown: Ray's own, at exit, races the pipeline the error stopped and can end the process
    with another code (1, or killed by SIGTERM). A cluster this process started is stopped
    first. A process that had joined its cluster before the command ran (`main()` called
    from Python) keeps it, and exits as usual."""
    if _ray_before or not _ray_joined():
        sys.exit(code)
    _stop_own_ray_cluster()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


_ray_before = False  # whether this process was connected to Ray before the command ran


def _ray_joined() -> bool:
    if not sys.modules.get("ray"):
        return False
    from mmtools.engines.ray.cluster import joined

    return joined()


def _stop_own_ray_cluster() -> None:
    if sys.modules.get("ray"):
        from mmtools.engines.ray.cluster import stop_own_cluster

        with contextlib.suppress(Exception):  # leaving anyway; the run's error is reported
            stop_own_cluster()


def _one_line(e: BaseException) -> str:
    """An error message on one line (Arrow's and OS messages may span several)."""
    return " ".join(str(e).split())
