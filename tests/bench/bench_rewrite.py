"""Benchmark: `rewrite` rows/s through the OpenAI backend as --concurrency grows.

Run: python tests/bench/bench_rewrite.py [--quick] [--latency 0.2] [--concurrency 1,8,64]
     [--repeats 2]

A loopback OpenAI-compatible server (tests/llm_server.py) answers every request after a
fixed latency (default 200 ms), as a model server with spare capacity would. For each
concurrency the `Rewrite` step runs over enough rows to take a few seconds (batches of 256,
as the command does, no cache), timed from the first batch to the last result. Printed:
rows/s, the speed-up over concurrency 1 measured in the same run, and the share of the
latency-bound ideal (concurrency / latency rows/s); each level is the best of --repeats runs,
as other work shares the machine. Target: at concurrency 64, at least 0.9 of the ideal (exit 1
naming the miss otherwise). A final line runs the whole command (`mmtools rewrite DIR -o OUT`,
Parquet in and out, process start included) at the highest concurrency, for information.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from llm_server import LLMServer  # noqa: E402
from timing import Targets  # noqa: E402

BATCH = 256
TARGET_CONCURRENCY, TARGET = 64, 0.9  # of the ideal concurrency / latency rows/s


def rows(n: int) -> pa.Table:
    """`n` rows of id and alt-text."""
    return pa.table(
        {
            "id": [f"{i:08d}" for i in range(n)],
            "text": [f"a photo number {i} of a dog in a park" for i in range(n)],
        }
    )


def step_rate(url: str, concurrency: int, n: int) -> float:
    """Rows/s of the Rewrite step over `n` rows at `concurrency`."""
    from mmtools.steps.rewrite.step import Rewrite, RewriteConfig

    step = Rewrite(
        RewriteConfig(
            backend="openai",
            model="bench",
            base_url=url,
            concurrency=concurrency,
            retries=0,
            cache=None,
        )
    )
    table = rows(n)
    step.output_schema(table.schema)
    step.setup()
    try:
        t0 = time.perf_counter()
        out = sum(r.batch.num_rows for r in step.run(table.to_batches(BATCH)))
        seconds = time.perf_counter() - t0
    finally:
        step.close()
    assert out == n, f"{n - out} rows lost"
    return n / seconds


def command_rate(url: str, concurrency: int, n: int) -> float:
    """Rows/s of the whole command, process start and Parquet I/O included."""
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(rows(n), f"{tmp}/in.parquet")
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mmtools",
                "rewrite",
                f"{tmp}/in.parquet",
                "-o",
                f"{tmp}/out",
                "--base-url",
                url,
                "--model",
                "bench",
                "--concurrency",
                str(concurrency),
                "--no-cache",
                "-q",
            ],
            check=True,
        )
        return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="about 1 s per setting, one run each")
    p.add_argument("--latency", type=float, default=0.2, help="server seconds per request")
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per level")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    seconds, repeats = (1.0, 1) if args.quick else (4.0, args.repeats)
    targets = Targets()
    print(f"rewrite via the openai backend, server latency {args.latency * 1000:.0f} ms")
    print(
        f"{'concurrency':>11} {'rows':>6} {'rows/s':>8} {'vs c=' + str(levels[0]):>8} "
        f"{'of ideal':>9}"
    )
    with LLMServer(latency=args.latency) as server:
        base = None
        for c in levels:
            n = max(8, int(seconds * c / args.latency))
            rate = max(step_rate(server.url, c, n) for _ in range(repeats))
            base = base or rate
            ideal = c / args.latency
            print(
                f"{c:>11} {n:>6} {rate:>8.1f} {rate / base:>7.1f}x {rate / ideal:>8.0%}", flush=True
            )
            if c == TARGET_CONCURRENCY:
                targets.at_least(f"rows/s of the ideal at concurrency {c}", rate / ideal, TARGET)
        c = levels[-1]
        n = max(8, int(seconds * c / args.latency))
        rate = command_rate(server.url, c, n)
        print(
            f"whole command at concurrency {c}: {n} rows, {rate:.1f} rows/s "
            f"({rate / base:.1f}x c={levels[0]}, {rate / (c / args.latency):.0%} of ideal)"
        )
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
