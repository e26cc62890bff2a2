"""Benchmark: ingest and streaming copy against plain pyarrow; memory flat as data grows.

Run: python tests/bench/bench_ingest.py [--quick]

1. Verified ingest of N small JPEGs (decoded, hashed) against the code of BASELINE_REV
   (`--baseline-rev`: the code before verification got quick), the previous verification
   in this code (`MMTOOLS_VERIFY=full`: every image decoded at full size in a time-limited
   helper thread) and `--no-verify`; runs interleaved, each in a fresh process, timing the
   ingest itself (the interpreter's start and imports, the same for every command, show in
   the whole command's figures below). Target: verified ingest at least 2x BASELINE_REV's
   rate (without git, 2x the previous verification's). The same for N/4 photo-sized JPEGs
   (384x256), where decoding at 1/8 scale pays most; reported, no target.
   Then whole `mmtools ingest` commands, the same variants, best of REPEATS interleaved,
   against a plain loop that reads the same files into a pyarrow table and writes one
   Parquet file.
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
from timing import Targets, timed

REPEATS = 5
BASELINE_REV = "70d37ce"  # the code whose verified ingest rate the 2x target is set against
INGEST = """
import os, sys, time
import pyarrow as pa
pa.array([0])  # pyarrow's one-off import of pandas: start-up, not ingest
import PIL.Image
from mmtools import engines as engine
from mmtools.io.dataset import DatasetSink
from mmtools.steps.ingest.listing import ListingOptions
from mmtools.steps.ingest.step import Ingest, IngestConfig, ListingSource
t0, c0 = time.perf_counter(), time.process_time()
source = ListingSource([sys.argv[1]], ListingOptions())
step = Ingest(IngestConfig(verify=sys.argv[3] == "verify"), source.kinds,
              workers=min(16, 4 * (os.cpu_count() or 1)))
engine.run("ingest", source, [step], DatasetSink(sys.argv[2], overwrite=True), quiet=True)
print(time.perf_counter() - t0, time.process_time() - c0)
"""

# The peak RSS is VmHWM, this process's own: getrusage's ru_maxrss would carry in the peak of
# the benchmark that started it (Linux keeps the high-water mark across fork and exec).
COPY = """
import re, sys, time
from mmtools import engines as engine
from mmtools.io.source import Source
from mmtools.io.dataset import DatasetSink
t0 = time.perf_counter()
engine.run("copy", Source([sys.argv[1]]), [], DatasetSink(sys.argv[2], overwrite=True),
           quiet=True)
peak = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1]
print(time.perf_counter() - t0, peak)
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


def mmtools(*args: str, env: dict | None = None, code: Path | None = None) -> None:
    """Run the command (`code`: with the `mmtools` package of that directory)."""
    if code is not None:
        env = {**(env or os.environ), "PYTHONPATH": str(code)}
    subprocess.run([sys.executable, "-m", "mmtools", *args], check=True, env=env, cwd=code)


def whole_command(folder: Path, tmp: Path, n: int, baseline: Path | None, rev: str) -> None:
    """`mmtools ingest` as a user runs it (start-up and imports included) in each variant,
    interleaved, best of REPEATS; and the plain loop."""
    out = ["-o", str(tmp / "ds"), "-q", "--overwrite"]
    full = {**os.environ, "MMTOOLS_VERIFY": "full"}
    variants = {
        "verified": lambda: mmtools("ingest", str(folder), *out),
        "previous verification": lambda: mmtools("ingest", str(folder), *out, env=full),
        "--no-verify": lambda: mmtools("ingest", str(folder), *out, "--no-verify"),
        "plain read+write": lambda: plain_ingest(folder, tmp / "plain.parquet"),
    }
    if baseline is not None:
        variants[rev] = lambda: mmtools("ingest", str(folder), *out, code=baseline)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(REPEATS):
        for v, run in variants.items():
            times[v].append(timed(run))
    best = {v: min(ts) for v, ts in times.items()}
    ours = best["verified"]
    print(
        f"ingest {n} images, whole command: "
        + ", ".join(f"{v} {n / t:,.0f} img/s" for v, t in best.items())
        + "; verified's rate vs each: "
        + ", ".join(f"{t / ours:.2f}x {v}" for v, t in best.items() if v != "verified")
    )


def ingest(folder: Path, out: Path, verify: str, code: Path | None = None) -> tuple[float, float]:
    """Seconds and CPU seconds of one ingest of `folder`, its modules already imported;
    `verify`: 'quick' (the default), 'full' (the previous verification) or 'none'; `code`:
    a directory holding another version of the `mmtools` package to run instead."""
    env = {**os.environ, "MMTOOLS_VERIFY": verify if verify != "none" else "quick"}
    if code is not None:  # first on the path: `-c` puts the working directory before it
        env["PYTHONPATH"] = str(code)
    args = [str(folder), str(out), "verify" if verify != "none" else "no-verify"]
    proc = subprocess.run(
        [sys.executable, "-c", INGEST, *args],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=code,
    )
    seconds, cpu = proc.stdout.split()
    return float(seconds), float(cpu)


def checkout(rev: str, into: Path) -> Path | None:
    """The `mmtools` package as of git revision `rev`, extracted under `into`; None (and why)
    when git or the revision is not at hand."""
    repo = Path(__file__).resolve().parents[2]
    into.mkdir(parents=True, exist_ok=True)
    try:
        tar = subprocess.run(
            ["git", "-C", str(repo), "archive", rev, "mmtools"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"baseline {rev}: not available ({e}); comparing with MMTOOLS_VERIFY=full only")
        return None
    return into


def compare_verification(
    folder: Path, tmp: Path, n: int, baseline: Path | None, rev: str, targets: Targets | None
) -> None:
    """Interleaved runs of each variant, the best of REPEATS rounds of each compared (others'
    load on the machine only ever adds time); with `targets`, the ratio checked."""
    variants = {"quick": None, "full": None, "none": None}
    if baseline is not None:
        variants["before"] = baseline
    runs: dict[str, list] = {v: [] for v in variants}
    for _ in range(REPEATS):
        for v, code in variants.items():
            runs[v].append(ingest(folder, tmp / f"ds-{v}", "quick" if v == "before" else v, code))
    best = {v: min(runs[v]) for v in variants}  # (seconds, CPU seconds) of the fastest run
    least_cpu = {v: min(c for _, c in runs[v]) for v in variants}
    rate = {v: n / best[v][0] for v in variants}
    ratio = {v: best[v][0] / best["quick"][0] for v in variants}
    cpu = {v: least_cpu[v] / least_cpu["quick"] for v in variants}
    before = (
        f"{rev} {rate['before']:,.0f} img/s ({ratio['before']:.2f}x, CPU {cpu['before']:.2f}x), "
        if baseline is not None
        else ""
    )
    print(
        f"ingest {folder.name}, the ingest itself: verified {rate['quick']:,.0f} img/s; "
        f"{before}previous verification {rate['full']:,.0f} img/s ({ratio['full']:.2f}x, "
        f"CPU {cpu['full']:.2f}x), --no-verify {rate['none']:,.0f} img/s"
    )
    if targets is not None:
        against = "before" if baseline is not None else "full"
        name = rev if baseline is not None else "the previous verification"
        targets.at_least(f"verified ingest of {folder.name} vs {name}", ratio[against], 2.0, "x")


def make_photos(folder: Path, n: int) -> None:
    """`n` 384x256 JPEGs with smooth content and grain, as resized web photos are."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    y, x = np.mgrid[0:256, 0:384]
    for i in range(n):
        base = np.stack([(x + 3 * i) % 256, (y + 5 * i) % 256, (x + y + i) % 256], -1)
        arr = np.clip(base + rng.integers(0, 24, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=85)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        (folder / f"{i:06d}.txt").write_text(f"photo {i}")


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
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision to compare with")
    args = ap.parse_args()
    n = 2_000 if args.quick else 20_000
    os.environ.setdefault("MMTOOLS_FSYNC", "1")
    targets = Targets()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "imgs", n)
        make_photos(tmp / "photos", n // 4)
        baseline = checkout(args.baseline_rev, tmp / "baseline")
        compare_verification(tmp / "imgs", tmp, n, baseline, args.baseline_rev, targets)
        compare_verification(tmp / "photos", tmp, n // 4, baseline, args.baseline_rev, None)
        whole_command(tmp / "imgs", tmp, n, baseline, args.baseline_rev)

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
    sys.exit(targets.exit_code())


if __name__ == "__main__":
    main()
