"""`mmtools embed`: normalised, stable embeddings with provenance; rejects; offline errors; CLAP."""

from __future__ import annotations

import io
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    image_bytes,
    mmtools,
    photographs,
    read_dataset,
    reject_reasons,
    tiny_clip,
    wav_bytes,
)
from PIL import Image

from mmtools import columns as C
from mmtools.steps.embed import ClapEmbed, ClipEmbed, EmbedConfig


def _byte_vocab() -> dict[str, int]:
    """GPT-2's byte-to-unicode alphabet: a byte-level BPE vocabulary with no merges."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    chars = {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for ch in chars.values():
        vocab[ch] = len(vocab)
    return vocab


def tiny_clap(directory: Path) -> Path:
    """A random tiny CLAP model + processor saved with save_pretrained (16 kHz, 1 s window)."""
    import torch
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        ClapTextConfig,
        RobertaTokenizer,
    )

    directory.mkdir(parents=True, exist_ok=True)
    audio = ClapAudioConfig(
        spec_size=64,
        num_mel_bins=16,
        window_size=4,
        hidden_size=32,
        patch_embeds_hidden_size=16,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        projection_dim=24,
        num_hidden_layers=2,
    )
    text = ClapTextConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=70,
        projection_dim=24,
    )
    config = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=24)
    torch.manual_seed(0)
    ClapModel(config).save_pretrained(directory)
    (directory / "vocab.json").write_text(json.dumps(_byte_vocab()))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = RobertaTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=64
    )
    features = ClapFeatureExtractor(
        feature_size=16,
        sampling_rate=16000,
        hop_length=160,
        max_length_s=1,
        fft_window_size=256,
        frequency_max=8000,
        truncation="rand_trunc",
    )
    ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def media_table(
    images: list, texts: list, paths: list | None = None, column: str = C.IMAGE
) -> pa.Table:
    """A plain Parquet-ready table of id, media and text."""
    n = len(images)
    media = C.media_array(images, paths or [None] * n)
    return pa.table(
        {C.ID: [f"r{i:03d}" for i in range(n)], column: media, C.TEXT: pa.array(texts, pa.string())}
    )


def matrix(table: pa.Table, column: str) -> np.ndarray:
    """An embedding column as a float32 matrix."""
    return np.array(table.column(column).to_pylist(), dtype=np.float32)


def vectors_by_id(table: pa.Table, column: str) -> dict[str, np.ndarray]:
    """id -> embedding (float32 vector) of `column`."""
    return dict(zip(table.column(C.ID).to_pylist(), matrix(table, column), strict=True))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def clip_json(models_dir) -> Path:
    return tiny_clip(models_dir)


def _config(clip_json, **kw) -> EmbedConfig:
    kw = {"model": str(clip_json), "pretrained": "none", "device": "cpu", "workers": 2, **kw}
    return EmbedConfig(**kw)


def _run(step, table: pa.Table, batch_rows: int) -> pa.Table:
    step.setup()
    results = list(step.run(table.to_batches(max_chunksize=batch_rows)))
    assert len(results) == len(table.to_batches(max_chunksize=batch_rows))
    return pa.Table.from_batches([r.batch for r in results])


@pytest.fixture(scope="module")
def good_table() -> pa.Table:
    return media_table(
        [image_bytes(i, (40 + i, 30)) for i in range(20)],
        [f"a photo number {i}" for i in range(20)],
    )


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, clip_json) -> tuple[Path, Path, object]:
    """One CLI run over good rows and every kind of bad row; (input dir, output, process)."""
    root = tmp_path_factory.mktemp("mixed")
    on_disk = root / "on_disk.jpg"
    on_disk.write_bytes(image_bytes(99))
    good = [image_bytes(i) for i in range(12)]
    rgba = io.BytesIO()
    from PIL import Image

    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(rgba, "PNG")
    truncated = image_bytes(50, (64, 64))
    images = [
        *good,
        truncated[: len(truncated) // 2],
        b"not an image",
        b"",
        None,
        good[0],
        rgba.getvalue(),
        None,
        None,
    ]
    texts = [
        *(f"caption {i}" for i in range(12)),
        "t",
        "g",
        "z",
        "n",
        "   ",
        "alpha",
        "disk",
        "gone",
    ]
    paths = [None] * 18 + [str(on_disk), str(root / "missing.jpg")]
    (root / "in").mkdir()
    pq.write_table(media_table(images, texts, paths), root / "in" / "part-0.parquet")
    out = root / "out"
    proc = mmtools(
        "embed",
        root / "in",
        "--model",
        clip_json,
        "--pretrained",
        "none",
        "--batch-size",
        5,
        "-o",
        out,
    )
    return root / "in", out, proc


def test_info_names_the_model_behind_each_embedding_and_the_command_line(mixed, clip_json):
    source, out, _ = mixed
    lines = mmtools("info", out).stdout.decode().splitlines()
    for column in (C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING):
        (line,) = [x for x in lines if x.startswith(f"  {column} ")]
        assert f'"model": "{clip_json}"' in line and '"pretrained": "none"' in line
    command = f"mmtools embed {source} --model {clip_json} --pretrained none --batch-size 5"
    assert f"  {command} -o {out}  (20 in, 14 out, 6 rejected)" in lines


def test_embed_writes_unit_float16_vectors_with_provenance(mixed):
    _, out, _ = mixed
    table = read_dataset(out)
    for column in (C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING):
        assert table.schema.field(column).type.list_size == 32
        assert table.schema.field(column).type.value_type == pa.float16()
        norms = np.linalg.norm(matrix(table, column), axis=1)
        assert np.allclose(norms, 1.0, atol=2e-3)
        info = C.column_info(table.schema)[column]
        assert info["model"].endswith("tiny-clip.json") and info["pretrained"] == "none"
        assert info["dim"] == 32 and info["normalized"] is True and info["precision"] == "fp32"
        assert info["library"].startswith("open_clip ")
    manifest = json.loads((out / "_manifest.json").read_text())
    assert "tiny-clip.json" in json.dumps(manifest)


def test_bad_rows_become_rejects_and_good_rows_all_come_out(mixed):
    _, out, proc = mixed
    kept = read_dataset(out).column(C.ID).to_pylist()
    assert kept == [f"r{i:03d}" for i in (*range(12), 17, 18)]  # in order; RGBA and on-disk ok
    assert reject_reasons(out) == {
        "r012": "truncated",
        "r013": "not_image",
        "r014": "zero_byte",
        "r015": "no_media",
        "r016": "no_text",
        "r019": "missing_file",
    }
    assert "20 in, 14 out, 6 rejected" in proc.stderr.decode()


def test_rejects_land_on_their_rows_when_a_batch_is_split_among_decoding_threads(clip_json):
    """A batch of 40 decoded in slices of 10 by 4 threads, its captions in one task: each
    reason stays on its row, a row with a bad image and a blank caption gets the image's."""
    images = [image_bytes(i) for i in range(40)]
    texts = [f"caption {i}" for i in range(40)]
    for i in (3, 14, 27, 39):
        images[i] = b"not an image"
    for i in (0, 14, 22):
        texts[i] = "  "
    table = media_table(images, texts)
    out = ClipEmbed(_config(clip_json, workers=4, batch_size=16))
    out.setup()
    (result,) = list(out.run(table.to_batches(max_chunksize=40)))
    rejects = result.rejects.to_pydict()
    assert dict(zip(rejects[C.ID], rejects["reason"], strict=True)) == {
        "r000": "no_text",
        "r003": "not_image",
        "r014": "not_image",
        "r022": "no_text",
        "r027": "not_image",
        "r039": "not_image",
    }
    bad = {0, 3, 14, 22, 27, 39}
    assert result.batch.column(C.ID).to_pylist() == [f"r{i:03d}" for i in range(40) if i not in bad]
    whole = _run(
        ClipEmbed(_config(clip_json, workers=1)),
        table.filter(pa.array([i not in bad for i in range(40)])),
        40,
    )
    for column in (C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING):
        assert np.allclose(matrix(result.batch, column), matrix(whole, column), atol=1e-3)


def test_embeddings_stable_across_batch_sizes_and_dtypes(clip_json, good_table):
    small = _run(ClipEmbed(_config(clip_json, batch_size=3, dtype="float32")), good_table, 7)
    large = _run(
        ClipEmbed(_config(clip_json, batch_size=64, dtype="float32", workers=1)), good_table, 20
    )
    half = _run(ClipEmbed(_config(clip_json, batch_size=8)), good_table, 20)
    for column in (C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING):
        assert np.allclose(matrix(small, column), matrix(large, column), atol=1e-5)
        assert half.schema.field(column).type.value_type == pa.float16()
        assert np.allclose(matrix(half, column), matrix(large, column), atol=1e-3)


def test_bf16_autocast_on_cpu_agrees_with_fp32(clip_json, good_table):
    fp32 = _run(ClipEmbed(_config(clip_json, dtype="float32")), good_table, 20)
    bf16 = _run(ClipEmbed(_config(clip_json, dtype="float32", precision="bf16")), good_table, 20)
    for column in (C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING):
        cosine = np.sum(matrix(fp32, column) * matrix(bf16, column), axis=1)
        assert cosine.min() > 0.98


def test_local_checkpoint_loads_and_nan_weights_are_rejected(clip_json, good_table, tmp_path):
    import torch

    step = ClipEmbed(_config(clip_json, dtype="float32"))
    reference = _run(step, good_table, 20)
    state = step._towers["image"].encoder.model.state_dict()
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = _run(
        ClipEmbed(_config(clip_json, pretrained=str(tmp_path / "ckpt.pt"), dtype="float32")),
        good_table,
        20,
    )
    assert np.allclose(matrix(loaded, C.IMAGE_EMBEDDING), matrix(reference, C.IMAGE_EMBEDDING))
    (tmp_path / "dir").mkdir()
    torch.save(state, tmp_path / "dir" / "open_clip_pytorch_model.bin")
    from_dir = ClipEmbed(_config(clip_json, pretrained=str(tmp_path / "dir")))
    assert from_dir.column_info()[C.IMAGE_EMBEDDING]["pretrained"].endswith(
        "open_clip_pytorch_model.bin"
    )
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    broken = ClipEmbed(_config(clip_json, pretrained=str(tmp_path / "nan.pt")))
    broken.setup()
    result = broken.process(good_table.to_batches()[0])
    assert result.batch.num_rows == 0
    assert set(result.rejects.column(C.REJECT_REASON).to_pylist()) == {"bad_embedding"}


def test_reduced_jpeg_decodes_a_photograph_at_the_smallest_scale_that_keeps_the_side():
    """--reduced-jpeg: libjpeg's 1/2, 1/4 or 1/8 scale, the shorter side kept at least as
    asked; a JPEG too small to halve, and a PNG, decode at full size."""
    from PIL import Image

    from mmtools.media import decoded_image

    photo = photographs()["grace_hopper.jpg"]  # 512x600
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(buf, "PNG")
    for data, min_side, longest, size in [
        (photo, 0, False, (512, 600)),
        (photo, 64, False, (64, 75)),  # 1/8
        (photo, 100, False, (128, 150)),  # 1/4
        (photo, 256, False, (256, 300)),  # 1/2
        (photo, 257, False, (512, 600)),
        (photo, 300, True, (256, 300)),  # the longer side kept (`sheet`'s tiles)
        (photo, 301, True, (512, 600)),
        (buf.getvalue(), 64, False, (512, 600)),
    ]:
        with decoded_image(data, min_side=min_side, longest=longest) as img:
            assert img.size == size, (min_side, longest, img.size)
            assert img.mode == "RGB"


def test_reduced_jpeg_embeds_photographs_nearly_as_a_full_decode(tmp_path, clip_json):
    """The embeddings of real photographs decoded at reduced scale stay within a hair of
    the full decode's; a PNG's are the same. The option is part of the output's identity,
    and a run without it records nothing new (outputs made before it existed resume)."""
    photos = photographs()
    buf = io.BytesIO()
    Image.open(io.BytesIO(photos["china.jpg"])).save(buf, "PNG")
    images = [*photos.values(), buf.getvalue()]
    pq.write_table(media_table(images, ["a", "b", "c", "d"]), tmp_path / "in.parquet")
    args = [tmp_path / "in.parquet", "--model", clip_json, "--pretrained", "none", "-q"]
    mmtools("embed", *args, "-o", tmp_path / "full")
    mmtools("embed", *args, "--reduced-jpeg", "-o", tmp_path / "reduced")
    full = matrix(read_dataset(tmp_path / "full"), C.IMAGE_EMBEDDING)
    reduced = matrix(read_dataset(tmp_path / "reduced"), C.IMAGE_EMBEDDING)
    cosine = (full * reduced).sum(axis=1)
    assert (cosine > 0.99).all(), cosine
    assert not any(np.array_equal(full[i], reduced[i]) for i in range(3))  # the JPEGs
    assert np.array_equal(full[3], reduced[3])  # the PNG
    manifests = [(tmp_path / d / "_manifest.json").read_text() for d in ("full", "reduced")]
    assert '"reduced_jpeg":' not in json.dumps(json.loads(manifests[0]))
    assert '"reduced_jpeg": true' in json.dumps(json.loads(manifests[1]))
    proc = mmtools("embed", *args, "-o", tmp_path / "reduced", check=False)
    assert proc.returncode == 6, proc.stderr.decode()


def test_offline_default_model_fails_with_one_line(tmp_path):
    pq.write_table(media_table([image_bytes(0)], ["a photo"]), tmp_path / "in.parquet")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = mmtools("embed", tmp_path / "in.parquet", "-o", tmp_path / "out", check=False, env=env)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 75
    assert lines == [
        "mmtools embed: error: cannot load ViT-B-32 weights 'laion2b_s34b_b79k' (no network?); "
        "pass a local checkpoint with --pretrained /path/to/open_clip_pytorch_model.bin, or "
        "--model mmtools-shapes for the bundled offline model"
    ]
    assert not (tmp_path / "out").exists()


def test_a_model_download_s_retries_are_each_printed_once(tmp_path):
    """With no network the hub retries each file five times before the one-line error. It
    logs on a handler of its own and also passes each line to mmtools' handler: every line
    came twice. (The hub's waits between retries, 1 to 8 s, are skipped here.)"""
    pq.write_table(media_table([image_bytes(0)], ["a photo"]), tmp_path / "in.parquet")
    with socket.socket() as s:  # a port nothing listens on: each request is refused
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
    for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # either keeps the hub offline
        env.pop(offline, None)
    code = "import sys, time; time.sleep = lambda s: None; from mmtools.cli import main\n"
    code += f"sys.argv = ['mmtools', 'embed', {str(tmp_path / 'in.parquet')!r}, '-o', 'out']\n"
    code += "main()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, timeout=120
    )
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 75, lines
    assert sum("Retrying in" in line for line in lines) >= 5, lines
    assert all(line.startswith("mmtools") for line in lines), lines  # no unprefixed copy
    said = [line.removeprefix("mmtools: ") for line in lines]
    assert all(a != b for a, b in itertools.pairwise(said)), lines  # nor a prefixed one
    assert lines[-1].startswith("mmtools embed: error: cannot load ViT-B-32 weights")


def test_offline_default_clap_fails_with_one_line(tmp_path):
    pq.write_table(media_table([wav_bytes()], ["a tone"], column=C.AUDIO), tmp_path / "a.parquet")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = mmtools("embed", tmp_path / "a.parquet", "-o", tmp_path / "out", check=False, env=env)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 75 and len(lines) == 1
    assert "cannot load CLAP model 'laion/clap-htsat-unfused' (no network?)" in lines[0]
    assert "--audio-model /path/to/" in lines[0]


@pytest.fixture(scope="module")
def clap_dir(models_dir) -> Path:
    return tiny_clap(models_dir / "tiny-clap")


def audio_table() -> pa.Table:
    """The same tone at several rates and channel counts, plus bytes that are not audio."""
    clips = [
        wav_bytes(sr=16000),
        wav_bytes(sr=44100, channels=2),
        wav_bytes(sr=8000),
        wav_bytes(sr=48000, channels=2, subtype="FLOAT"),
        wav_bytes(sr=22050, fmt="FLAC"),
        wav_bytes(seconds=3.0, sr=16000, freq=880.0),
        b"RIFF but not audio",
        b"",
    ]
    return media_table(clips, ["a tone"] * 8, column=C.AUDIO)


def test_clap_embeds_audio_at_any_rate_and_channel_count(clap_dir, tmp_path):
    pq.write_table(audio_table(), tmp_path / "a.parquet")
    out = tmp_path / "out"
    mmtools(
        "embed",
        tmp_path / "a.parquet",
        "--audio-model",
        clap_dir,
        "--dtype",
        "float32",
        "--batch-size",
        3,
        "-o",
        out,
    )
    table = read_dataset(out)
    audio = vectors_by_id(table, C.AUDIO_EMBEDDING)
    assert sorted(audio) == [f"r{i:03d}" for i in range(6)]
    assert reject_reasons(out) == {"r006": "not_audio", "r007": "zero_byte"}
    for i in range(1, 5):  # resampled and mixed down: close to the 16 kHz mono original
        assert float(audio["r000"] @ audio[f"r{i:03d}"]) > 0.99
    assert float(audio["r000"] @ audio["r005"]) < 0.999  # a different tone differs
    info = C.column_info(table.schema)
    assert info[C.AUDIO_EMBEDDING]["model"] == str(clap_dir)
    assert info[C.TEXT_EMBEDDING]["dim"] == 24  # text went through CLAP, not open_clip
    assert np.allclose(np.linalg.norm(matrix(table, C.TEXT_EMBEDDING), axis=1), 1, atol=1e-5)


def test_clap_embeddings_stable_across_batch_sizes(clap_dir):
    table = audio_table().slice(0, 6)
    config = {
        "audio_model": str(clap_dir),
        "modalities": ["audio", "text"],
        "device": "cpu",
        "dtype": "float32",
    }
    one = _run(ClapEmbed(EmbedConfig(**config, batch_size=1)), table, 2)
    all_ = _run(ClapEmbed(EmbedConfig(**config, batch_size=6)), table, 6)
    assert np.allclose(matrix(one, C.AUDIO_EMBEDDING), matrix(all_, C.AUDIO_EMBEDDING), atol=1e-5)


def test_embed_refuses_unknown_modality_and_bad_device(clip_json, tmp_path):
    from mmtools.errors import UsageError

    with pytest.raises(UsageError, match="embeds image and text, not audio"):
        ClipEmbed(_config(clip_json, modalities=["audio"]))
    schema = media_table([b"x"], ["t"]).schema
    with pytest.raises(UsageError, match="fp16 is not supported on CPU"):
        ClipEmbed(_config(clip_json, precision="fp16")).output_schema(schema)
    with pytest.raises(UsageError, match="no CUDA device"):
        ClipEmbed(_config(clip_json, device="cuda")).output_schema(schema)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""


def test_embedding_equals_open_clip_own_preprocess_and_forward(clip_json, good_table):
    import torch
    from PIL import Image

    step = ClipEmbed(_config(clip_json, dtype="float32"))
    table = _run(step, good_table, 20)
    encoder = step._towers["image"].encoder
    images = [Image.open(io.BytesIO(image_bytes(i, (40 + i, 30)))) for i in range(20)]
    with torch.no_grad():
        expected = encoder.model.encode_image(
            torch.stack([encoder.preprocess(im) for im in images])
        )
    expected = torch.nn.functional.normalize(expected, dim=-1).numpy()
    assert np.allclose(matrix(table, C.IMAGE_EMBEDDING), expected, atol=1e-5)


def test_8bit_pixels_normalised_on_the_device_give_the_same_embeddings_bit_for_bit(clip_json):
    """On a GPU the decoding threads stop at the resized 8-bit pixels and the device
    normalises them; the model must see the same inputs as on the CPU, on real photographs."""
    import torch
    from test_shapes_domain import photo_variants

    photos = []
    for im in photo_variants():
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=90)
        photos.append(buf.getvalue())
    table = media_table(photos, [f"photo {i}" for i in range(len(photos))])
    on_cpu = ClipEmbed(_config(clip_json, dtype="float32"))
    reference = _run(on_cpu, table, 5)
    as_on_gpu = ClipEmbed(_config(clip_json, dtype="float32"))
    as_on_gpu.setup()
    tower = as_on_gpu._towers["image"]
    assert not tower.raw  # a CPU run normalises in the decoding threads
    tower.decoder.raw = True  # what a CUDA device chooses
    assert tower.alloc(2, pin=False)["pixels"].dtype == torch.uint8
    table_gpu_layout = _run(as_on_gpu, table, 5)
    for column in (C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING):
        assert np.array_equal(matrix(table_gpu_layout, column), matrix(reference, column))


def test_the_normalisation_table_is_torchvisions_to_tensor_and_normalize(clip_json):
    """Every level of every channel: the table equals ToTensor + Normalize of the model's
    own transform (within float32 rounding; numpy's float32 arithmetic exactly)."""
    from PIL import Image
    from torchvision import transforms as T

    from mmtools.steps.embed.clip import normalised_levels
    from mmtools.steps.embed.step import split_preprocess

    step = ClipEmbed(_config(clip_json))
    step.setup()
    _, mean, std = split_preprocess(step._towers["image"].encoder.preprocess)
    table = normalised_levels(mean, std)
    assert table.shape == (3, 256) and table.dtype == np.float32
    levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # 1x256 RGB
    expected = T.Normalize(mean.tolist(), std.tolist())(T.ToTensor()(Image.fromarray(levels)))
    assert np.allclose(table, expected.numpy()[:, 0, :], rtol=0, atol=1e-6)
    numpy_way = ((levels[0].astype(np.float32) / 255.0 - mean) / std).T
    assert np.array_equal(table, numpy_way)


def test_resume_fingerprint_is_json_stable_and_ignores_device_and_batching(clip_json):
    one = ClipEmbed(_config(clip_json, batch_size=8, workers=1, device="cpu"))
    other = ClipEmbed(_config(clip_json, batch_size=64, workers=4, device="auto"))
    assert json.loads(json.dumps(one.params())) == one.params() == other.params()
    assert ClipEmbed(_config(clip_json, dtype="float32")).params() != one.params()
