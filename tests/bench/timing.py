"""Timing helpers and target checks shared by the benchmark scripts."""

from __future__ import annotations

import compileall
import functools
import os
import subprocess
import sys
import time


def timed(fn, *args) -> float:
    """Seconds of one call."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def timed_cpu(fn, *args) -> tuple[float, float]:
    """(seconds, CPU seconds of this process, all threads) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def run_mmtools(*args) -> tuple[float, float, int]:
    """Run mmtools; return (seconds, CPU seconds, peak RSS in MiB) of that process alone."""
    _as_installed()
    return run_python("-m", "mmtools", *args)


@functools.cache
def _as_installed() -> None:
    """Compile mmtools' bytecode once, as `pip install` does. From a checkout with
    PYTHONDONTWRITEBYTECODE set (as on some CI machines) every timed run would otherwise
    compile each mmtools module again: 0.1-0.3 s a run that an installed copy never spends."""
    import mmtools

    compileall.compile_dir(os.path.dirname(mmtools.__file__), quiet=1)


def run_python(*args) -> tuple[float, float, int]:
    """Run this Python with `args`; return (seconds, CPU seconds, peak RSS in MiB) of that
    process alone."""
    # VmHWM of the child's own address space: getrusage would report the parent's peak,
    # which Linux carries into a child across fork and exec.
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.DEVNULL)
    peak, done = 0, 0
    while not done:
        done, status, usage = os.wait4(proc.pid, os.WNOHANG)
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                hwm = next(line for line in f if line.startswith("VmHWM:"))
            peak = max(peak, int(hwm.split()[1]) // 1024)
        except (OSError, StopIteration):
            pass
        time.sleep(0.01)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"python {' '.join(map(str, args))} failed ({code})")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, peak


class Targets:
    """The targets a benchmark states, checked as its figures come; misses named at the end."""

    def __init__(self) -> None:
        self.missed: list[str] = []

    def at_least(self, figure: str, value: float, target: float, unit: str = "") -> bool:
        """Check `value` >= `target`."""
        return self.holds(figure, value >= target, f"{value:.2f}{unit}, target >= {target}{unit}")

    def at_most(self, figure: str, value: float, target: float, unit: str = "") -> bool:
        """Check `value` <= `target`."""
        return self.holds(figure, value <= target, f"{value:.2f}{unit}, target <= {target}{unit}")

    def holds(self, figure: str, ok: bool, detail: str) -> bool:
        """Record a miss of `figure` (with `detail`: its value and target) unless `ok`."""
        if not ok:
            self.missed.append(f"{figure}: {detail}")
        return ok

    def exit_code(self) -> int:
        """Print a line per missed target (after every figure); 1 when any missed, else 0."""
        for miss in self.missed:
            print(f"TARGET MISSED: {miss}", flush=True)
        return 1 if self.missed else 0
