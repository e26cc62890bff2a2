"""Typed errors; each carries the process exit code that `mmtools` documents."""

from __future__ import annotations

import contextlib

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_PARTIAL = 4
EXIT_LOCKED = 5
EXIT_DRIFT = 6
EXIT_TEMPORARY = 75
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILURE: "failure (a bug or an unexpected error)",
    EXIT_USAGE: "usage error: bad option, missing input, bad expression",
    EXIT_DATA: "data contract: missing column, schema drift, truncated or corrupt input",
    EXIT_PARTIAL: "partial: some shards were not committed; rerun the same command to resume",
    EXIT_LOCKED: "output locked by another running mmtools process",
    EXIT_DRIFT: "output was made by a different command, model or input; use --overwrite",
    EXIT_TEMPORARY: "temporary failure (backend down, network); retry later",
    EXIT_SIGINT: "interrupted (SIGINT); rerun resumes",
    EXIT_SIGTERM: "terminated (SIGTERM); rerun resumes",
}


class MmtoolsError(Exception):
    """Base error: one line for the user, and an exit code."""

    exit_code = EXIT_FAILURE


class UsageError(MmtoolsError):
    """Bad options or arguments."""

    exit_code = EXIT_USAGE


class DataContractError(MmtoolsError):
    """Input does not meet the dataset contract."""

    exit_code = EXIT_DATA


class TruncatedStreamError(DataContractError):
    """An Arrow stream ended without its end-of-stream trailer."""


class PartialError(MmtoolsError):
    """Some work was left undone; a rerun resumes."""

    exit_code = EXIT_PARTIAL


class OutputLockedError(MmtoolsError):
    """Another process holds the output directory."""

    exit_code = EXIT_LOCKED


class DriftError(MmtoolsError):
    """The output on disk came from another command line, model or input."""

    exit_code = EXIT_DRIFT


class TemporaryError(MmtoolsError):
    """A remote backend or resource is unavailable for now."""

    exit_code = EXIT_TEMPORARY


class Interrupted(MmtoolsError):
    """Stopped by a signal."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name}; rerun the command to resume")
        self.exit_code = 128 + signum


_critical = 0  # depth of `uninterrupted()` sections
_pending: int | None = None  # a signal that arrived inside one


def on_signal(signum: int, frame=None) -> None:
    """SIGTERM/SIGINT handler: stop now, or right after the commit in progress."""
    global _pending
    if _critical:
        _pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def uninterrupted():
    """A section a signal must not cut in two (a commit: rename, record, manifest); a signal
    that arrives meanwhile stops the command when it ends."""
    global _critical, _pending
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
        if not _critical and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


class DownstreamClosed(MmtoolsError):
    """The reader of our stdout went away (e.g. `| head`); not an error for the user."""

    exit_code = 141


class MissingDependencyError(UsageError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str):
        super().__init__(
            f"this needs the optional package '{module}'; install it with "
            f"pip install 'mmtools[{extra}]'"
        )


def require_module(module: str, extra: str):
    """Import an optional module, or raise a one-line error with the pip hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(module, extra) from e
