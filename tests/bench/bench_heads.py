"""Benchmark: `score --head` and `score --query` on stored embeddings, against bare torch.

Run: python tests/bench/bench_heads.py [--quick] [--rows N] [--device cpu|cuda]
     [--batch-size N]

Data: N rows (default 1,000,000; --quick 100,000) of 768-d float16 embeddings in Parquet
shards of 250,000 rows, recorded as made by ViT-L-14 with random weights (`--pretrained
none`), so that the queries' model builds offline. The heads are LAION's improved aesthetic
MLP (768-1024-128-64-16-1) and its linear head, with random weights in the published
shapes; they expect OpenAI's weights, hence `force`.

1. The head step against bare torch over the same arrays, in the same run: the Arrow
   batches are read into memory once (not timed); then, per batch, bare torch takes the
   float16 values, converts them to float32, L2-normalises them and runs the head's
   nn.Module; `HeadScore.process` does the same and checks each row and builds the output
   batch. Printed: rows/s of each and the ratio (target >= 0.8 for each head).
2. End to end: rows/s of `mmtools score DIR --head ...` and of `mmtools score DIR --query
   "a watermark" --query text --query "a logo"` (process start, model load for the
   queries, Parquet read and write included), beside a plain pyarrow read + write of the
   same files. Reported, no target.
Exits 1 naming each missed target.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from timing import Targets

from mmtools import columns as C
from mmtools.steps.embed import EmbedConfig
from mmtools.steps.score import HeadScore, HeadScoreConfig

DIM = 768
SHARD = 250_000
BLOCK = 65_536
RATIO = 0.8
INFO = {"model": "ViT-L-14", "pretrained": "none", "dim": DIM, "normalized": True}
QUERIES = ("a watermark", "text", "a logo")


def make_data(root: Path, rows: int) -> None:
    """Shards of random float16 vectors (rows drawn from one random block)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((BLOCK, DIM), dtype=np.float32).astype(np.float16)
    for start in range(0, rows, SHARD):
        n = min(SHARD, rows - start)
        emb = block[rng.integers(0, BLOCK, n)]
        table = pa.table(
            {
                C.ID: pa.array([f"{i:012x}" for i in range(start, start + n)]),
                C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), DIM),
            }
        )
        schema = C.with_metadata(table.schema, {C.IMAGE_EMBEDDING: INFO})
        pq.write_table(table.cast(schema), root / f"part-{start // SHARD:05d}.parquet")


def make_heads(root: Path) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Random heads in the published layouts, saved as LAION saved them."""
    torch.manual_seed(0)
    mlp = torch.nn.Module()
    mlp.layers = torch.nn.Sequential(
        torch.nn.Linear(DIM, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )  # fmt: skip
    mlp.forward = mlp.layers.forward
    linear = torch.nn.Linear(DIM, 1)
    heads = {
        "aesthetic_mlp": (root / "sac+logos+ava1-l14-linearMSE.pth", mlp),
        "aesthetic_linear": (root / "sa_0_4_vit_l_14_linear.pth", linear),
    }
    for path, module in heads.values():
        torch.save(module.state_dict(), path)
        module.eval()
    return heads


def bare(module: torch.nn.Module, batches: list[pa.RecordBatch], device) -> None:
    """The head by plain torch: float16 values -> float32 -> normalise -> module."""
    with torch.inference_mode():
        for batch in batches:
            col = batch.column(C.IMAGE_EMBEDDING)
            x = col.values.to_numpy(zero_copy_only=False).reshape(len(col), DIM)
            t = torch.from_numpy(x).to(device).float()
            out = module(torch.nn.functional.normalize(t, dim=1))[:, 0].cpu().numpy()
            assert len(out) == batch.num_rows


def stepped(step: HeadScore, batches: list[pa.RecordBatch]) -> None:
    for batch in batches:
        assert step.process(batch).batch.num_rows == batch.num_rows


def best_of(repeat: int, fn, *args) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_step(data: Path, heads: dict, args, targets: Targets) -> None:
    """Part 1: `HeadScore.process` against bare torch, interleaved, best of `repeat`."""
    batches = []
    for path in sorted(data.glob("*.parquet")):
        batches += pq.ParquetFile(path).iter_batches(batch_size=args.batch_size)
    schema = pq.read_schema(sorted(data.glob("*.parquet"))[0])
    device = torch.device(args.device)
    rows = sum(b.num_rows for b in batches)
    print(f"head step, {rows} rows of {DIM}-d float16, batches of {args.batch_size}, {device}")
    for name, (path, module) in heads.items():
        cfg = HeadScoreConfig(heads=[(name, str(path))], force=True,
                              embed=EmbedConfig(model=None, device=args.device))  # fmt: skip
        step = HeadScore(cfg)
        step.output_schema(schema)
        step.setup()
        module.to(device)
        stepped(step, batches[:2])  # warm up both
        bare(module, batches[:2], device)
        t_bare, t_step = np.inf, np.inf
        for _ in range(args.repeat):
            t_bare = min(t_bare, best_of(1, bare, module, batches, device))
            t_step = min(t_step, best_of(1, stepped, step, batches))
        ratio = t_bare / t_step
        print(f"  {name:17s} bare torch {rows / t_bare:12,.0f} rows/s   "
              f"HeadScore {rows / t_step:12,.0f} rows/s   ratio {ratio:.2f}")  # fmt: skip
        targets.at_least(f"{name} HeadScore / bare torch", ratio, RATIO)


def run_mmtools(*args) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmtools", *map(str, args), "-q"], check=True)
    return time.perf_counter() - t0


def plain_copy(src: Path, out: Path) -> None:
    """A plain pyarrow read + write of every shard, for scale."""
    out.mkdir()
    for path in sorted(src.glob("*.parquet")):
        pq.write_table(pq.read_table(path), out / path.name)


def bench_cli(data: Path, heads: dict, tmp: Path, rows: int, device: str) -> None:
    """Part 2: the commands end to end."""
    t_copy = best_of(1, plain_copy, data, tmp / "copy")
    head_args = [a for n, (p, _) in heads.items() for a in ("--head", f"{n}={p}")]
    t_head = run_mmtools("score", data, *head_args, "--force", "--device", device,
                         "-o", tmp / "heads")  # fmt: skip
    query_args = [a for q in QUERIES for a in ("--query", q)]
    t_query = run_mmtools("score", data, *query_args, "--device", device, "-o", tmp / "queries")
    print(f"end to end, {rows} rows (process start and Parquet I/O included)")
    print(f"  pyarrow read + write          {rows / t_copy:12,.0f} rows/s")
    print(f"  mmtools score --head x2       {rows / t_head:12,.0f} rows/s")
    print(f"  mmtools score --query x3      {rows / t_query:12,.0f} rows/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100,000 rows instead of 1,000,000")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    targets = Targets()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root / "data", rows)
        heads = make_heads(root)
        bench_step(root / "data", heads, args, targets)
        bench_cli(root / "data", heads, root, rows, args.device)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
