"""Timing helpers and target checks shared by the benchmark scripts."""

from __future__ import annotations

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
