"""Benchmark `mixup --mode image-text`: mixed rows/s for 256×256 images.

Measured in one run, on the same images and threads:
- baseline: decode and re-encode each image alone (what any image rewrite costs);
- kernel: `mix_images` on the pairs alone (two decodes, resize, blend, one encode);
- mixup: the whole step through the engine (scan, plan, partner gather and check, mixing,
  Parquet output), as `mmtools mixup` runs it.

Run: python tests/bench/bench_mixup.py [--quick] [--rows N] [--workers N]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from timing import timed

from mmtools import columns as C
from mmtools import engines as engine
from mmtools.io.dataset import DatasetSink
from mmtools.io.source import Source
from mmtools.media import decode_image
from mmtools.steps.mixup import Mixup, MixupConfig
from mmtools.steps.mixup.mix import encode_image, mix_images

SIZE = 256


def photo_like(seed: int) -> bytes:
    """A 256×256 JPEG with smooth structure and fine texture, about the size of a photo's."""
    rng = np.random.default_rng(seed)
    img = np.full((SIZE, SIZE, 3), 128.0, np.float32)
    for cells, weight in ((4, 60.0), (16, 30.0), (64, 15.0), (SIZE, 6.0)):
        for ch in range(3):
            noise = Image.fromarray(rng.normal(size=(cells, cells)).astype(np.float32))
            img[..., ch] += weight * np.asarray(noise.resize((SIZE, SIZE), Image.BICUBIC))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_input(path: str, n: int) -> list[bytes]:
    images = [photo_like(i) for i in range(n)]
    table = pa.table(
        {
            C.ID: [f"img{i:06d}" for i in range(n)],
            C.IMAGE: C.media_array(images, [f"img{i:06d}.jpg" for i in range(n)]),
            C.TEXT: [f"a photo number {i}" for i in range(n)],
        }
    )
    pq.write_table(table, path)
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 images instead of 512")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    n = args.rows or (64 if args.quick else 512)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "in.parquet")
        images = write_input(path, n)
        pool = ThreadPoolExecutor(args.workers)

        def baseline():
            list(pool.map(lambda b: encode_image(np.asarray(decode_image(b)), "jpeg", 95), images))

        pairs = np.random.default_rng(0).permutation(n)

        def kernel():
            list(
                pool.map(
                    lambda i: mix_images(images[i], images[pairs[i]], 0.5, "jpeg", 95), range(n)
                )
            )

        def step():
            source = Source([path])
            mixup = Mixup(MixupConfig(seed=0), workers=args.workers)
            sink = DatasetSink(os.path.join(tmp, "out"), overwrite=True)
            summary, _ = engine.run("mixup", source, [mixup], sink, batch_size=256, quiet=True)
            assert summary.generated == n

        baseline()  # warm up caches and the thread pool
        t_base, t_kernel, t_step = timed(baseline), timed(kernel), timed(step)
    print(f"mixup image-text, {n} images {SIZE}x{SIZE} JPEG, {args.workers} threads")
    print(f"  baseline decode+encode : {n / t_base:8.1f} images/s")
    print(
        f"  mix kernel             : {n / t_kernel:8.1f} mixed rows/s  "
        f"(ratio to baseline {t_base / t_kernel:.2f})"
    )
    print(
        f"  mmtools mixup (engine) : {n / t_step:8.1f} mixed rows/s  "
        f"(ratio to baseline {t_base / t_step:.2f})"
    )


if __name__ == "__main__":
    main()
