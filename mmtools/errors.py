"""Typed errors; each carries the process exit code that `mmtools` documents."""

from __future__ import annotations

import contextlib
import errno
import os
import re

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_PARTIAL = 4
EXIT_LOCKED = 5
EXIT_DRIFT = 6
EXIT_FAILSAFE = 7
EXIT_CANTCREAT = 73  # as sysexits.h's EX_CANTCREAT
EXIT_TEMPORARY = 75
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# The one table of exit codes: `mmtools --help` and README.md show it (a test checks both).
EXIT_CODES = {
    EXIT_OK: "success; also when the reader of stdout stopped early (`head`, or a downstream "
    "command whose output is already complete)",
    EXIT_FAILURE: "failure: a bug or an unexpected error (`-v` shows the traceback)",
    EXIT_USAGE: "usage error: bad option, missing input, bad expression, a column named in an "
    "option that the input lacks",
    EXIT_DATA: "data contract: a column a step needs is missing, schema drift, truncated or "
    "corrupt input",
    EXIT_PARTIAL: "partial: some shards were not committed; rerun the same command to resume",
    EXIT_LOCKED: "output locked by another running mmtools process",
    EXIT_DRIFT: "output was made by a different command, model or input; use `--overwrite`",
    EXIT_FAILSAFE: "fail-safe: every input row was rejected, or more than `--max-reject-rate` / "
    "`--max-drop-rate` of them; the output is committed",
    EXIT_CANTCREAT: "cannot write the output: read-only, permission denied, not a directory",
    EXIT_TEMPORARY: "temporary failure (backend down, network); retry later",
    EXIT_SIGINT: "interrupted (SIGINT); rerun resumes",
    EXIT_SIGTERM: "terminated (SIGTERM); rerun resumes",
}


def exit_code_table() -> str:
    """EXIT_CODES as the Markdown table README.md shows."""
    rows = [f"| {code} | {text} |" for code, text in EXIT_CODES.items()]  # no `|` in a text
    return "\n".join(["| code | meaning |", "|---|---|", *rows])


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


class FailSafeError(MmtoolsError):
    """The run finished and committed its output, but rejected or dropped too many rows."""

    exit_code = EXIT_FAILSAFE


class OutputError(MmtoolsError):
    """The output cannot be created or written (permissions, read-only, not a directory)."""

    exit_code = EXIT_CANTCREAT


# What an OSError that means "this output cannot be written" carries; a full disk is not
# here (PartialError: free space and rerun).
CANTCREAT_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
)


def cannot_write(e: BaseException, path: str | None) -> OutputError | None:
    """The one-line error for an OSError that says the output `path` cannot be written (the
    error names `path`, a file in it, or a parent of it), else None."""
    if not isinstance(e, OSError) or path in (None, "-") or "://" in path:
        return None
    text = " ".join(str(e).split())
    # pyarrow's errors carry no errno and no file name, only the OS's words and the path
    code = e.errno if e.errno in CANTCREAT_ERRNOS else None
    code = code or next((n for n in CANTCREAT_ERRNOS if os.strerror(n) in text), None)
    if code is None:
        return None
    out = os.path.abspath(path)
    if isinstance(e.filename, str):
        where = os.path.abspath(e.filename)
        if not (_within(where, out) or _within(out, where)):
            return None  # an input or another file
    elif not any(re.search(rf"(^|[\s'\"]){re.escape(p)}($|[/\s'\"])", text) for p in (path, out)):
        return None  # the message names no file of the output
    why = _WHY.get(code) or os.strerror(code)
    if code == errno.EEXIST and os.path.exists(path) and not os.path.isdir(path):
        why = "it is a file, not a directory"
    named = os.path.normpath(e.filename) if isinstance(e.filename, str) else None
    at = f" at {named}" if named and named != os.path.normpath(path) else ""
    return OutputError(f"cannot write {path}: {why}{at}; choose another output or fix it")


_WHY = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "a directory is in the way",
}


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def writing(path: str | None):
    """A block that writes `path`: an OSError saying it cannot be written becomes OutputError."""
    try:
        yield
    except OSError as e:
        err = cannot_write(e, path)
        if err is None:
            raise
        raise err from None


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
    """The reader of our stdout went away (e.g. `| head`, or a downstream command whose output
    is already complete); not an error: the pipeline's status is the reader's."""

    exit_code = EXIT_OK


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
