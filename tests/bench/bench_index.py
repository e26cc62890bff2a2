"""Benchmark: `mmtools index` and its queries on 1M x 512 float16 generated embeddings.

Run: python tests/bench/bench_index.py [--quick] [--rows N] [--max-memory 4GB] [--data DIR]

1. Generates N unit 512-d float16 embeddings around 100 centres, each spread in a
   32-dimensional subspace, clusters that IVF lists split, so that nprobe matters
   (N = 1,000,000; --quick 100,000), in shards of 100,000 rows under --data (default
   /tmp/mmtools-bench-index; reused when there).
2. Builds the index with the real command in a subprocess (`mmtools index --max-memory M`):
   seconds, and the peak RSS of that process (target: at most M).
3. Recall@10 of 200 queries (data rows moved by noise of norm 0.3) against an exact top 10
   computed with numpy over the same float16 vectors (target >= 0.95).
4. Query latency of 500 single queries (k = 10, the index's own nprobe, ids looked up as
   `mmtools search` does): p50 (target <= 10 ms) and p99.

The script exits 1 naming each missed target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from timing import Targets

ROOT = Path(__file__).resolve().parents[2]
DIM, SHARD, CENTRES, RANK, SPREAD = 512, 100_000, 100, 32, 0.5
QUERIES, LATENCY_QUERIES, K = 200, 500, 10
NOISE = 0.3  # norm of the noise that moves a data row (a unit vector) into a query
# The build runs in its own process, which reports its peak RSS (VmHWM: this process only,
# unlike getrusage, which counts what the parent held when it forked) when it exits.
PEAK = (
    "import atexit, re, sys\n"
    "peak = lambda: re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]\n"
    "atexit.register(lambda: print('peak-rss', peak(), file=sys.stderr))\n"
    "sys.argv = ['mmtools', *sys.argv[1:]]\n"
    "from mmtools.cli import main\n"
    "main()\n"
)


def generate(directory: Path, rows: int, seed: int = 0) -> None:
    """The embedding dataset, shard by shard (skipped when a complete copy is there)."""
    from mmtools import columns as C

    done = directory / "done.json"
    recipe = {"rows": rows, "seed": seed, "centres": CENTRES, "rank": RANK, "spread": SPREAD}
    if done.exists() and json.loads(done.read_text()) == recipe:
        return
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("part-*.parquet"):
        old.unlink()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    basis = (rng.standard_normal((CENTRES, RANK, DIM)) * SPREAD).astype(np.float32)
    info = {C.IMAGE_EMBEDDING: {"model": "bench-generated", "pretrained": None, "dim": DIM}}
    for k, start in enumerate(range(0, rows, SHARD)):
        n = min(SHARD, rows - start)
        which = rng.integers(0, CENTRES, n)
        coef = rng.standard_normal((n, RANK)).astype(np.float32)
        x = centres[which] + 0.03 * rng.standard_normal((n, DIM)).astype(np.float32)
        for c in np.unique(which):  # one cluster at a time: no n x RANK x DIM temporary
            at = which == c
            x[at] += coef[at] @ basis[c]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), DIM)
        ids = pa.array([f"{i:09d}" for i in range(start, start + n)])
        table = pa.table({C.ID: ids, C.IMAGE_EMBEDDING: emb})
        table = table.replace_schema_metadata(C.with_metadata(table.schema, info).metadata)
        pq.write_table(table, directory / f"part-{k:05d}.parquet")
    done.write_text(json.dumps(recipe))


def build(data: Path, index: Path, max_memory: str) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, summary line) of the real `mmtools index` command."""
    cmd = [sys.executable, "-c", PEAK, "index", str(data), "-o", str(index)]
    cmd += ["--max-memory", max_memory, "--overwrite", "-q", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mmtools index failed:\n{proc.stderr.decode()}")
    lines = proc.stderr.decode().strip().splitlines()
    peak = int(lines[-1].split()[1]) * 1024  # KiB on Linux
    return seconds, peak, lines[-2]


def vectors(data: Path):
    """(ids, float32 unit vectors) of each shard, as the index reads them."""
    from mmtools import columns as C
    from mmtools.io.index import unit_vectors

    for path in sorted(data.glob("part-*.parquet")):
        table = pq.read_table(path)
        yield (
            table.column(C.ID).to_numpy(zero_copy_only=False),
            unit_vectors(table.column(C.IMAGE_EMBEDDING))[0],
        )


def queries_and_truth(data: Path, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries (data rows plus noise) and their exact top-10 ids by brute force."""
    rng = np.random.default_rng(1)
    picks = np.sort(rng.choice(rows, QUERIES, replace=False))
    base = np.zeros((QUERIES, DIM), np.float32)
    offset = 0
    for _, x in vectors(data):
        inside = (picks >= offset) & (picks < offset + len(x))
        base[inside] = x[picks[inside] - offset]
        offset += len(x)
    noise = rng.standard_normal(base.shape).astype(np.float32)
    q = base + NOISE * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best_s = np.full((QUERIES, K), -np.inf, np.float32)
    best_i = np.empty((QUERIES, K), object)
    for ids, x in vectors(data):
        sims = q @ x.T
        top = np.argpartition(-sims, K, axis=1)[:, :K]
        s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], axis=1)
        i = np.concatenate([best_i, ids[top]], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return q, best_i


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 rows")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument("--data", type=Path, default=Path("/tmp/mmtools-bench-index"))
    args = parser.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    sys.path.insert(0, str(ROOT))
    from mmtools.io.index import IndexReader
    from mmtools.sizes import human_bytes as human
    from mmtools.sizes import parse_size
    from mmtools.tools.index.hits import find

    targets = Targets()
    data, index = args.data / f"data-{rows}", args.data / f"index-{rows}"
    t0 = time.perf_counter()
    generate(data, rows)
    print(f"data: {rows:,} x {DIM} float16 in {time.perf_counter() - t0:.0f} s -> {data}")
    seconds, peak, line = build(data, index, args.max_memory)
    report = json.loads(line)
    print(
        f"build: {seconds:.1f} s ({rows / seconds:,.0f} rows/s), {report['factory']}, nprobe "
        f"{report['nprobe']}, index {human(report['bytes'])}, peak RSS {human(peak)} "
        f"(--max-memory {args.max_memory})"
    )
    targets.at_most("peak RSS, GiB", peak / (1 << 30), parse_size(args.max_memory) / (1 << 30))
    queries, truth = queries_and_truth(data, rows)
    reader = IndexReader(str(index))
    ids = reader.ids().column("id").to_numpy(zero_copy_only=False)
    _, labels = reader.search(queries, K)
    recall = np.mean([len(set(ids[f]) & set(t)) / K for f, t in zip(labels, truth, strict=True)])
    print(f"recall@{K} against exact: {recall:.3f} ({QUERIES} queries)")
    targets.at_least(f"recall@{K}", recall, 0.95)
    for q in queries[:20]:  # warm caches
        find(reader, q[None, :], K)
    times = []
    for i in range(LATENCY_QUERIES):
        q = queries[i % QUERIES][None, :]
        t = time.perf_counter()
        find(reader, q, K)
        times.append((time.perf_counter() - t) * 1000)
    p50, p99 = np.percentile(times, [50, 99])
    print(f"query latency: p50 {p50:.2f} ms, p99 {p99:.2f} ms ({LATENCY_QUERIES} single queries)")
    targets.at_most("query latency p50, ms", p50, 10.0)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
