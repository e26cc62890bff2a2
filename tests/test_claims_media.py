"""Media read from where a cell points (object stores, URLs under a deadline), the ingest
progress bar, LAION's watermark detector as a head file, and the demo's calibration pairs."""

from __future__ import annotations

import http.server
import json
import re
import socket
import subprocess
import threading
import time
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    MMTOOLS,
    answer_image,
    image_bytes,
    mmtools,
    read_dataset,
    read_rejects,
    serve_images,
)
from test_heads import L14, embeddings_file
from test_object_store import gcs, s3  # noqa: F401

from mmtools import columns as C
from mmtools.io.dataset import read_dropped


def path_only_table(ids: list[str], paths: list[str]) -> pa.Table:
    """Rows whose image cells hold only a path."""
    media = C.media_array([None] * len(ids), paths)
    return pa.table({C.ID: ids, C.IMAGE: media, C.TEXT: [f"caption {i}" for i in ids]})


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_image_cells_naming_object_store_keys_are_read_from_the_store(request, scheme, tmp_path):
    """a and b are the same image under two keys; d names a key the bucket does not hold."""
    env, admin = request.getfixturevalue({"s3": "s3", "gs": "gcs"}[scheme])
    prefix = f"data/media-{scheme}"
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        with admin.open_output_stream(f"{prefix}/{name}.jpg") as f:
            f.write(image_bytes(seed, (64, 64)))
    uris = {i: f"{scheme}://{prefix}/{i}.jpg" for i in "abcd"}
    pq.write_table(path_only_table(list(uris), list(uris.values())), tmp_path / "in.parquet")

    mmtools("dedup", tmp_path / "in.parquet", "-m", "phash", "-o", tmp_path / "out", "-q", env=env)
    kept = read_dataset(tmp_path / "out")
    assert {r[C.ID]: r[C.IMAGE] for r in kept.to_pylist()} == {
        "a": {"bytes": None, "path": uris["a"]},
        "c": {"bytes": None, "path": uris["c"]},
    }
    dropped = read_dropped(str(tmp_path / "out")).to_pylist()
    assert [(r[C.ID], r[C.DROP_RULE], r[C.DROP_KEPT_ID]) for r in dropped] == [("b", "phash", "a")]
    rejects = read_rejects(tmp_path / "out").to_pylist()
    assert [(r[C.ID], r[C.REJECT_REASON]) for r in rejects] == [("d", "missing_file")]
    assert rejects[0][C.REJECT_DETAIL].startswith(f"{uris['d']}: ")


@pytest.fixture
def silent_url():
    """A URL on a loopback port whose connections are taken but never answered."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/a.jpg"
    sock.close()


def test_a_url_cell_is_given_up_after_MMTOOLS_FETCH_TIMEOUT_seconds(silent_url, tmp_path):
    table = pa.table(
        {
            C.ID: ["kept", "silent"],
            C.IMAGE: C.media_array([image_bytes(1), None], [None, silent_url]),
            C.TEXT: ["one", "two"],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    env = {"MMTOOLS_FETCH_TIMEOUT": "1"}
    args = ["dedup", tmp_path / "in.parquet", "-m", "phash", "-o", tmp_path / "out", "-q"]
    mmtools(*args, env=env, timeout=120)
    assert read_dataset(tmp_path / "out")[C.ID].to_pylist() == ["kept"]
    rejects = read_rejects(tmp_path / "out").to_pylist()
    assert [(r[C.ID], r[C.REJECT_REASON], r[C.REJECT_DETAIL]) for r in rejects] == [
        ("silent", "timeout", f"{silent_url}: timed out after 1 s")
    ]


def test_a_url_cell_is_fetched_with_ingest_defaults_and_30_s_when_the_variable_is_unset(
    monkeypatch,
):
    from mmtools.io import http
    from mmtools.media import read
    from mmtools.steps.ingest.step import IngestConfig

    monkeypatch.delenv("MMTOOLS_FETCH_TIMEOUT", raising=False)
    seen = []
    real = http.download

    def recording(url, options=None):
        seen.append(options)
        return real(url, options)

    monkeypatch.setattr(http, "download", recording)
    url, server = serve_images()
    try:
        assert read((None, f"{url}/img/4"), "image") == image_bytes(4)
    finally:
        server.shutdown()
    assert seen == [replace(IngestConfig().download(), timeout=30.0)]


class _GatedImages(http.server.BaseHTTPRequestHandler):
    """Answers /img/K with image K once the test sets the event for K."""

    gates: tuple[threading.Event, ...] = ()

    def do_GET(self):
        k = int(self.path.rsplit("/", 1)[1])
        self.gates[k].wait(60)
        answer_image(self, k)

    def log_message(self, *args):
        pass


@pytest.fixture
def gated_server():
    """A loopback image server that answers each of 4 URLs only when told to; (url, gates)."""
    gates = [threading.Event() for _ in range(4)]
    handler = type("Handler", (_GatedImages,), {"gates": tuple(gates)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", gates
    for gate in gates:
        gate.set()
    server.shutdown()


def test_the_ingest_progress_bar_moves_as_each_file_finishes(gated_server, tmp_path):
    """All four downloads run at once; they finish one by one, as the server is let answer.

    The bar redraws at most every 0.5 s (tqdm's mininterval), so each answer waits that long
    after the last redraw: the bar must then show the new count before the next one comes.
    """
    url, gates = gated_server
    listing = tmp_path / "urls.csv"
    listing.write_text("url,caption\n" + "".join(f"{url}/img/{k},c{k}\n" for k in range(4)))
    args = ["ingest", listing, "-o", tmp_path / "ds", "--workers", "4", "--timeout", "60"]
    proc = subprocess.Popen([*MMTOOLS, *map(str, args)], stderr=subprocess.PIPE)
    err = bytearray()

    def pump():
        while chunk := proc.stderr.read1(4096):
            err.extend(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def shown() -> list[int]:
        return [int(n) for n in re.findall(rb"\| (\d+)/4 \[", bytes(err))]

    def wait_for_count(n: int) -> None:
        deadline = time.monotonic() + 20
        while not shown() or shown()[-1] != n:
            assert time.monotonic() < deadline, f"no {n}/4 on stderr: {bytes(err)!r}"
            time.sleep(0.01)

    try:
        wait_for_count(0)
        for k in range(4):
            time.sleep(0.6)
            gates[k].set()
            wait_for_count(k + 1)
        assert proc.wait(timeout=60) == 0
    finally:
        for gate in gates:
            gate.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert shown() == [0, 1, 2, 3, 4, 4]
    assert read_dataset(tmp_path / "ds").num_rows == 4


def laion_watermark_state_dict():
    """The layout of LAION-5B-WatermarkDetection's watermark_model_v1.pt (random weights):
    timm's efficientnet_b3a with its classifier replaced by a 1536-625-256-2 MLP."""
    timm = pytest.importorskip("timm")
    from torch import nn

    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(1536, 625),
        nn.ReLU(),
        nn.Dropout(p=0.3),
        nn.Linear(625, 256),
        nn.ReLU(),
        nn.Linear(256, 2),
    )
    return model.state_dict()


def test_laions_watermark_detector_does_not_load_as_a_head(tmp_path):
    import torch

    weights = tmp_path / "watermark_model_v1.pt"
    torch.save(laion_watermark_state_dict(), weights)
    embeddings_file(tmp_path / "l14.parquet", 768, 8, L14)
    head = f"pwatermark={weights}"
    proc = mmtools(
        "score", tmp_path / "l14.parquet", "--head", head, "-o", tmp_path / "out", check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.decode().splitlines() == [
        f"mmtools score: error: {weights} is an image model (it has convolution weights, as "
        "LAION's EfficientNet watermark detector does): it reads pixels, not embeddings; train a "
        "head on your embeddings instead (mmtools train-head)"
    ]
    assert not (tmp_path / "out").exists()


def test_the_demo_calibrates_its_clip_score_cut_on_pairs_outside_its_sample(monkeypatch, tmp_path):
    """The cut is read off generated pairs that share no seed, scene or image with the sample
    the report measures, nor a seed with the model's training."""
    shapes = pytest.importorskip("mmtools.models.shapes")
    if not shapes.weights_path().exists():
        pytest.skip("mmtools-shapes weights not built")
    from mmtools.demo import chain, synth

    drawn: list[tuple[int, list]] = []
    real = synth.generate

    def recording(n, seed, *args, **kwargs):
        samples = list(real(n, seed, *args, **kwargs))
        drawn.append((seed, samples))
        yield from samples

    monkeypatch.setattr(synth, "generate", recording)
    cfg = chain.DemoConfig(rows=40)
    chain.calibrate_threshold(cfg.mismatch, n=40)
    chain.make_sample(tmp_path / "images", cfg)
    [(cal_seed, calibration), (sample_seed, sample)] = drawn

    assert sample_seed == 2_000_000 and cal_seed not in shapes.training_record()["seeds"]
    assert cal_seed != sample_seed
    assert {s.image.tobytes() for s in calibration}.isdisjoint(s.image.tobytes() for s in sample)
    scenes = [
        {json.dumps(s.attrs, sort_keys=True) for s in group} for group in (calibration, sample)
    ]
    assert scenes[0].isdisjoint(scenes[1])


def test_a_demo_seed_that_would_draw_the_calibration_pairs_is_refused():
    from mmtools.demo.chain import CALIBRATION_SEED, SAMPLE_SEED_OFFSET, sample_seed
    from mmtools.errors import MmtoolsError

    with pytest.raises(MmtoolsError) as e:
        sample_seed(CALIBRATION_SEED - SAMPLE_SEED_OFFSET)
    assert str(e.value) == f"seed {CALIBRATION_SEED} was used to train or calibrate mmtools-shapes"
