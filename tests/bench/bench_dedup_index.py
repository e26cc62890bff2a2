"""Benchmark: `dedup --index` over batches arriving one after another, against a growing index.

Run: python tests/bench/bench_dedup_index.py [--quick] [--methods exact,phash,minhash,semantic]

B batches of R rows (30 x 20,000, to a 600,000-row index; --quick 6 x 2,000), each with 10%
copies of rows of earlier batches (byte copies for exact, re-encoded copies for pHash,
captions with a word changed for MinHash, nudged embeddings for semantic), each deduped by
the engine (Parquet in, dataset out) against the index the batches before it fed. Prints
each batch's seconds, the index's rows and its size on disk per row, and checks the growth
of the per-batch time from the first batches to the last (median of three each): <= 1.5x
for exact and pHash, <= 2x for MinHash and semantic. The share of planted copies found is
printed and checked too: >= 0.95, 0.9 for semantic (a fast index that misses them is no index);
and so are the index's bytes per row: at most 20% over what README states.

Semantic dedup fits its k-means model again when the index has doubled since the last fit;
those batches take longer and are left out of the growth figure (compared like with like),
and the mean time per batch over the last third against the first third, fits included,
is printed beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from timing import Targets

GROWTH = {"exact": 1.5, "phash": 1.5, "minhash": 2.0, "semantic": 2.0}
DIM = 256
# Index bytes per row README states (with the id), each allowed 20% more.
BYTES = {"exact": 22, "phash": 27, "minhash": 290, "semantic": DIM + 26}
COPIES = 0.1
WORDS = [f"w{k}" for k in range(5000)]


def jpeg(seed: int, quality: int = 90) -> bytes:
    """A 32x32 image of 8x8 random blocks, smoothed (JPEG of it): pHashes of distinct seeds
    are far apart (one pair within 10 bits among 4,000; 6x6 blocks give 37)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((32, 32), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def batch_table(method: str, b: int, rows: int, rng) -> tuple[pa.Table, int]:
    """Batch `b`: new rows numbered from b * rows, and COPIES of them copies of earlier rows;
    the number of copies."""
    from mmtools import columns as C

    n_copy = int(rows * COPIES) if b else 0
    new = np.arange(b * rows, b * rows + rows - n_copy)
    # Copies of new rows of earlier batches (batch j's new rows are j * rows + [0, fresh)).
    fresh = rows - int(rows * COPIES)
    old = rng.integers(0, max(b, 1), n_copy) * rows + rng.integers(0, fresh, n_copy)
    ids = [f"r{b:02d}-{k:06d}" for k in range(rows)]
    seeds = np.r_[new, old]
    if method in ("exact", "phash"):
        quality = [90] * len(new) + ([90] * n_copy if method == "exact" else [70] * n_copy)
        blobs = [jpeg(int(s), q) for s, q in zip(seeds, quality, strict=True)]
        cols = {C.ID: ids, C.IMAGE: C.media_array(blobs, [None] * rows)}
    elif method == "minhash":
        texts = []
        for k, s in enumerate(seeds):
            words = list(np.random.default_rng(int(s)).choice(WORDS, 12))
            if k >= len(new):
                words[-1] = "changed"
            texts.append(" ".join(words))
        cols = {C.ID: ids, C.TEXT: texts}
    else:
        x = np.stack([np.random.default_rng(int(s)).standard_normal(DIM) for s in seeds])
        x[len(new) :] += 0.05 * rng.standard_normal((n_copy, DIM))
        flat = pa.array(x.astype(np.float16).ravel())
        cols = {C.ID: ids, C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, DIM)}
    return pa.table(cols), n_copy


def bench(method: str, batches: int, rows: int, work: Path, targets: Targets) -> None:
    from mmtools import engines
    from mmtools.io.dataset import DatasetSink
    from mmtools.io.source import Source
    from mmtools.steps.dedup.step import Dedup, DedupConfig

    rng = np.random.default_rng(0)
    idx = work / f"idx-{method}"
    seconds, fits, found, planted = [], [], 0, 0
    print(f"{method}: {batches} batches of {rows} rows")
    for b in range(batches):
        table, n_copy = batch_table(method, b, rows, rng)
        src = work / f"in-{method}.parquet"
        pq.write_table(table, src)
        step = Dedup(DedupConfig(methods=(method,), index=str(idx)))
        out = work / f"out-{method}-{b}"
        t0 = time.perf_counter()
        engines.run("dedup", Source([str(src)]), [step], DatasetSink(str(out)), quiet=True)
        seconds.append(time.perf_counter() - t0)
        shutil.rmtree(out)
        found += step.stats[method].get("of_earlier_runs", 0)
        planted += n_copy
        manifest = json.loads((idx / "_index.json").read_text())
        model = manifest.get("model", {})
        size = sum(g["bytes"] for g in manifest["generations"]) + model.get("bytes", 0)
        fits.append(model.get("gen") == manifest["generations"][-1]["gen"])
        refit = " (model fitted)" if fits[-1] else ""
        print(
            f"  batch {b + 1:2d}: {seconds[-1]:6.2f} s, index {manifest['rows']:7d} rows, "
            f"{size / max(1, manifest['rows']):6.1f} bytes/row{refit}"
        )
    steady = [t for t, fit in zip(seconds, fits, strict=True) if not fit]
    first, last = np.median(steady[:3]), np.median(steady[-3:])
    third = max(1, batches // 3)
    amortised = np.mean(seconds[-third:]) / np.mean(seconds[:third])
    if any(fits):
        at = [b + 1 for b, fit in enumerate(fits) if fit]
        print(f"  model fitted in batches {at}; mean per batch, last/first third: {amortised:.2f}x")
    print(
        f"  per-batch time, last/first three{' without a fit' if any(fits) else ''}: "
        f"{first:.2f} -> {last:.2f} s, {last / first:.2f}x (target <= {GROWTH[method]}x); "
        f"planted copies found: {found / max(1, planted):.3f}"
    )
    targets.at_most(f"{method}: per-batch time, last/first", last / first, GROWTH[method], "x")
    if manifest["rows"] >= 100_000:  # smaller, each generation's own overhead counts
        per_row = size / manifest["rows"]
        targets.at_most(f"{method}: index bytes per row", per_row, 1.2 * BYTES[method], " B")
    # k-means puts a few near copies in other clusters than their original (SemDeDup finds
    # pairs within a cluster only), in one run over all rows as much as against an index.
    floor = 0.9 if method == "semantic" else 0.95
    targets.at_least(f"{method}: planted copies found", found / max(1, planted), floor)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", default="exact,phash,minhash,semantic")
    parser.add_argument("--batches", type=int, help="default 30 (--quick 6)")
    parser.add_argument("--rows", type=int, help="rows per batch, default 20000 (--quick 2000)")
    args = parser.parse_args()
    batches, rows = (6, 2000) if args.quick else (30, 20000)
    batches, rows = args.batches or batches, args.rows or rows
    targets = Targets()
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            bench(method, batches, rows, Path(tmp), targets)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
