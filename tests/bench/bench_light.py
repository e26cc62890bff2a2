"""Benchmark: peak RSS of the steps that run no model, each in its own process.

Run: python tests/bench/bench_light.py [--quick] [--rows N]

Data: N rows (default 20,000: about 20 MiB in Parquet; --quick 2,000) of id, caption, width,
height, clip_score, a 96x96 JPEG (`image`, 500 distinct ones) and a 512-d float16
image_embedding.
Each command runs once in a fresh process; its peak RSS (VmHWM) is printed, and the target
is at most 250 MiB for each: a streaming copy (`filter --where true`), `filter --where`,
`dedup -m exact`, `dedup -m phash`, `dedup -m minhash` and `stats`. Exit 1 when one misses.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import timing
from bench_dedup import jpegs
from timing import Targets

DIM = 512
TARGET_MIB = 250
WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "dog",
    "cat",
    "red",
    "car",
    "street",
    "two",
    "small",
    "large",
    "blue",
    "house",
    "tree",
]


def make_data(root: Path, rows: int) -> None:
    from mmtools import columns as C

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    blobs = jpegs(500)
    captions = [" ".join(rng.choice(WORDS, 8)) for _ in range(rows)]
    emb = rng.standard_normal((rows, DIM), dtype=np.float32).astype(np.float16)
    table = pa.table(
        {
            "id": [f"{i:012x}" for i in range(rows)],
            "text": captions,
            "width": pa.array(rng.integers(64, 1024, rows), pa.int32()),
            "height": pa.array(rng.integers(64, 1024, rows), pa.int32()),
            "clip_score": pa.array(rng.normal(0.25, 0.05, rows).astype(np.float32)),
            C.IMAGE: C.media_array([blobs[i % len(blobs)] for i in range(rows)], [None] * rows),
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), DIM),
        }
    )
    pq.write_table(table, root / "part-00000.parquet")


def peak_rss(*args) -> tuple[float, int]:
    """Run mmtools; return (seconds, peak RSS in MiB) of that process alone."""
    seconds, _, peak = timing.run_mmtools(*args)
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 rows")
    parser.add_argument("--rows", type=int, default=None, help="default 20,000 (--quick 2,000)")
    args = parser.parse_args()
    rows = args.rows or (2_000 if args.quick else 20_000)
    targets = Targets()
    with tempfile.TemporaryDirectory(prefix="bench-light-") as tmp:
        tmp = Path(tmp)
        make_data(tmp / "data", rows)
        size = sum(f.stat().st_size for f in (tmp / "data").iterdir())
        print(f"data: {rows:,} rows, {size / 2**20:.0f} MiB in Parquet")
        data, out = tmp / "data", tmp / "out"
        runs = {
            "copy (filter --where true)": ("filter", data, "--where", "true"),
            "filter --where": ("filter", data, "--where", "clip_score >= 0.28 AND width >= 256"),
            # 500 distinct images in thousands of rows: image dedup drops most rows, on purpose
            "dedup -m exact": ("dedup", data, "-m", "exact", "--max-drop-rate", "1"),
            "dedup -m phash": ("dedup", data, "-m", "phash", "--max-drop-rate", "1"),
            "dedup -m minhash": ("dedup", data, "-m", "minhash"),
        }
        for name, cmd in runs.items():
            t, rss = peak_rss(*cmd, "-o", out, "--overwrite", "-q")
            print(f"  {name:<28} {t:6.1f} s  peak RSS {rss:4d} MiB")
            targets.at_most(f"{name} peak RSS", rss, TARGET_MIB, " MiB")
        t, rss = peak_rss("stats", data)
        print(f"  {'stats':<28} {t:6.1f} s  peak RSS {rss:4d} MiB")
        targets.at_most("stats peak RSS", rss, TARGET_MIB, " MiB")
    raise SystemExit(targets.exit_code())


if __name__ == "__main__":
    main()
