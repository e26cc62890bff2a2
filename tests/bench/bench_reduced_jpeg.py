"""Benchmark: `embed --reduced-jpeg` against full-size decoding of large photographs.

Run: python tests/bench/bench_reduced_jpeg.py [--quick] [--images N] [--size 4000x2670]

Data: scikit-learn's two sample photographs (640x427) scaled up to --size with film-grain
noise (so that the extra pixels are not smooth), saved as quality-90 JPEGs: the size a
phone or camera writes.

1. Decode + preprocess on one thread, into a ViT-B-32 input (224x224, open_clip's
   transform), through embed's own image decoder: full size against --reduced-jpeg (the
   smallest JPEG scale that keeps twice the model's side). Printed: images/s of each, their
   ratio (target >= 2), and the PSNR of the reduced model inputs against the full ones
   (target >= 35 dB: a root-mean-square difference under 5 of 255 levels).
2. `mmtools embed --model mmtools-shapes` (the bundled small model) over the same images,
   both ways: the whole command's time.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from timing import Targets, run_mmtools

from mmtools import columns as C

SIDE = 224  # ViT-B-32's input


def photographs(n: int, size: tuple[int, int]) -> list[bytes]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        photo = load_sample_images().images[k % 2]
        big = np.asarray(Image.fromarray(photo).resize(size, Image.BICUBIC), np.int16)
        grain = rng.normal(0, 6, big.shape).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray((big + grain).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decoder(min_side: int):
    import open_clip

    from mmtools.media import DEFAULT_MAX_PIXELS
    from mmtools.steps.embed.clip import ImageDecoder
    from mmtools.steps.embed.step import split_preprocess

    preprocess = open_clip.image_transform(SIDE, is_train=False)
    resize, mean, std = split_preprocess(preprocess)
    shape = (3, SIDE, SIDE)
    return ImageDecoder(preprocess, resize, mean, std, shape, DEFAULT_MAX_PIXELS, True, min_side)


def decode_all(min_side: int, images: list[bytes]) -> tuple[float, np.ndarray]:
    """(seconds, model inputs as 8-bit pixels) of decoding every image on this thread."""
    dec = decoder(min_side)
    arrays = {"pixels": np.empty((len(images), SIDE, SIDE, 3), np.uint8)}
    t0 = time.perf_counter()
    reasons = dec.fill(arrays, 0, [{"bytes": b, "path": None} for b in images])
    seconds = time.perf_counter() - t0
    assert reasons == [None] * len(images), reasons
    return seconds, arrays["pixels"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="12 images")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--size", default="4000x2670")
    args = p.parse_args()
    n = args.images or (12 if args.quick else 48)
    size = tuple(int(v) for v in args.size.split("x"))
    targets = Targets()
    images = photographs(n, size)
    print(f"{n} JPEGs of {size[0]}x{size[1]}, {sum(map(len, images)) / n / 2**20:.1f} MiB each")
    decode_all(0, images[:2])  # warm up: imports, first allocations
    best = {0: float("inf"), 2 * SIDE: float("inf")}
    for _ in range(2):  # interleaved
        for min_side in best:
            seconds, pixels = decode_all(min_side, images)
            best[min_side] = min(best[min_side], seconds)
            if min_side:
                reduced = pixels
            else:
                full = pixels
    ratio = best[0] / best[2 * SIDE]
    quality = psnr(full, reduced)
    print(
        f"decode + preprocess to {SIDE}x{SIDE}, one thread: full {n / best[0]:.1f} images/s, "
        f"--reduced-jpeg {n / best[2 * SIDE]:.1f} ({ratio:.2f}x); PSNR of the model inputs "
        f"{quality:.1f} dB"
    )
    targets.at_least("--reduced-jpeg decode speed / full", ratio, 2.0, "x")
    targets.at_least("--reduced-jpeg model-input PSNR", quality, 35.0, " dB")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "photos.parquet"
        media = C.media_array(images, [None] * n)
        ids = pa.array([f"p{i:04d}" for i in range(n)])
        pq.write_table(pa.table({C.ID: ids, C.IMAGE: media, C.TEXT: ["a photo"] * n}), data)
        for flag in ([], ["--reduced-jpeg"]):
            out = Path(tmp) / f"out{len(flag)}"
            argv = ["embed", data, "--model", "mmtools-shapes", *flag, "-q", "-o", out]
            seconds, cpu, rss = run_mmtools(*argv)
            label = " ".join(flag) or "full decode"
            print(f"mmtools embed ({label}): {seconds:.1f} s, CPU {cpu:.1f} s, peak {rss} MiB")
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
