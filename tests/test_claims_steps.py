"""Options of `rewrite`, `mixup` and `score --head`, and the LAION-subsets recipe's defaults."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from conftest import by_id, image_bytes, mmtools, read_dataset, read_rejects, wav_bytes
from llm_server import LLMServer
from PIL import Image
from test_heads import L14, AestheticMLP, KerasNSFW, embeddings_file
from test_recipes_filter import run_recipe
from test_rewrite_openai import run_main
from torch import nn

from mmtools import columns as C
from mmtools.models import heads as H

# -- rewrite ---------------------------------------------------------------------------------


def rewrite(url: str, *args, check: bool = True):
    """Run `mmtools rewrite ARGS...` against the OpenAI-compatible server at `url`."""
    return mmtools("rewrite", *args, "--base-url", url, "--model", "tiny", "-q", check=check)


def test_fuse_sends_the_alt_text_and_the_named_description_column(tmp_path):
    from mmtools.steps.rewrite.prompts import PROMPT_DIR

    rows = {
        C.ID: ["car", "dog", "bare"],
        C.TEXT: ["a red car", "dog", "a cat"],
        "vlm_caption": ["A small red car on a wet street.", "A brown dog runs on grass.", ""],
        C.TEXT_SYNTHETIC: ["not the description"] * 3,
    }
    pq.write_table(pa.table(rows), tmp_path / "in.parquet")
    out = tmp_path / "out"
    with LLMServer() as server:
        rewrite(
            server.url,
            *(tmp_path / "in.parquet", "-o", out),
            *("--mode", "fuse", "--description-column", "vlm_caption"),
        )
    template = (PROMPT_DIR / "fuse.txt").read_text().strip()
    assert sorted(server.prompts) == [
        template.replace("{text}", "a red car").replace(
            "{description}", "A small red car on a wet street."
        ),
        template.replace("{text}", "dog").replace("{description}", "A brown dog runs on grass."),
    ]
    t = read_dataset(out)
    assert by_id(t, C.TEXT_SYNTHETIC) == {
        "car": "A small red car on a wet street. (rewritten)",
        "dog": "A brown dog runs on grass. (rewritten)",
    }
    assert set(t[C.CAPTION_SOURCE].to_pylist()) == {"fuse:openai:tiny"}
    assert by_id(t, "vlm_caption") == {
        "car": "A small red car on a wet street.",
        "dog": "A brown dog runs on grass.",
    }
    rejects = read_rejects(out)
    assert by_id(rejects, C.REJECT_REASON) == {"bare": "missing_description"}
    assert by_id(rejects, C.REJECT_DETAIL) == {"bare": "vlm_caption is empty"}


@pytest.fixture
def unanswered_port():
    """A loopback port whose listen queue is full: a connection to it never completes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for s in [*fillers, listener]:
        s.close()


def test_connect_timeout_gives_up_on_a_server_that_never_accepts(tmp_path, unanswered_port):
    """The connection stays pending: --connect-timeout ends it, long before --timeout would."""
    pq.write_table(pa.table({C.ID: ["a"], C.TEXT: ["a photo"]}), tmp_path / "in.parquet")
    url = f"http://127.0.0.1:{unanswered_port}/v1"
    t0 = time.monotonic()
    proc = rewrite(
        url,
        *(tmp_path / "in.parquet", "-o", tmp_path / "out"),
        *("--connect-timeout", 0.5, "--timeout", 30, "--retries", 0),
        check=False,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 75, proc.stderr.decode()
    assert elapsed < 15
    assert proc.stderr.decode().strip() == (
        f"mmtools rewrite: error: the backend at {url} is unreachable (1 of 1 requests in this "
        "batch failed: ConnectTimeout: timed out); nothing was committed for this batch and "
        "finished rows are cached: rerun to resume"
    )
    assert not (tmp_path / "out" / "_manifest.json").exists()


def test_max_chars_cuts_captions_at_a_sentence_else_a_word(tmp_path):
    texts = {
        "sentence": "A dog runs on the beach. It chases a red ball near the water",
        "words": "one two three four five six seven eight nine ten eleven twelve",
        "short": "a cat",
    }
    pq.write_table(
        pa.table({C.ID: list(texts), C.TEXT: list(texts.values())}), tmp_path / "in.parquet"
    )
    (tmp_path / "echo.txt").write_text("{text}\n")
    out = tmp_path / "out"
    with LLMServer() as server:
        rewrite(
            server.url,
            *(tmp_path / "in.parquet", "-o", out, "--prompt", tmp_path / "echo.txt"),
            *("--max-chars", 37),
        )
    assert by_id(read_dataset(out), C.TEXT_SYNTHETIC) == {
        "sentence": "A dog runs on the beach.",
        "words": "one two three four five six seven",
        "short": "a cat (rewritten)",
    }


# -- mixup -----------------------------------------------------------------------------------


def mixup(src, out, *args):
    """Run `mmtools mixup SRC -o OUT ARGS...` with a fixed λ."""
    return mmtools("mixup", src, "-o", out, "--lam", 0.5, *args, "-q")


def test_webp_mix_holds_webp_bytes_and_lower_quality_gives_fewer(tmp_path):
    images = [image_bytes(i, size=(64, 48)) for i in range(6)]
    table = pa.table(
        {
            C.ID: [f"i{i}" for i in range(6)],
            C.TEXT: [f"photo {i}" for i in range(6)],
            C.IMAGE: C.media_array(images, [None] * 6),
            C.IMAGE_FORMAT: ["jpeg"] * 6,
            C.IMAGE_NBYTES: [len(b) for b in images],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    runs = {}
    for quality in (90, 20):
        out = tmp_path / f"q{quality}"
        mixup(tmp_path / "in.parquet", out, "--format", "webp", "--quality", quality)
        runs[quality] = by_id(read_dataset(out))
    assert runs[90].keys() == runs[20].keys() and len(runs[90]) == 6
    for row_id, high in runs[90].items():
        low = runs[20][row_id]
        assert low[C.MIXUP_PARENTS] == high[C.MIXUP_PARENTS]
        for row in (high, low):
            data = row[C.IMAGE]["bytes"]
            assert (data[:4], data[8:16]) == (b"RIFF", b"WEBPVP8 ")  # lossy WebP
            assert row[C.IMAGE_FORMAT] == "webp" and row[C.IMAGE_NBYTES] == len(data)
            assert Image.open(io.BytesIO(data)).size == (64, 48)
        assert len(low[C.IMAGE]["bytes"]) < len(high[C.IMAGE]["bytes"])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """Four 32-bit float WAV clips at 16 kHz, of 0.25 or 0.5 s; and id -> seconds."""
    seconds = {f"c{i}": 0.25 * (1 + i % 2) for i in range(4)}
    audio = [
        wav_bytes(s, 16000, freq=220.0 * (i + 1), subtype="FLOAT")
        for i, s in enumerate(seconds.values())
    ]
    table = pa.table(
        {
            C.ID: list(seconds),
            C.TEXT: [f"sound {i}" for i in range(4)],
            C.AUDIO: C.media_array(audio, [None] * 4),
            C.AUDIO_FORMAT: ["wav"] * 4,
            C.SAMPLE_RATE: pa.array([16000] * 4, pa.int32()),
            C.CHANNELS: pa.array([1] * 4, pa.int16()),
            C.DURATION: list(seconds.values()),
        }
    )
    path = tmp_path_factory.mktemp("clips") / "clips.parquet"
    pq.write_table(table, path)
    return path, seconds


def _audio_rows(out) -> list[tuple]:
    """Per mixed row: what soundfile reads (format, subtype, rate, channels, frames), the
    recorded (audio_format, sample_rate, channels, duration), and the parents' ids."""
    rows = []
    for row in read_dataset(out).to_pylist():
        info = sf.info(io.BytesIO(row[C.AUDIO]["bytes"]))
        rows.append(
            (
                (info.format, info.subtype, info.samplerate, info.channels, info.frames),
                (row[C.AUDIO_FORMAT], row[C.SAMPLE_RATE], row[C.CHANNELS], row[C.DURATION]),
                row[C.MIXUP_PARENTS],
            )
        )
    return rows


@pytest.mark.parametrize(
    ("options", "container", "fmt", "rate"),
    [
        ((), "WAV", "wav", 16000),
        (("--format", "flac", "--sample-rate", 8000), "FLAC", "flac", 8000),
    ],
    ids=["16-bit-wav-at-the-first-clips-rate", "flac-at-the-asked-rate"],
)
def test_audio_mix_format_and_rate(tmp_path, clips, options, container, fmt, rate):
    src, seconds = clips
    mixup(src, tmp_path / "out", "--mode", "audio-text", *options)
    rows = _audio_rows(tmp_path / "out")
    assert len(rows) == 4
    for info, columns, parents in rows:
        longest = max(seconds[p] for p in parents)
        assert info == (container, "PCM_16", rate, 1, int(longest * rate))
        assert columns == (fmt, rate, 1, longest)


# -- score --head ----------------------------------------------------------------------------


def test_head_whose_name_says_no_model_expects_the_model_of_its_size(tmp_path, monkeypatch, capsys):
    """No LAION name to go by: the layout's input size decides (768: ViT-L/14, as published)."""
    torch.manual_seed(0)
    heads = {
        "linear.pth": nn.Linear(768, 1),
        "mlp.pth": AestheticMLP(),
        "relu_mlp.pth": AestheticMLP(relu=True),
        "nsfw.pth": KerasNSFW(),
        "nsfw_512.pth": KerasNSFW((512, 64, 1)),
    }
    for name, module in heads.items():
        torch.save(module.state_dict(), tmp_path / name)
    loaded = {name: H.load(str(tmp_path / name)) for name in heads}
    assert {name: (head.model, head.pretrained) for name, head in loaded.items()} == {
        "linear.pth": ("ViT-L-14", "openai"),
        "mlp.pth": ("ViT-L-14", "openai"),
        "relu_mlp.pth": ("ViT-L-14", "openai"),
        "nsfw.pth": ("ViT-L-14", "openai"),
        "nsfw_512.pth": ("ViT-B-32", "openai"),
    }
    rn50 = {"model": "RN50x16", "pretrained": "openai", "dim": 768, "normalized": True}
    embeddings_file(tmp_path / "rn50.parquet", 768, 5, rn50)
    args = ["score", tmp_path / "rn50.parquet", "--head", f"quality={tmp_path / 'linear.pth'}"]
    code, err = run_main([*args, "-o", tmp_path / "out"], monkeypatch, capsys)
    assert code == 3
    assert err == (
        "mmtools score: error: head quality expects 768-d ViT-L-14 (openai) embeddings but "
        "image_embedding was made by RN50x16 (openai); embed with that model, or pass --force "
        "if they are the same weights"
    )


# -- recipes ---------------------------------------------------------------------------------


def _coordinate_head(path: Path, index: int, scale: float) -> str:
    """A linear head giving `scale` times coordinate `index` of the unit embedding."""
    weight = np.zeros((1, 768), np.float32)
    weight[0, index] = scale
    layer = H.Layer(weight, np.zeros(1, np.float32))
    head = H.Head(H.FORMAT, [layer], model="ViT-L-14", pretrained="openai", input=C.IMAGE_EMBEDDING)
    return H.save(head, str(path))[0]


def test_laion_subsets_recipe_defaults_to_laions_thresholds(tmp_path, monkeypatch):
    """Each row sits just past one threshold: aesthetic > 7, punsafe < 0.5, pwatermark < 0.8."""
    scores = {
        "kept": (7.001, 0.499, 0.799),
        "dull": (6.999, 0.499, 0.799),
        "unsafe": (7.001, 0.501, 0.799),
        "watermarked": (7.001, 0.499, 0.801),
    }
    scale = (20.0, 2.0, 2.0)
    x = np.zeros((len(scores), 768), np.float32)
    for row, values in enumerate(scores.values()):
        x[row, :3] = np.divide(values, scale)
        x[row, 3] = np.sqrt(1 - np.sum(x[row, :3] ** 2))
    emb = pa.FixedSizeListArray.from_arrays(
        pa.array(x.ravel()), type=C.embedding_type(768, "float32")
    )
    table = pa.table({C.ID: list(scores), C.IMAGE_EMBEDDING: emb})
    table = table.cast(C.with_metadata(table.schema, {C.IMAGE_EMBEDDING: L14}))
    pq.write_table(table, tmp_path / "pool.parquet")
    env = {
        "AESTHETIC_HEAD": _coordinate_head(tmp_path / "aesthetic", 0, scale[0]),
        "NSFW_HEAD": _coordinate_head(tmp_path / "nsfw", 1, scale[1]),
        "WATERMARK_HEAD": _coordinate_head(tmp_path / "watermark", 2, scale[2]),
    }
    for name in ("AESTHETIC_MIN", "PUNSAFE_MAX", "PWATERMARK_MAX"):
        monkeypatch.delenv(name, raising=False)
    proc = run_recipe("laion_subsets.sh", tmp_path / "pool.parquet", tmp_path / "out", **env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert read_dataset(tmp_path / "out").column(C.ID).to_pylist() == ["kept"]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["dropped"] == {"where": 3}
