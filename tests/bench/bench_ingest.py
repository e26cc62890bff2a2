"""Benchmark: ingest and streaming copy against plain pyarrow; memory flat as data grows.

Run: python tests/bench/bench_ingest.py [--quick]

1. `mmtools ingest` of N small JPEGs (decode-verified, hashed) against a plain loop that
   reads the same files into a pyarrow table and writes one Parquet file.
2. A streaming copy through the engine (read, account, write shards, manifest) against
   `pq.read_table` + `pq.write_table` of the same dataset.
3. Peak RSS of the streaming copy for a dataset and for one 10x larger.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from timing import timed

COPY = """
import resource, sys, time
from mmtools import engines as engine
from mmtools.io.source import Source
from mmtools.io.dataset import DatasetSink
t0 = time.perf_counter()
engine.run("copy", Source([sys.argv[1]]), [], DatasetSink(sys.argv[2], overwrite=True),
           quiet=True)
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for i in range(n):
        arr = np.roll(base, i % 64, axis=i % 2)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        (folder / f"{i:06d}.txt").write_text(f"sample {i}")


def plain_ingest(folder: Path, out: Path) -> None:
    names = sorted(p for p in os.listdir(folder) if p.endswith(".jpg"))
    data = [(folder / n).read_bytes() for n in names]
    text = [(folder / (n[:-4] + ".txt")).read_text() for n in names]
    pq.write_table(pa.table({"id": names, "image": data, "text": text}), out)


def mmtools(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mmtools", *args], check=True)


def big_dataset(path: Path, rows: int, payload: int) -> None:
    rng = np.random.default_rng(1)
    chunk = 500
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("data", pa.binary())])) as w:
        for start in range(0, rows, chunk):
            ids = [f"r{i}" for i in range(start, min(rows, start + chunk))]
            w.write_table(pa.table({"id": ids, "data": [rng.bytes(payload) for _ in ids]}))


def copy(src: Path, dst: Path) -> tuple[float, float]:
    """Seconds of a streaming copy through the engine, and the process's peak RSS in MiB."""
    out = subprocess.run(
        [sys.executable, "-c", COPY, str(src), str(dst)], check=True, capture_output=True, text=True
    ).stdout
    seconds, rss = out.strip().splitlines()[-1].split()
    return float(seconds), int(rss) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 2_000 if args.quick else 20_000
    os.environ.setdefault("MMTOOLS_FSYNC", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "imgs", n)
        t_plain = timed(lambda: plain_ingest(tmp / "imgs", tmp / "plain.parquet"))
        t_ingest = timed(lambda: mmtools("ingest", str(tmp / "imgs"), "-o", str(tmp / "ds"), "-q"))
        t_fast = timed(
            lambda: mmtools(
                "ingest", str(tmp / "imgs"), "-o", str(tmp / "ds2"), "-q", "--no-verify"
            )
        )
        print(
            f"ingest {n} images: mmtools {n / t_ingest:,.0f} rows/s (verified), "
            f"{n / t_fast:,.0f} rows/s (--no-verify); plain read+write {n / t_plain:,.0f} "
            f"rows/s; ratio {t_plain / t_ingest:.2f} (verified), {t_plain / t_fast:.2f}"
        )

        rows = 2_000 if args.quick else 5_000
        big_dataset(tmp / "x1.parquet", rows, 10_000)
        big_dataset(tmp / "x10.parquet", rows * 10, 10_000)
        t_copy, _ = copy(tmp / "x10.parquet", tmp / "copy")
        t_pa = timed(lambda: pq.write_table(pq.read_table(tmp / "x10.parquet"), tmp / "pa.pq"))
        print(
            f"streaming copy of {rows * 10} rows x 10 KB: mmtools {t_copy:.2f} s, pyarrow "
            f"read_table+write_table {t_pa:.2f} s; ratio {t_pa / t_copy:.2f}"
        )
        _, m1 = copy(tmp / "x1.parquet", tmp / "c1")
        _, m10 = copy(tmp / "x10.parquet", tmp / "c10")
        size1 = os.path.getsize(tmp / "x1.parquet") / 2**20
        print(
            f"streaming copy peak RSS: {m1:.0f} MiB for {size1:.0f} MiB, {m10:.0f} MiB for "
            f"{size1 * 10:.0f} MiB; growth {m10 / m1:.2f}x for 10x data"
        )


if __name__ == "__main__":
    main()
