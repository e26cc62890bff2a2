"""Killable `mmtools` runs forked from a server that has the heavy modules imported.

Runs that are killed on purpose come from Python's `multiprocessing` forkserver, which has
imported mmtools, torch and open_clip once, so a run costs milliseconds of start-up instead
of seconds. Each is still a process of its own running `mmtools.cli.main()` with its argv,
files and lock, and SIGKILL ends it like any other. A run can also kill itself at a chosen
point of the commit protocol (after a temporary write, after a rename, around the manifest)
by wrapping `os.replace`, `os.unlink` and `shutil.rmtree` in the child.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# Where a run can be killed on purpose: (function, before or after the call, path test).
POINTS = {
    "run-file": ("replace", "after", lambda s, d: d.endswith("/_run.json")),
    "tmp-shard": ("replace", "before", lambda s, d: "/.tmp-part-" in s),
    "shard-renamed": ("replace", "after", lambda s, d: "/part-" in d and "/_rejects/" not in d),
    "rejects-renamed": ("replace", "after", lambda s, d: "/_rejects/part-" in d),
    "progress-tmp": ("replace", "before", lambda s, d: "/_progress/" in d),
    "progress": ("replace", "after", lambda s, d: "/_progress/" in d),
    "manifest-tmp": ("replace", "before", lambda s, d: d.endswith("/_manifest.json")),
    "manifest": ("replace", "after", lambda s, d: d.endswith("/_manifest.json")),
    "progress-removed": ("rmtree", "after", lambda s, d: s.endswith("/_progress")),
    "run-file-removed": ("unlink", "after", lambda s, d: s.endswith("/_run.json")),
}


# The points of a dedup index's commit (`dedup --index`), after the output's own.
INDEX_POINTS = {
    "index-staged": ("replace", "after", lambda s, d: d.endswith("/_pending.json")),
    "index-gen-renamed": ("replace", "after", lambda s, d: "/gen-" in d),
    "index-model-renamed": ("replace", "after", lambda s, d: "/model-" in d),
    "index-manifest-tmp": ("replace", "before", lambda s, d: d.endswith("/_index.json")),
    "index-manifest": ("replace", "after", lambda s, d: d.endswith("/_index.json")),
    "index-pending-removed": ("unlink", "after", lambda s, d: s.endswith("/_pending.json")),
}


def _install_kill_point(point: str, nth: int) -> None:
    """Make this process SIGKILL itself at the `nth` passage through `point`."""
    import shutil

    func, when, match = {**POINTS, **INDEX_POINTS}[point]
    module = shutil if func == "rmtree" else os
    real = getattr(module, func)
    seen = [0]

    def hit(src, dst) -> None:
        if match(os.fspath(src), os.fspath(dst) if dst is not None else ""):
            seen[0] += 1
            if seen[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    def wrapped(src, *args, **kwargs):
        dst = args[0] if func == "replace" else None
        if when == "before":
            hit(src, dst)
        result = real(src, *args, **kwargs)
        if when == "after":
            hit(src, dst)
        return result

    setattr(module, func, wrapped)


def _child(argv: list[str], log: str, kill_at: tuple[str, int] | None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    import threading

    import tqdm

    # A killed run cannot unregister tqdm's default multiprocessing lock; a thread lock does.
    tqdm.tqdm.set_lock(threading.RLock())
    if kill_at:
        _install_kill_point(*kill_at)
    sys.argv = ["mmtools", *argv]
    from mmtools.cli import main

    main()


_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(
            ["forked", "torch", "open_clip", "polars", "mmtools.cli", "mmtools.steps.embed"]
        )
        saved = dict(os.environ)
        os.environ.update(THREADS)  # for the server and its children only
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _CONTEXT = ctx
    return _CONTEXT


@dataclass
class Run:
    """One `mmtools` process forked from the server."""

    argv: list[str]
    log: Path
    kill_at: tuple[str, int] | None = None

    def __post_init__(self):
        self.proc = _context().Process(
            target=_child, args=(self.argv, str(self.log), self.kill_at), daemon=True
        )
        self.proc.start()
        self.started = time.monotonic()

    def kill_after(self, delay: float) -> bool:
        """SIGKILL the run `delay` s after its start; True when it was still running."""
        self.proc.join(max(0.0, self.started + delay - time.monotonic()))
        if self.proc.exitcode is not None:
            return False
        self.proc.kill()
        self.proc.join()
        return self.proc.exitcode == -signal.SIGKILL

    def wait(self, timeout: float = 300) -> int:
        """Exit code (negative: killed by that signal)."""
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, f"{self.argv} still running after {timeout} s"
        return self.proc.exitcode

    def stderr(self) -> str:
        """What the run wrote to stdout and stderr."""
        return self.log.read_text(errors="replace")


def run_to_end(argv: list[str], log: Path, kill_at=None) -> int:
    """Fork one run and wait for it; return its exit code."""
    return Run(argv, log, kill_at).wait()


def cli(*args) -> tuple[int, str]:
    """Run `mmtools ARGS` in a forked process to its end; return (exit code, its stderr)."""
    fd, log = tempfile.mkstemp(prefix="mmtools-run-", suffix=".log")
    os.close(fd)
    try:
        run = Run([str(a) for a in args], Path(log))
        return run.wait(), run.stderr()
    finally:
        os.unlink(log)


def summary(stderr: str) -> dict:
    """The --json summary: the last line of a run's stderr."""
    return json.loads(stderr.strip().splitlines()[-1])
