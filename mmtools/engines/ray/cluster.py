"""Joining or starting a Ray cluster for `--engine ray`: its options, quietly, fast to fail."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass

from mmtools.errors import TemporaryError, require_module

log = logging.getLogger("mmtools")

ENV_ADDRESS = "MMTOOLS_RAY_ADDRESS"
ENV_CONCURRENCY = "MMTOOLS_RAY_CONCURRENCY"
ENV_GPUS = "MMTOOLS_RAY_GPUS_PER_WORKER"
RETRIES = 3
CONNECT_TIMEOUT = 5.0


@dataclass
class RayOptions:
    """Where and how wide to run: cluster address, actors per model step, GPUs per actor."""

    address: str | None = None  # None: start a local cluster; "auto": join the running one
    concurrency: int | None = None  # actors per model step; None: 1 up to the cluster's size
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    retries: int = RETRIES


def connect(options: RayOptions, actors: bool = False):
    """Join the cluster at `options.address`, or start a local one; nothing on stdout."""
    ray = require_module("ray", "ray")
    require_module("ray.data", "ray")
    verbose = log.isEnabledFor(logging.DEBUG)
    level = logging.INFO if verbose else logging.CRITICAL  # mmtools reports errors itself
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    if not ray.is_initialized():
        quiet = actors and not verbose and "RAY_BACKEND_LOG_LEVEL" not in os.environ
        if quiet:
            # Ray's core logs an error line for every Ray Data actor it starts (ray#53727).
            os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
        where, named = _bootstrap(options.address)
        if where:
            _check_reachable(where, named)
        global _started_here
        _started_here = where is None
        # Worker output is not forwarded: stdout may carry the Arrow stream.
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=level)
        with _own_signals(), _muted_stderr(quiet):
            try:
                ray.init(address=options.address, ignore_reinit_error=True, **kwargs)
            except ConnectionError as e:
                raise _unreachable(where or options.address, e, named) from None
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.retried_map_errors = True  # a step that raises on a batch: the batch is run again
    ctx.max_map_retries = options.retries
    return ray


_started_here = False  # whether the last `connect` that joined a cluster started it


def joined() -> bool:
    """Whether this process is connected to a Ray cluster (without importing Ray)."""
    ray = sys.modules.get("ray")
    return bool(ray) and ray.is_initialized()


def stop_own_cluster() -> None:
    """Stop the local cluster this process started, if any (before leaving without Python's
    teardown, which would have stopped it)."""
    if _started_here and joined():
        import ray

        ray.shutdown()


@contextlib.contextmanager
def _muted_stderr(mute: bool):
    """Standard error sent to /dev/null meanwhile, when `mute`: setting Ray's core log level
    makes it print a line of its own on the driver's stderr when it starts. A failure still
    raises, and the processes Ray starts write to their own log files."""
    if not mute:
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


@contextlib.contextmanager
def _own_signals():
    """Keep mmtools' SIGTERM/SIGINT handlers: Ray's core would dump a stack and abort."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


def _bootstrap(address: str | None) -> tuple[str | None, str]:
    """The address Ray will join, in Ray's own order (`RAY_ADDRESS` first, then the one given;
    for "auto" the address `ray start --head` recorded), and what named it; None where Ray
    starts a local cluster."""
    if env := os.environ.get("RAY_ADDRESS"):
        return env, "RAY_ADDRESS"
    if address == "auto":
        try:  # Ray's record of the last `ray start`; its module is private, so never fatal
            from ray._private.utils import read_ray_address

            return read_ray_address(None) or address, "the address ray start recorded"
        except Exception:
            return address, f"--ray-address ({ENV_ADDRESS})"
    return address, f"--ray-address ({ENV_ADDRESS})"


def _check_reachable(address: str, named: str) -> None:
    """Fail fast where Ray would wait minutes: a host:port that does not answer."""
    import socket

    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto" and ray:// addresses: Ray reports those itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        raise _unreachable(address, e, named) from None


def _unreachable(address: str | None, e: Exception, named: str) -> TemporaryError:
    return TemporaryError(
        f"cannot reach the Ray cluster at {address} ({str(e).splitlines()[0]}); start it "
        f"(ray start --head) or leave out {named} to run a local one"
    )
