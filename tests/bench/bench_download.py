"""Benchmark: `mmtools ingest` against img2dataset on the same loopback listing of URLs.

Run: python tests/bench/bench_download.py [--quick] [--n N] [--threads T] [--venv DIR]

A loopback server (its own process) serves N image URLs of several sizes and aspect ratios;
10% fail (half 404, half an HTML page instead of an image). img2dataset (installed from the
package registry into its own venv, created under /tmp on first run) and `mmtools ingest`
download the same listing with the same thread count and, where mmtools offers them, the
same `--image-size 256 --resize-mode keep_ratio`. Printed: successes (must be equal), image
sizes (equal per URL when both resize), wall time, throughput ratio and peak RSS (each
command's own). Exits 1 when a target misses, naming it: successes equal, image sizes equal
(when both resize), mmtools >= 1.0x img2dataset's throughput, mmtools' peak RSS <= 1.5x
img2dataset's.
"""

from __future__ import annotations

import argparse
import glob
import http.server
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from timing import Targets

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(320, 240), (640, 480), (200, 300), (512, 512), (1024, 768), (300, 900), (100, 80)]
TARGET_RATIO = 1.0
TARGET_RSS = 1.5  # mmtools' peak RSS over img2dataset's, at most


def make_images(k: int) -> list[bytes]:
    """`k` distinct JPEGs of the SIZES, cycled."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(k):
        w, h = SIZES[i % len(SIZES)]
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def serve(port_queue, k: int) -> None:
    """The loopback server: /img/I is image I % k, except I % 20 == 0 (404) and == 10 (HTML)."""
    images = make_images(k)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            i = int(self.path.rsplit("/", 1)[1])
            if i % 20 == 0:
                self.send_error(404)
                return
            html = i % 20 == 10
            body = b"<html><body>not an image</body></html>" if html else images[i % k]
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if html else "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server_class = type("S", (http.server.ThreadingHTTPServer,), {"request_queue_size": 1024})
    server = server_class(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port_queue.put(server.server_address[1])
    server.serve_forever()


def ensure_venv(venv: Path) -> Path:
    """img2dataset's own venv (created and installed from the package registry if missing)."""
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        print(f"creating {venv} and installing img2dataset ...", file=sys.stderr)
        subprocess.run(["python3", "-m", "venv", venv], check=True)
        subprocess.run([venv / "bin" / "pip", "install", "-q", "img2dataset"], check=True)
    return exe


# Starts the command and reports its exit code and peak RSS. Measured from a small process:
# Linux counts the peak RSS of the process that spawns a command into the command's own
# (exec keeps the parent's high-water mark), so a wait from this benchmark, which holds the
# datasets it reads, would report this process's peak instead of the command's.
LAUNCHER = """
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def measured(cmd: list, env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as report:
        launch = [sys.executable, "-S", "-c", LAUNCHER, report.name]
        t0 = time.perf_counter()
        subprocess.run(launch + [str(c) for c in cmd], env=env, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        code, maxrss = map(int, report.read().split())
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(map(str, cmd))}")
    return seconds, maxrss / 1024


def mmtools_options() -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mmtools", "ingest", "--help"],
        env={**env, "COLUMNS": "300"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def sizes_by(table: pa.Table, key: str) -> dict[str, tuple[int, int]]:
    """URL -> (width, height) of the images a tool kept."""
    w, h = table.column("width").to_pylist(), table.column("height").to_pylist()
    return dict(zip(table.column(key).to_pylist(), zip(w, h, strict=True), strict=True))


def run_img2dataset(exe: Path, listing: Path, out: Path, threads: int, resize: bool):
    cmd = [exe, "--url_list", listing, "--input_format", "parquet", "--url_col", "url"]
    cmd += ["--caption_col", "caption", "--output_format", "parquet", "--output_folder", out]
    cmd += ["--processes_count", 1, "--thread_count", threads, "--timeout", 10, "--retries", 0]
    cmd += ["--number_sample_per_shard", 10_000, "--distributor", "multiprocessing"]
    cmd += ["--image_size", 256, "--resize_mode", "keep_ratio" if resize else "no"]
    seconds, rss = measured(cmd, {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    stats = [json.loads(Path(p).read_text()) for p in glob.glob(f"{out}/*_stats.json")]
    shards = sorted(glob.glob(f"{out}/*.parquet"))
    columns = [
        c for c in ("url", "width", "height", "status") if c in pq.read_schema(shards[0]).names
    ]
    table = pa.concat_tables([pq.read_table(p, columns=columns) for p in shards])
    if "status" in table.column_names:
        table = table.filter(pc.equal(table.column("status"), "success"))
    sizes = sizes_by(table, "url")
    return seconds, rss, sum(s["successes"] for s in stats), sizes


def run_mmtools(listing: Path, out: Path, threads: int, resize: bool, options: str):
    cmd = [sys.executable, "-m", "mmtools", "ingest", listing, "-o", out, "-q"]
    cmd += ["--workers", threads, "--timeout", 10, "--shard-rows", 10_000]
    if resize:
        cmd += ["--image-size", 256, "--resize-mode", "keep_ratio"]
    if "--retries" in options:
        cmd += ["--retries", 0]
    seconds, rss = measured(cmd, {**os.environ, "PYTHONPATH": str(ROOT), "MMTOOLS_FSYNC": "0"})
    table = pq.read_table(out, columns=["source", "width", "height"])
    sizes = sizes_by(table, "source")
    return seconds, rss, table.num_rows, sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="500 URLs instead of 5,000")
    ap.add_argument("--n", type=int, default=None, help="number of URLs")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--venv", type=Path, default=Path("/tmp/mmtools-bench-img2dataset"))
    args = ap.parse_args()
    n = args.n or (500 if args.quick else 5000)
    exe = ensure_venv(args.venv)
    resize = "--image-size" in mmtools_options()
    ports: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(ports, 64), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{ports.get(timeout=60)}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            listing = tmp / "urls.parquet"
            urls = [f"{url}/img/{i}" for i in range(n)]
            pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(n)]}), listing)
            i2d = run_img2dataset(exe, listing, tmp / "i2d", args.threads, resize)
            mmt = run_mmtools(listing, tmp / "mmt", args.threads, resize, mmtools_options())
    finally:
        server.terminate()
    return report(n, args.threads, resize, i2d, mmt)


def report(n: int, threads: int, resize: bool, i2d, mmt) -> int:
    print(
        f"{n} URLs (10% failing), {threads} threads, resize {'256 keep_ratio' if resize else 'off'}"
    )
    for name, (sec, rss, ok, _) in (("img2dataset", i2d), ("mmtools", mmt)):
        print(
            f"  {name:<12} {ok:>6} successes  {sec:7.2f} s  {n / sec:8.1f} URLs/s  "
            f"{rss:7.0f} MiB peak RSS"
        )
    targets = Targets()
    ratio = i2d[0] / mmt[0]
    print(f"  throughput ratio mmtools / img2dataset: {ratio:.2f}x (target >= {TARGET_RATIO}x)")
    rss = mmt[1] / i2d[1]
    print(f"  peak RSS mmtools / img2dataset: {rss:.2f}x (target <= {TARGET_RSS}x)")
    print(f"  successes equal: {i2d[2] == mmt[2]}")
    if resize:
        differ = [u for u in i2d[3] if mmt[3].get(u) != i2d[3][u]]
        same_sizes = not differ and i2d[3].keys() == mmt[3].keys()
        print(f"  image sizes equal: {same_sizes} ({len(differ)} differ)")
        detail = f"{len(differ)} of {len(i2d[3])} differ, target equal per URL"
        targets.holds("image sizes", same_sizes, detail)
    else:
        print("  image sizes: not compared (this mmtools has no --image-size)")
    targets.at_least("throughput ratio mmtools / img2dataset", ratio, TARGET_RATIO, "x")
    targets.at_most("peak RSS mmtools / img2dataset", rss, TARGET_RSS, "x")
    detail = f"mmtools {mmt[2]}, img2dataset {i2d[2]}, target equal"
    targets.holds("successes", i2d[2] == mmt[2], detail)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
