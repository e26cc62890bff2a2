"""Benchmark: is `embed` GPU-ready? img/s, GPU utilisation and the ratio to the bare forward pass.

Run: just bench-gpu  (or python tests/bench/bench_gpu.py [--quick] [--device cuda]
     [--models ViT-B-32,ViT-L-14] [--precisions fp16,bf16] [--images 20000] [--batch-size 256]
     [--workers N])

On a machine with an NVIDIA GPU (the default device is cuda when one is visible) it embeds
20,000 generated JPEGs (320x240, with captions, one Parquet file) with ViT-B-32 and ViT-L-14
(open_clip, random init from the architecture config: `--pretrained none`, nothing is
downloaded) in fp16 and bf16, and takes under 5 minutes. Without a GPU it runs the same
table small: a tiny model config (224-pixel input, so decoding costs what it costs for the
real models), 300 images, fp32, so that the script stays alive where there is no GPU.

Per model and precision, with the model loaded once:
- forward: the same model's image and text forward passes over random tensors already on the
  device, at the same batch size, timed alone (the GPU's capacity);
- decode: the embed step's own decoding workers (threads) turning the Parquet rows into pixel
  and token buffers with no model behind them, with one thread for scale, and with a thread
  per CPU but one when that is more than --workers (the CPU's capacity to feed the GPU);
  and the same with the images decoded in --workers processes (`--decode-in processes`);
- embed: the embed step end to end through the engine (Parquet in, decode in the workers,
  forward, normalise, dataset directory out), the path `mmtools embed` runs, with threads
  and again with processes (a second line per setting);
with the GPU's utilisation sampled while forward and embed run (torch.cuda.utilization, or
`nvidia-smi --query-gpu=utilization.gpu`). Targets on a GPU: embed / forward >= 0.9 for
every setting, and the whole run under 5 minutes; on CPU nothing is asserted beyond every row
coming out. Exits 1 naming each missed target (the ratio with the better of the two).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from bench_embed import data_slice, end_to_end, make_images, write_data
from timing import Targets

RATIO = 0.9  # embed / bare forward on a GPU
BUDGET_S = 300.0  # the whole run on a GPU
SIZE = (320, 240)
# On CPU: a ViT small enough to run anywhere, at the real models' 224-pixel input.
TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class GpuUtil:
    """GPU utilisation (%) sampled in a background thread while a `with` block runs."""

    def __init__(self, device, period: float = 0.2):
        self.device, self.period = device, period
        self.samples: list[float] = []
        self.how = self._method() if device.type == "cuda" else None

    def _method(self) -> str | None:
        import torch

        try:
            torch.cuda.utilization(self.device)
            return "torch"
        except Exception:  # torch needs pynvml (or amdsmi) for it
            return "nvidia-smi" if shutil.which("nvidia-smi") else None

    def _nvidia_smi_id(self) -> str:
        """The GPU's index or UUID as nvidia-smi names it (CUDA_VISIBLE_DEVICES remaps)."""
        index = self.device.index or 0
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
        return visible[index] if index < len(visible) else str(index)

    def sample(self) -> float | None:
        """One reading, or None when none could be had."""
        if self.how == "torch":
            import torch

            return float(torch.cuda.utilization(self.device))
        if self.how == "nvidia-smi":
            query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            cmd = ["nvidia-smi", *query, "-i", self._nvidia_smi_id()]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            return parse_utilization(out.stdout)
        return None

    def __enter__(self) -> GpuUtil:
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-gpu-util")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                value = self.sample()
            except Exception:  # a failing sampler leaves the figure out, not the run
                value = None
            if value is not None:
                self.samples.append(value)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def parse_utilization(text: str) -> float | None:
    """The first number of `nvidia-smi --query-gpu=utilization.gpu` output, or None."""
    for line in text.splitlines():
        try:
            return float(line.strip())
        except ValueError:
            continue
    return None


def images_in_processes(n: int, workers: int) -> list[bytes]:
    """`n` distinct generated JPEGs, made in chunks on every core (a different seed each)."""
    chunk = 500
    sizes = [min(chunk, n - start) for start in range(0, n, chunk)]
    if len(sizes) == 1:
        return make_images(n, SIZE)
    # Spawned, not forked: this process may already hold a CUDA context.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = pool.map(make_images, sizes, [SIZE] * len(sizes), range(len(sizes)))
        return [img for part in parts for img in part]


def sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def forward_rate(step, batch: int, seconds: float, util: GpuUtil) -> float:
    """img/s of the model's image and text forward passes over random tensors on the device."""
    import torch

    device, towers = step.device, step._towers
    gen = torch.Generator(device=device).manual_seed(0)
    chunk = {}
    if "image" in towers:
        shape = (batch, *towers["image"].shape)
        chunk["image"] = {"pixels": torch.randn(shape, device=device, generator=gen)}
    if "text" in towers:
        model = towers["text"].encoder.model
        embedding = getattr(model, "token_embedding", None)
        vocab = getattr(embedding, "num_embeddings", None) or getattr(model, "vocab_size", 49408)
        shape = (batch, towers["text"].length)
        chunk["text"] = {"tokens": torch.randint(0, vocab, shape, device=device, generator=gen)}

    def once() -> None:  # the model alone: normalised pixels and token ids
        if "image" in chunk:
            towers["image"].encoder.encode_image(chunk["image"]["pixels"])
        if "text" in chunk:
            towers["text"].encode(chunk["text"])

    for _ in range(2):  # warm-up: kernel selection, allocator
        once()
    sync(device)
    t0 = time.perf_counter()
    once()
    sync(device)
    reps = max(2, min(500, int(seconds / max(time.perf_counter() - t0, 1e-6))))
    with util:
        t0 = time.perf_counter()
        for _ in range(reps):
            once()
        sync(device)
        elapsed = time.perf_counter() - t0
    return reps * batch / elapsed


def decode_rate(
    step, data: Path, batch: int, workers: int, rows: int | None = None, where: str = "threads"
) -> float:
    """img/s of the embed step's decoding alone: its workers (threads, or processes for the
    images) fill its buffers, no model. The first batch (processes starting) is not timed."""
    from mmtools.io.source import Source
    from mmtools.steps.embed.step import PREFETCH

    pool = step.start_workers(workers, where)
    window: deque = deque()
    done, t0 = 0, None
    try:
        for b in Source([str(data)]).batches(list(step.requires), batch_size=batch):
            if rows is not None and done >= rows:
                break
            window.append([f for fs in step._submit(pool, b)[1].values() for f in fs])
            if t0 is None:  # untimed: the first batch
                [f.result() for f in window.popleft()]
                t0 = time.perf_counter()
                continue
            done += b.num_rows
            if len(window) > PREFETCH:
                [f.result() for f in window.popleft()]
        while window:
            [f.result() for f in window.popleft()]
        return done / (time.perf_counter() - (t0 or time.perf_counter()))
    finally:
        pool.close()


def decode_all(step, data: Path, batch: int, rows: int) -> tuple[int, float] | None:
    """(threads, img/s) of decoding with a thread per CPU but one (the main thread's), when
    that is more threads than the step has: what a larger --workers would give."""
    threads, workers = max(1, (os.cpu_count() or 1) - 1), step.config.workers
    if threads <= workers:
        return None
    step.config.workers = threads
    try:
        return threads, decode_rate(step, data, batch, threads, rows=rows)
    finally:
        step.config.workers = workers


def measure(
    args, model: str, precision: str, data: Path, tmp: Path, decoded: dict, procs: dict
) -> dict:
    """The figures of one model and precision (see the module docstring); `decoded` and
    `procs` keep the decoding figures of each model (threads; processes)."""
    from mmtools import columns as C
    from mmtools.steps.embed import EmbedConfig, embed_steps

    config = EmbedConfig(
        model=model,
        pretrained="none",
        device=args.device,
        precision=precision,
        batch_size=args.batch_size,
    )
    if args.workers:
        config = replace(config, workers=args.workers)
    steps = embed_steps([C.ID, C.IMAGE, C.TEXT], ["image", "text"], config)
    step = steps[0]
    step.setup()
    workers = step.config.workers
    util = GpuUtil(step.device)
    end_to_end(steps, data_slice(data, tmp, args.batch_size * 2), tmp / "warm", args.batch_size)
    out = {"workers": workers, "util_method": util.how}
    out["forward"] = forward_rate(step, args.batch_size, args.forward_seconds, util)
    out["forward_util"] = util.mean()
    if model not in decoded:  # the same for every precision: measured once per model
        one = max(args.batch_size, args.images // 8)
        decoded[model] = (
            decode_rate(step, data, args.batch_size, workers),
            decode_rate(step, data, args.batch_size, 1, rows=one),
            decode_all(step, data, args.batch_size, max(args.batch_size, args.images // 2)),
        )
    out["decode"], out["decode_1"], out["decode_all"] = decoded[model]
    with util:
        out["embed"] = end_to_end(steps, data, tmp / "out", args.batch_size)
    out["embed_util"] = util.mean()
    if model not in procs:
        procs[model] = decode_rate(step, data, args.batch_size, workers, where="processes")
    out["decode_procs"] = procs[model]
    for s in steps:
        s.config.decode_in = "processes"
    with util:
        out["embed_procs"] = end_to_end(steps, data, tmp / "out", args.batch_size)
    out["embed_procs_util"] = util.mean()
    step.close()
    return out


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def row(label, precision, forward, embed, ratio, decode, how, util_fwd, util_embed) -> str:
    """One line of the table (a blank `forward` on the processes' line)."""
    return (
        f"{label:>10} {precision:>9} {forward:>13} {embed:>11.1f} {ratio:>5.2f} {decode:>12.1f} "
        f"{how:<14} {pct(util_fwd) if forward else '':>12} {pct(util_embed):>14}"
    )


def main() -> int:
    started = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer images (4,000 on GPU, 128 on CPU)")
    p.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda if present)")
    p.add_argument("--models", default=None, help="open_clip architectures, comma-separated")
    p.add_argument("--precisions", default=None)
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="decoding threads (embed's default)")
    p.add_argument("--forward-seconds", type=float, default=None, help="time of the bare pass")
    args = p.parse_args()
    import torch

    gpu = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    args.device = args.device or ("cuda" if gpu else "cpu")
    if gpu:
        defaults = ("ViT-B-32,ViT-L-14", "fp16,bf16", 4000 if args.quick else 20000, 256, 3.0)
    else:
        defaults = ("tiny", "fp32", 128 if args.quick else 300, 32, 1.0)
    args.models = args.models or defaults[0]
    args.precisions = args.precisions or defaults[1]
    args.images = args.images or defaults[2]
    args.batch_size = args.batch_size or defaults[3]
    args.forward_seconds = args.forward_seconds or defaults[4]
    targets = Targets()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as d:
        tmp = Path(d)
        names = []
        for model in args.models.split(","):
            if model == "tiny":
                (tmp / "bench-tiny.json").write_text(json.dumps(TINY))
                model = str(tmp / "bench-tiny.json")
            names.append(model)
        t0 = time.perf_counter()
        images = images_in_processes(args.images, os.cpu_count() or 1)
        write_data(tmp / "data.parquet", images)
        del images
        device = torch.device(args.device)
        where = torch.cuda.get_device_name(device) if gpu else "CPU"
        print(
            f"embed on {args.device} ({where}), {args.images} generated JPEGs "
            f"{SIZE[0]}x{SIZE[1]} (made in {time.perf_counter() - t0:.0f} s), batch "
            f"{args.batch_size}, {os.cpu_count()} cores, torch {torch.__version__}",
            flush=True,
        )
        head = (
            f"{'model':>10} {'precision':>9} {'forward img/s':>13} {'embed img/s':>11} "
            f"{'ratio':>5} {'decode img/s':>12} {'decode threads':>14} "
            f"{'GPU util fwd':>12} {'GPU util embed':>14}"
        )
        print(head, flush=True)
        decoded: dict = {}
        procs: dict = {}
        for model in names:
            label = "tiny" if model.endswith("bench-tiny.json") else model
            for precision in args.precisions.split(","):
                r = measure(args, model, precision, tmp / "data.parquet", tmp, decoded, procs)
                ratio = r["embed"] / r["forward"]
                scale = r["decode"] / r["decode_1"]
                fields = (label, precision, f"{r['forward']:.1f}", r["embed"], ratio)
                how = f"{r['workers']:>3} ({scale:.1f}x of 1)"
                print(row(*fields, r["decode"], how, r["forward_util"], r["embed_util"]))
                procs_ratio = r["embed_procs"] / r["forward"]
                fields = ("", "processes", "", r["embed_procs"], procs_ratio, r["decode_procs"])
                how = f"{r['workers']:>3} processes"
                print(row(*fields, how, None, r["embed_procs_util"]), flush=True)
                if not gpu:
                    continue
                if r["decode"] < r["forward"]:
                    more = r["decode_all"]
                    print(
                        f"  decoding is the bottleneck: {r['decode']:.0f} img/s with "
                        f"{r['workers']} threads < {r['forward']:.0f} img/s forward"
                        + (f" ({more[1]:.0f} img/s with {more[0]} threads)" if more else ""),
                        flush=True,
                    )
                best = max(ratio, procs_ratio)  # with the better --decode-in
                targets.at_least(f"embed / forward, {label} {precision}", best, RATIO)
        if gpu and r["util_method"] is None:
            print("GPU utilisation: no pynvml and no nvidia-smi, not sampled")
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")
    if gpu:
        targets.at_most("whole run", total, BUDGET_S, " s")
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
