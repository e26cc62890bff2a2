"""Shared fixtures and helpers: real files, real subprocesses, generated media, output readers."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmtools import columns as C

# Tests never use a GPU or the network unless they ask for it.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Commits stay atomic against killed processes without fsync; fsync only guards power loss and
# costs a lot on CI disks. test_durability turns it back on: it traces the order of syncs and
# renames, and kills and resumes a run with fsync on.
os.environ.setdefault("MMTOOLS_FSYNC", "0")
# Under `just mutate` the suite runs in mutmut's mutated copy of the tree: the commands the
# tests start must import that copy too (the mutant to run is named in the environment).
if "MUTANT_UNDER_TEST" in os.environ:
    _copy = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_copy, os.environ.get("PYTHONPATH")]))

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


def hiding(*modules: str, root: Path) -> dict:
    """An environment where `modules` cannot be imported, as when their extra is not installed."""
    paths = []
    for module in modules:
        site = root / f"without-{module}"
        (site / module).mkdir(parents=True)
        refusal = f"raise ImportError('no module named {module}')\n"
        (site / module / "__init__.py").write_text(refusal)
        paths.append(str(site))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [*paths, os.environ.get("PYTHONPATH")]))}


def encode(img, fmt: str = "JPEG", **save) -> bytes:
    """Encoded bytes of a PIL image."""
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def image_bytes(seed: int, size=(48, 32), fmt: str = "JPEG", **save) -> bytes:
    """A random RGB image encoded as `fmt`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(arr), fmt, **save)


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


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_clip(
    directory: Path, name: str = "tiny-clip", layers: int = 2, config: dict = TINY_CLIP
) -> Path:
    """An open_clip model config (random init with --pretrained none), small enough for tests."""
    cfg = json.loads(json.dumps(config))
    cfg["vision_cfg"]["layers"] = layers
    path = directory / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def write_shards(
    directory: Path, table: pa.Table, shards: int = 1, row_group: int | None = None
) -> Path:
    """`table` split evenly into `shards` Parquet files part-NNNNN.parquet (no manifest)."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
    for k in range(shards):
        part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
        pq.write_table(part, directory / f"part-{k:05d}.parquet", row_group_size=row_group)
    return directory


# -- reading outputs --------------------------------------------------------------------------


def read_dataset(path) -> pa.Table:
    """All data rows of a dataset directory, Parquet file or glob, in shard order.

    Read with the reader the commands use, so a test sees what the next command would see.
    """
    from mmtools.io.source import Source

    src = Source([str(path)])
    return pa.Table.from_batches(list(src.batches()), src.schema)


def read_rejects(path) -> pa.Table | None:
    """The reject rows of a dataset directory, or None when it has none."""
    from mmtools.io.dataset import read_rejects as read

    return read(str(path))


def reject_reasons(path) -> dict[str, str]:
    """id -> reason of the reject rows of a dataset directory."""
    rejects = read_rejects(path)
    return {} if rejects is None else by_id(rejects, C.REJECT_REASON)


def by_id(table: pa.Table, column: str | None = None) -> dict:
    """id -> row (a dict), or id -> the value of `column`."""
    ids = table.column(C.ID).to_pylist()
    values = table.to_pylist() if column is None else table.column(column).to_pylist()
    return dict(zip(ids, values, strict=True))


def manifest_summary(path) -> dict:
    """The run summary recorded in a dataset's manifest."""
    return json.loads((Path(path) / "_manifest.json").read_text())["summary"]


def wait_for(path: Path, run, timeout: float = 60.0) -> None:
    """Wait for `path` to appear while `run` goes on: a Popen, or a callable saying it is alive."""
    alive = run if callable(run) else lambda: run.poll() is None
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not alive():
            err = getattr(run, "stderr", None)  # a Popen's piped stderr says why it ended
            detail = err.read().decode(errors="replace") if err else ""
            raise AssertionError(f"the run ended before {path.name} appeared\n{detail}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def ingest_folder(folder: Path, shard_rows: int = 10) -> Path:
    """`folder` ingested into a dataset next to it, named ds."""
    out = folder.parent / "ds"
    mmtools("ingest", folder, "-o", out, "--shard-rows", shard_rows, "-q")
    return out


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A folder of 30 captioned JPEGs."""
    return make_image_folder(tmp_path / "imgs", 30)


@pytest.fixture
def dataset(image_folder) -> Path:
    """An ingested dataset of 30 rows in 3 shards."""
    return ingest_folder(image_folder)


def answer_image(handler: http.server.BaseHTTPRequestHandler, n: int) -> None:
    """Answer a GET with the JPEG `image_bytes(n)`."""
    body = image_bytes(n)
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    delay = 0.0

    def do_GET(self):
        time.sleep(self.delay)
        if self.path.startswith("/img/"):
            answer_image(self, int(self.path.rsplit("/", 1)[1]))
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


# `python -c KILL_AFTER_FIRST_COMMIT ARGS...` runs `mmtools ARGS...` and SIGKILLs it as soon
# as its first progress record is renamed into place: a run killed after its first commit.
KILL_AFTER_FIRST_COMMIT = """
import os, signal, sys
real = os.replace
def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if "/_progress/" in os.fspath(dst):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = ["mmtools", *sys.argv[1:]]
from mmtools.cli import main
main()
"""


def photographs() -> dict[str, bytes]:
    """Real photographs, as their JPEG files: matplotlib's grace_hopper.jpg (512x600) and
    scikit-learn's china.jpg and flower.jpg (640x427)."""
    import sklearn.datasets
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        found = {"grace_hopper.jpg": f.read()}
    images = Path(sklearn.datasets.__file__).parent / "images"
    return found | {name: (images / name).read_bytes() for name in ("china.jpg", "flower.jpg")}


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each SOS segment of a JPEG, its entropy-coded data included."""
    out, i = [], 2
    while data[i + 1] != 0xD9:
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if data[i + 1] == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0, *range(0xD0, 0xD8))):
                end += 1
            out.append((i, end))
        i = end
    return out


def proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, name) of a live process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :]
    fields = rest.split()  # from field 3 on: state, parent pid, ..., start time (field 22)
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]), name)


def processes() -> dict[int, tuple[int, int, str]]:
    """Every live process: pid -> (parent pid, start time, name)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))):
            found[int(entry)] = stat
    return found


def naming(text: str, where: tuple[str, ...] = ("cmdline",)) -> set[int]:
    """The live processes whose command line (or other /proc files `where`) holds `text`."""
    found = set()
    for pid in processes():
        for name in where:
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{pid}/{name}").read_bytes():
                    found.add(pid)
    return found
