"""Shared fixtures: real files, real subprocesses, generated media."""

from __future__ import annotations

import http.server
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

# Tests never use a GPU or the network unless they ask for it.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Commits stay atomic against killed processes without fsync; fsync only guards power loss and
# costs a lot on CI disks. test_dataset_io runs one resume test with fsync on.
os.environ.setdefault("MMTOOLS_FSYNC", "0")

MMTOOLS = [sys.executable, "-m", "mmtools"]


def mmtools(
    *args,
    input: bytes | None = None,
    check: bool = True,
    env: dict | None = None,
    cwd=None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run the real `mmtools` command in a subprocess and return the completed process."""
    proc = subprocess.run(
        [*MMTOOLS, *map(str, args)],
        input=input,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mmtools {' '.join(map(str, args))} exited {proc.returncode}:\n"
            f"{proc.stderr.decode(errors='replace')}"
        )
    return proc


def image_bytes(seed: int, size=(48, 32), fmt: str = "JPEG", **save) -> bytes:
    """A random RGB image encoded as `fmt`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **save)
    return buf.getvalue()


def wav_bytes(
    seconds: float = 0.5,
    sr: int = 16000,
    channels: int = 1,
    freq: float = 440.0,
    subtype: str = "PCM_16",
    fmt: str = "WAV",
) -> bytes:
    """A sine tone encoded with soundfile."""
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    wav = np.stack([wav] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def make_image_folder(root: Path, n: int, start: int = 0) -> Path:
    """`n` JPEGs with .txt sidecar captions under `root` (some in a subfolder)."""
    for i in range(start, start + n):
        d = root / ("sub" if i % 3 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:05d}.jpg").write_bytes(image_bytes(i))
        (d / f"img{i:05d}.txt").write_text(f"a photo number {i}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A folder of 30 captioned JPEGs."""
    return make_image_folder(tmp_path / "imgs", 30)


@pytest.fixture
def dataset(tmp_path, image_folder) -> Path:
    """An ingested dataset of 30 rows in 3 shards."""
    out = tmp_path / "ds"
    mmtools("ingest", image_folder, "-o", out, "--shard-rows", 10, "-q")
    return out


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    delay = 0.0

    def do_GET(self):
        time.sleep(self.delay)
        if self.path.startswith("/img/"):
            body = image_bytes(int(self.path.rsplit("/", 1)[1]))
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


def serve_images(delay: float = 0.0):
    """Start a loopback HTTP server answering /img/N with image N; return (url, server)."""
    handler = type("Handler", (_ImageHandler,), {"delay": delay})
    server_class = type("Server", (http.server.ThreadingHTTPServer,), {"request_queue_size": 256})
    server = server_class(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


@pytest.fixture
def http_server():
    """A loopback image server."""
    url, server = serve_images()
    yield url
    server.shutdown()


@pytest.fixture
def slow_listing(tmp_path):
    """A listing of 400 image URLs on a loopback server that answers in 50 ms each."""
    url, server = serve_images(delay=0.05)
    listing = tmp_path / "slow.csv"
    listing.write_text("url,caption\n" + "".join(f"{url}/img/{i},c{i}\n" for i in range(400)))
    yield listing
    server.shutdown()
