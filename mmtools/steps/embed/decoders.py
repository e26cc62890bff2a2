"""Where an embedding step's media are decoded: threads of its process, or worker processes.

Threads share Python's lock: past about six of them, decoding small images (about a
millisecond each, a sixth of it under the lock) stops getting faster, which is what
keeps a GPU waiting on a machine with many cores. `--decode-in processes` decodes images in
`--workers` processes instead (started from a fork server, so a CUDA context is never
forked), each writing its rows straight into the batch's input buffer. That buffer is
anonymous shared memory (a memfd: nothing in /dev/shm to fill up or to leak when a process
dies); a worker opens it through /proc by the parent's pid and descriptor, and checks the
buffer's name before writing. On a GPU one copy moves the filled buffer to pinned memory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import pickle
import secrets
import signal
import sys
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from mmtools.errors import MmtoolsError, UsageError

log = logging.getLogger("mmtools")

DECODE_IN = ("threads", "processes")
_PRELOAD = ["numpy", "PIL.Image", "mmtools.media"]


def check_decode_in(value: str) -> None:
    if value not in DECODE_IN:
        raise UsageError(f"--decode-in must be threads or processes, not {value!r}")
    if value == "processes" and not sys.platform.startswith("linux"):
        raise UsageError("--decode-in processes needs Linux (shared memory through /proc)")


def tensors(specs: dict, pin: bool) -> dict:
    """Empty torch tensors for `specs` ({key: (shape, numpy dtype)}); pinned where asked."""
    import torch

    return {
        key: torch.from_numpy(np.empty(0, dtype)).new_empty(shape, pin_memory=pin)
        for key, (shape, dtype) in specs.items()
    }


class SharedArrays:
    """Arrays in anonymous shared memory that the decoding processes write into."""

    def __init__(self, specs: dict):
        self.fds: dict[str, tuple[int, str]] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.specs = specs
        try:
            for key, (shape, dtype) in specs.items():
                name = f"mmtools-decode-{secrets.token_hex(8)}"
                fd = os.memfd_create(name, os.MFD_CLOEXEC)
                self.fds[key] = (fd, name)
                size = int(np.prod(shape)) * np.dtype(dtype).itemsize
                os.ftruncate(fd, size)
                self.arrays[key] = np.memmap(f"/proc/self/fd/{fd}", dtype, "r+", shape=shape)
        except BaseException:
            self.release()
            raise

    def where(self) -> dict:
        """What a worker needs to open the arrays: {key: (pid, fd, name, shape, dtype)}."""
        pid = os.getpid()
        return {key: (pid, fd, name, *self.specs[key]) for key, (fd, name) in self.fds.items()}

    def tensors(self) -> dict:
        import torch

        return {key: torch.from_numpy(a) for key, a in self.arrays.items()}

    def release(self) -> None:
        """Close the descriptors (each once, whichever thread gets it) and let go of the
        arrays: the memory goes with the last tensor that maps it (an error's traceback
        may keep this object alive)."""
        self.arrays = {}
        while self.fds:
            try:
                _, (fd, _) = self.fds.popitem()
            except KeyError:  # another thread took the last one
                return
            os.close(fd)


def open_shared(where: dict) -> dict[str, np.ndarray]:
    """In a worker: the arrays `SharedArrays.where` names, checked to be those very buffers."""
    arrays = {}
    for key, (pid, fd, name, shape, dtype) in where.items():
        mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
        try:
            if os.readlink(f"/proc/self/fd/{mine}") != f"/memfd:{name} (deleted)":
                raise RuntimeError(f"shared buffer {name} is gone (its batch was abandoned)")
            arrays[key] = np.memmap(f"/proc/self/fd/{mine}", dtype, "r+", shape=shape)
        finally:
            os.close(mine)
    return arrays


_DECODERS: dict = {}  # in a worker process: modality -> its decoder


def _start(decoders: dict, pixels: int) -> None:
    """A worker's initialiser: Ctrl-C is the parent's to handle; the decoding budget is this
    process's share of the whole."""
    from mmtools import media

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    media.PIXEL_BUDGET = media._PixelBudget(pixels)
    _DECODERS.update(decoders)


def _fill(modality: str, where: dict, offset: int, values: list) -> list:
    arrays = open_shared(where)
    return _DECODERS[modality].fill(arrays, offset, values)


@dataclass
class Workers:
    """An embedding step's decoding workers for one run: threads (always: captions, and the
    hand-over of the processes' buffers) and, with --decode-in processes, a process pool
    for the towers that have a picklable `decoder`."""

    threads: ThreadPoolExecutor
    procs: ProcessPoolExecutor | None = None
    decoders: dict = field(default_factory=dict)
    live: set = field(default_factory=set)

    @classmethod
    def start(cls, count: int, decode_in: str, towers: dict, name: str) -> Workers:
        threads = ThreadPoolExecutor(count, thread_name_prefix=f"mmtools-{name}")
        decoders = {m: t.decoder for m, t in towers.items() if hasattr(t, "decoder")}
        if decode_in != "processes" or not decoders:
            return cls(threads)
        from mmtools import media

        try:
            modules = _modules(decoders)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            threads.shutdown()
            raise UsageError(
                f"--decode-in processes: this model's preprocessing cannot be sent to another "
                f"process ({e}); use --decode-in threads"
            ) from None
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(sorted(set(_PRELOAD) | modules))
        _start_fork_server()
        pixels = max(1, media.PIXEL_BUDGET.total // count)
        procs = ProcessPoolExecutor(
            count, mp_context=ctx, initializer=_start, initargs=(decoders, pixels)
        )
        log.debug("%s: decoding in %d processes", name, count)
        return cls(threads, procs, decoders)

    def runs_in_processes(self, modality: str) -> bool:
        return self.procs is not None and modality in self.decoders

    def submit(self, modality: str, n: int, pieces: list, into: dict | None = None):
        """Decode `pieces` ([(offset, values)]) of an `n`-row batch in the processes:
        (the batch's buffers, [a future of every row's reason]). The buffers are the shared
        ones, or `into` (pinned tensors, on a GPU), copied once every piece is done."""
        shared = SharedArrays(self.decoders[modality].specs(n))
        self.live.add(shared)
        assert self.procs is not None
        try:
            futures = [
                self.procs.submit(_fill, modality, shared.where(), offset, values)
                for offset, values in pieces
            ]
        except BrokenProcessPool:  # a process died while an earlier batch was decoded
            self._let_go(shared)
            raise _died() from None
        bufs = shared.tensors() if into is None else into  # before _gather lets go of them
        return bufs, [self.threads.submit(self._gather, futures, shared, into)]

    def _gather(self, futures: list[Future], shared: SharedArrays, into: dict | None) -> list:
        try:
            for f in futures:  # none still writing once the buffer is let go
                with contextlib.suppress(BaseException):  # (wait() misses a cancelled one)
                    f.exception()
            reasons = [r for f in futures for r in _result(f)]
            if into is not None:
                import torch

                for key, t in into.items():
                    t.copy_(torch.from_numpy(shared.arrays[key]))
            return reasons
        finally:
            self._let_go(shared)

    def _let_go(self, shared: SharedArrays) -> None:
        shared.release()
        self.live.discard(shared)

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        if self.procs is not None:
            self.procs.shutdown(wait=False, cancel_futures=True)
        for shared in list(self.live):
            self._let_go(shared)


class _ModulePickler(pickle.Pickler):
    """A pickler that notes the module of every class, function and instance it meets."""

    def __init__(self):
        super().__init__(io.BytesIO(), pickle.HIGHEST_PROTOCOL)
        self.modules: set[str] = set()

    def reducer_override(self, obj):
        where = obj if isinstance(obj, type) or callable(obj) else type(obj)
        module = getattr(where, "__module__", None)
        if isinstance(module, str) and module not in ("__main__", "builtins"):
            self.modules.add(module)
        return NotImplemented


def _modules(decoders: dict) -> set[str]:
    """The modules that unpickling `decoders` imports (open_clip's transforms, torch's...):
    imported once by the fork server, not again by every decoding process it forks (each
    would spend seconds on open_clip alone), nor on every Ray call that starts a pool."""
    pickler = _ModulePickler()
    pickler.dump(decoders)
    return pickler.modules


def _start_fork_server() -> None:
    """Start the fork server with Ctrl-C blocked and stderr on /dev/null, both inherited by
    every process it forks. Ctrl-C in a terminal reaches the whole process group: the
    parent alone stops the run, with one line, not each process with a traceback (the
    server imports torch for seconds before it would ignore SIGINT itself, and a process
    still starting when the parent has gone fails loudly). Blocked, not ignored: a Ctrl-C
    that comes while the server starts waits for this thread and stops the run. Whatever a
    decoding process has to say comes back to the parent: every row's reason, or the error
    of its task."""
    from multiprocessing import forkserver

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        forkserver.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _result(future: Future) -> list:
    try:
        return future.result()
    except BrokenProcessPool:
        raise _died() from None


def _died() -> MmtoolsError:
    return MmtoolsError(
        "a process decoding images stopped abruptly (killed, or out of memory?); "
        "rerun to resume, with fewer --workers or --decode-in threads"
    )
