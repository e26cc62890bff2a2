"""Benchmark: one pipeline on the local engine and on Ray (2 CPUs), and how Ray scales out.

Run: python tests/bench/bench_ray.py [--quick] [--images N] [--dedup-rows N]

1. Overhead: ingest -> embed (a tiny random open_clip model) -> score -> filter --where ->
   dedup exact -> mixup, each step reading the previous step's output with the commands'
   default batch sizes, on N generated captioned JPEGs (N = 20,000; --quick 300), by the
   local engine and by the Ray engine on a local cluster of 2 CPUs, started once beforehand
   (its start-up time is printed apart). Prints seconds per step and the ratio Ray / local;
   above 1 is Ray's overhead. Below 100,000 rows the Ray engine computes score, filter,
   dedup exact and mixup's first pass in the driver (column values only), as it would for a
   user. Target: the whole chain on Ray in at most 1.5x the local engine's time, from 20,000
   images on (exit 1 when missed), with the same rows out of every step. Then dedup (exact,
   phash, semantic) with its keys made on the workers and Ray's groupby forced on that small
   input: their fixed cost.
2. Scaling, simulated: a model-like step that spends a fixed 0.5 s (--quick 0.2 s) per batch
   waiting (as a model step waits on its accelerator or a rewrite step on its LLM server), in
   an actor pool of 1, 2, 4 and 8 workers on a cluster of that many logical CPUs and one more
   (to read the input), one batch per call. Prints the
   actors' start-up time and the steady-state batches/s (first to last output batch), with
   the speed-up over 1 worker next to the ideal: how throughput grows when each worker has
   its own core or GPU, which this 2-core machine cannot show with real compute.
3. With --dedup-rows N: dedup exact, minhash and semantic on N generated rows (over the
   100,000 from which Ray's groupby runs), local vs Ray, with the rows both kept.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import Targets

from mmtools.step import Result, Step

BATCH = 64  # rows per batch of the scaling test's simulated model step
MODEL_BATCH = 256  # the default --batch-size of ingest, embed, score and mixup
TARGET_IMAGES = 20_000  # the Ray/local target holds from this many images on
TARGET_RATIO = 1.5
SHARD = 1000
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_images(root: Path, n: int) -> Path:
    """`n` random 64x48 JPEGs with captions; every 20th is a copy of another."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        seed = i - 1 if i % 20 == 19 else i
        arr = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG")
        (root / f"img{i:06d}.jpg").write_bytes(buf.getvalue())
        words = " ".join(rng.choice(["a", "red", "photo", "of", "cat", "dog", "sky"], 6))
        (root / f"img{i:06d}.txt").write_text(words)
    return root


def pipeline(work: Path, images: Path) -> list[tuple[str, object, object, int | None]]:
    """(command, make_source, make_steps, batch size) for each step; each reads the previous
    output; batch size None: sized by bytes, as filter and dedup do by default."""
    from mmtools.io.source import Source
    from mmtools.steps.dedup.step import Dedup, DedupConfig
    from mmtools.steps.embed import ClipEmbed, EmbedConfig
    from mmtools.steps.filter.step import FilterConfig, make_filter
    from mmtools.steps.ingest.listing import ListingOptions
    from mmtools.steps.ingest.step import Ingest, IngestConfig, ListingSource
    from mmtools.steps.mixup import Mixup, MixupConfig
    from mmtools.steps.score.step import score_steps

    work.mkdir(exist_ok=True)
    model = work / "tiny-clip.json"
    model.write_text(json.dumps(TINY_CLIP))
    embed = EmbedConfig(
        model=str(model), pretrained="none", device="cpu", batch_size=MODEL_BATCH, workers=2
    )

    def src(name):
        return lambda: Source([str(work / name)])

    return [
        (
            "ingest",
            lambda: ListingSource([str(images)], ListingOptions()),
            lambda s: [Ingest(IngestConfig(), s.kinds, workers=2)],
            MODEL_BATCH,
        ),
        ("embed", src("ingest"), lambda s: [ClipEmbed(embed)], MODEL_BATCH),
        ("score", src("embed"), lambda s: score_steps(s.schema, None, embed), MODEL_BATCH),
        (
            "filter",
            src("score"),
            lambda s: [make_filter(FilterConfig(where="clip_score > -1"))],
            None,
        ),
        ("dedup", src("filter"), lambda s: [Dedup(DedupConfig(methods=("exact",)))], None),
        ("mixup", src("dedup"), lambda s: [Mixup(MixupConfig(fraction=0.3, seed=1))], MODEL_BATCH),
    ]


def run_once(
    executor,
    out: Path,
    command: str,
    make_source,
    make_steps,
    batch_size: int | None = BATCH,
    **kw,
) -> float:
    """Seconds for one step run into a fresh output directory (`executor`: its class;
    `batch_size` None: sized by bytes)."""
    from mmtools import engines
    from mmtools.io.dataset import DatasetSink

    source = make_source()
    steps = make_steps(source)
    batch_size = batch_size or source.batch_rows()
    t0 = time.perf_counter()
    engines.run(
        command,
        source,
        steps,
        DatasetSink(str(out), shard_rows=SHARD, overwrite=True),
        executor=executor(),
        batch_size=batch_size,
        quiet=True,
        **kw,
    )
    return time.perf_counter() - t0


def bench_overhead(n: int, tmp: Path, targets: Targets) -> None:
    import pyarrow.parquet as pq
    import ray

    from mmtools.engines.local import LocalExecutor
    from mmtools.engines.ray import executor as ray_engine

    images = make_images(tmp / "images", n)
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    print(f"Ray local cluster (2 CPUs) start: {time.perf_counter() - t0:.1f} s (not counted)")
    t0 = time.perf_counter()
    warm = pipeline(tmp / "warm", images)[0]
    run_once(ray_engine.RayExecutor, tmp / "warm" / "ingest", *warm)
    print(f"first Ray job (worker processes start): {time.perf_counter() - t0:.1f} s (not counted)")
    totals = {"local": 0.0, "ray": 0.0}
    print(f"{'step':8} {'local s':>8} {'ray s':>8} {'ray/local':>9}   ({n:,} images)")
    for name, eng in (("local", LocalExecutor), ("ray", ray_engine.RayExecutor)):
        work = tmp / name
        for command, make_source, make_steps, size in pipeline(work, images):
            seconds = run_once(eng, work / command, command, make_source, make_steps, size)
            totals[name] += seconds
            totals[(name, command)] = seconds
    for command, *_ in pipeline(tmp / "local", images):
        a, b = totals[("local", command)], totals[("ray", command)]
        ids = [pq.read_table(tmp / e / command, columns=["id"])["id"] for e in ("local", "ray")]
        same = "same rows" if ids[0].equals(ids[1]) else "ROWS DIFFER"
        print(f"{command:8} {a:8.2f} {b:8.2f} {b / a:9.2f}   {len(ids[0]):,} rows, {same}")
        targets.holds(f"{command}: the same rows on both engines", ids[0].equals(ids[1]), same)
    a, b = totals["local"], totals["ray"]
    print(
        f"{'total':8} {a:8.2f} {b:8.2f} {b / a:9.2f}   "
        f"({n / a:,.0f} vs {n / b:,.0f} images/s end to end)"
    )
    if n >= TARGET_IMAGES:
        targets.at_most(f"Ray / local, {n:,} images", b / a, TARGET_RATIO, "x")
    bench_forced_shuffle(tmp)
    ray.shutdown()


def bench_forced_shuffle(tmp: Path) -> None:
    """dedup with Ray Data's groupby, which only runs from SHUFFLE_MIN_ROWS rows on, forced
    on this small input (and its keys made on the workers, not in the driver as below
    DRIVER_ROWS): the fixed cost the thresholds save."""
    from mmtools.engines.local import LocalExecutor
    from mmtools.engines.ray import executor as ray_engine
    from mmtools.io.source import Source
    from mmtools.steps.dedup.step import Dedup, DedupConfig

    threshold, ray_engine.SHUFFLE_MIN_ROWS = ray_engine.SHUFFLE_MIN_ROWS, 0
    driver, ray_engine.DRIVER_ROWS = ray_engine.DRIVER_ROWS, 0
    print(f"\ndedup with Ray's groupby forced (it runs from {threshold:,} rows on):")
    for methods in (("exact",), ("phash",), ("semantic",)):
        config = DedupConfig(methods=methods, clusters=4)
        seconds = [
            run_once(
                eng,
                tmp / name / f"dedup-{methods[0]}",
                "dedup",
                lambda: Source([str(tmp / "local" / "filter")]),
                lambda s, config=config: [Dedup(config)],
            )
            for name, eng in (("local", LocalExecutor), ("ray", ray_engine.RayExecutor))
        ]
        a, b = seconds
        print(f"dedup -m {methods[0]:8} local {a:6.2f} s, ray {b:6.2f} s, ray/local {b / a:6.2f}")
    ray_engine.SHUFFLE_MIN_ROWS, ray_engine.DRIVER_ROWS = threshold, driver


def bench_dedup_rows(n: int, tmp: Path) -> None:
    """dedup on `n` generated rows (captions half copied or edited; embeddings half noisy
    copies), local engine vs Ray's groupby (which runs from SHUFFLE_MIN_ROWS rows on)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from mmtools.engines.local import LocalExecutor
    from mmtools.engines.ray import executor as ray_engine
    from mmtools.io.source import Source
    from mmtools.steps.dedup.step import Dedup, DedupConfig

    rng = np.random.default_rng(0)
    words = np.array([f"w{k}" for k in range(5000)])
    texts = [" ".join(rng.choice(words, 8)) for _ in range(n // 2)]
    picks = rng.integers(0, n // 2, n - n // 2)
    texts += [texts[i] + (" edited" if i % 3 == 0 else "") for i in picks]
    x = rng.normal(size=(n, 64)).astype(np.float32)
    x[n // 2 :] = x[: n - n // 2] + rng.normal(scale=0.02, size=(n - n // 2, 64))
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), 64)
    order = rng.permutation(n)
    table = pa.table({"id": [f"r{i:08d}" for i in range(n)], "text": texts, "image_embedding": emb})
    table = table.take(order)
    data = tmp / "dedup-rows"
    data.mkdir()
    for k in range(4):
        start, stop = k * n // 4, (k + 1) * n // 4
        pq.write_table(table.slice(start, stop - start), data / f"part-{k}.parquet")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    print(f"\ndedup on {n:,} rows (4 files), local vs Ray's groupby:")
    for methods in (("exact",), ("minhash",), ("semantic",)):
        config = DedupConfig(methods=methods)
        seconds, rows = [], []
        for name, eng in (("local", LocalExecutor), ("ray", ray_engine.RayExecutor)):
            out = tmp / f"dedup-{name}-{methods[0]}"
            seconds.append(
                run_once(
                    eng,
                    out,
                    "dedup",
                    lambda: Source([str(data / "part-*.parquet")]),
                    lambda s, config=config: [Dedup(config)],
                    batch_size=4096,
                )
            )
            rows.append(json.loads((out / "_manifest.json").read_text())["rows"])
        a, b = seconds
        assert rows[0] == rows[1], rows
        print(
            f"dedup -m {methods[0]:8} local {a:6.1f} s, ray {b:6.1f} s, ray/local {b / a:5.2f} "
            f"({rows[0]:,} rows kept by both)"
        )
    ray.shutdown()


class Waiting(Step):
    """A model-like step: a fixed wait per batch, rows unchanged; one per actor."""

    name = "waiting"
    loads_model = True

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def process(self, batch):
        """The batch, after the wait."""
        time.sleep(self.seconds)
        return Result(batch)


def bench_scaling(quick: bool, tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from mmtools import engines
    from mmtools.engines.ray import executor as ray_engine
    from mmtools.io.dataset import DatasetSink
    from mmtools.io.source import Source

    class TimedSink(DatasetSink):
        """Notes when each batch arrives, to time the steady state apart from start-up."""

        def write(self, batch, *args, **kw):
            if batch is not None:
                self.arrivals.append(time.perf_counter())
            return super().write(batch, *args, **kw)

    wait, batches = (0.2, 32) if quick else (0.5, 64)
    # One batch per actor call, so that each batch's arrival times the steady state.
    ray_engine.CALL_ROWS = BATCH
    path = tmp / "rows.parquet"
    pq.write_table(pa.table({"id": [f"{i:08d}" for i in range(batches * BATCH)]}), path)
    print(f"\nsimulated scaling: {batches} batches of {BATCH} rows, {wait} s of work per batch")
    print(f"{'workers':>7} {'start-up s':>10} {'batches/s':>9} {'speed-up':>8} {'ideal':>6}")
    base = None
    for k in (1, 2, 4, 8):
        ray.init(
            num_cpus=k + 1,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
        sink = TimedSink(str(tmp / f"scale{k}"), shard_rows=SHARD)
        sink.arrivals = []
        t0 = time.perf_counter()
        options = ray_engine.RayOptions(concurrency=k)
        steps = [Waiting(wait)]
        engines.run(
            "waiting",
            Source([str(path)]),
            steps,
            sink,
            executor=ray_engine.RayExecutor(options),
            batch_size=BATCH,
            quiet=True,
        )
        ray.shutdown()
        first, last = sink.arrivals[0], sink.arrivals[-1]
        rate = (batches - 1) / (last - first)
        base = base or rate
        print(f"{k:7d} {first - t0:10.1f} {rate:9.2f} {rate / base:8.2f} {k:6d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (CI smoke test)")
    parser.add_argument(
        "--images", type=int, default=None, help=f"images (default {TARGET_IMAGES:,}; --quick 300)"
    )
    parser.add_argument(
        "--dedup-rows", type=int, default=0, help="also time dedup on this many rows"
    )
    args = parser.parse_args()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("MMTOOLS_FSYNC", "0")
    import torch

    torch.set_num_threads(2)  # the local engine gets the same 2 CPUs as the Ray cluster
    n = args.images or (300 if args.quick else TARGET_IMAGES)
    targets = Targets()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as d:
        bench_overhead(n, Path(d), targets)
        bench_scaling(args.quick, Path(d))
        if args.dedup_rows:
            bench_dedup_rows(args.dedup_rows, Path(d))
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
