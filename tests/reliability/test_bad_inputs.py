"""A corpus of bad inputs through every kind of step: a reject row with a reason or one clear
error line, never a traceback, never a silent loss."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, image_bytes, mmtools
from forked import cli
from harness import THREADS, media_file, one_line, outcome, png_header, tiny_clip
from PIL import Image

from mmtools import columns as C
from mmtools.errors import EXIT_DATA


def bad_images() -> dict[str, tuple[bytes, str]]:
    """Undecodable images and the reason each must be rejected with."""
    jpeg, png = image_bytes(1, size=(64, 64)), image_bytes(2, size=(64, 64), fmt="PNG")
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "zero.jpg": (b"", "zero_byte"),
        "text.jpg": (b"just some text, not an image\n", "not_image"),
        "bomb.png": (png_header(100_000, 100_000), "decompression_bomb"),
        "garbage.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "corrupt"),
    }


def odd_images() -> dict[str, bytes]:
    """Unusual but valid images: every step must decode them."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "sixteen.png": encode(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"),
        "palette_alpha.png": encode(
            rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0
        ),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated.webp": encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "rotated.jpg": encode(rgb, "JPEG", exif=exif),
        "png_named.jpg": encode(rgb, "PNG"),
        "tall.png": encode(Image.new("RGB", (3, 2000), (9, 9, 9)), "PNG"),
    }


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("step", ["embed", "dedup-phash"])
def test_decoding_steps_reject_bad_images_and_decode_odd_ones(step, model, tmp_path):
    bad = bad_images()
    media_file(tmp_path / "in.parquet", {**{k: v for k, (v, _) in bad.items()}, **odd_images()})
    args = {
        "embed": ["embed", "--model", model, "--pretrained", "none", "--device", "cpu"],
        "dedup-phash": ["dedup", "-m", "phash", "--mark"],
    }[step]
    code, err = cli(args[0], tmp_path / "in.parquet", *args[1:], "-o", tmp_path / "out")
    assert code == 0 and "Traceback" not in err
    rows, rejects = outcome(tmp_path / "out")
    assert rejects == {name: reason for name, (_, reason) in bad.items()}
    assert set(rows) == set(odd_images())


def test_mixup_rejects_bad_parents_and_loses_no_row(tmp_path):
    bad = bad_images()
    media_file(tmp_path / "in.parquet", {**{k: v for k, (v, _) in bad.items()}, **odd_images()})
    out = tmp_path / "out"
    mmtools("mixup", tmp_path / "in.parquet", "--keep-originals", "--lam", "0.5", "-o", out)
    rows, rejects = outcome(out)
    originals = {i for i in rows if not i.startswith("mixup:")}
    assert originals | set(rejects) == set(bad) | set(odd_images())
    assert not originals & set(rejects)
    assert all(rejects[i] == bad[i][1] for i in rejects)
    parents = {p for r in rows.values() if r[C.MIXUP_PARENTS] for p in r[C.MIXUP_PARENTS]}
    assert parents <= set(odd_images())


def test_a_pipe_carries_every_reject_to_the_end(tmp_path, model):
    """`ingest | embed -o`: each file is an output row or a reject of one of the two steps."""
    folder = tmp_path / "media"
    folder.mkdir()
    files = {**{k: v for k, (v, _) in bad_images().items()}, **odd_images()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "latin1.jpg").write_bytes(image_bytes(3))
    (folder / "latin1.txt").write_bytes(b"caf\xe9")  # caption not UTF-8: read as cp1252
    (folder / "binary.jpg").write_bytes(image_bytes(5))
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02\xff")  # no text in any encoding
    (folder / "blank.jpg").write_bytes(image_bytes(4))
    (folder / "blank.txt").write_text("   ")  # nothing to embed
    (folder / "noise.wav").write_bytes(b"RIFF not audio")  # ingest's audio kind
    stream = mmtools("ingest", folder, "-q").stdout
    out = tmp_path / "out"
    args = ["--model", model, "--pretrained", "none", "--device", "cpu", "--modalities"]
    mmtools("embed", "-", *args, "image,text", "-o", out, input=stream, env=THREADS)
    rows, rejects = outcome(out)
    named = {*files, "latin1.jpg", "binary.jpg", "blank.jpg", "noise.wav"}
    assert set(rows) | set(rejects) == named
    assert not set(rows) & set(rejects)
    assert "latin1.jpg" in rows
    assert rejects["binary.jpg"] == "bad_caption" and rejects["blank.jpg"] == "no_text"


def _bad_utf8_file(path) -> None:
    raw = pa.array([b"fine caption", b"caf\xe9 au lait", b"also fine"], pa.binary())
    table = pa.table({C.ID: ["a", "b", "c"], C.TEXT: raw.view(pa.string())})
    pq.write_table(table, path)


@pytest.mark.parametrize(
    "args",
    [
        ["filter", "--where", "text LIKE '%caf%' OR id = 'a'"],
        ["dedup", "-m", "exact"],
        ["dedup", "-m", "minhash"],
    ],
    ids=["filter", "dedup-exact", "dedup-minhash"],
)
def test_captions_that_are_not_utf8(args, tmp_path):
    _bad_utf8_file(tmp_path / "in.parquet")
    out = tmp_path / "out"
    proc = mmtools(args[0], tmp_path / "in.parquet", *args[1:], "-q", "-o", out, check=False)
    err = proc.stderr.decode()
    assert "Traceback" not in err
    if proc.returncode == 0:
        rows, rejects = outcome(out)
        assert "b" not in rows and rejects.get("b")
    else:
        assert proc.returncode == EXIT_DATA and "UTF-8" in err and one_line(err)


def test_captions_with_nul_bytes_flow_through(tmp_path, model):
    images = {f"n{i}.jpg": image_bytes(i) for i in range(4)}
    texts = {"n0.jpg": "nul\x00inside", "n1.jpg": "\x00", "n2.jpg": "ok", "n3.jpg": "x\x00y\x00"}
    media_file(tmp_path / "in.parquet", images, texts)
    for args in (
        ["filter", "--where", "length(text) > 0"],
        ["dedup", "-m", "minhash", "--mark"],
        ["embed", "--model", str(model), "--pretrained", "none", "--device", "cpu"],
    ):
        out = tmp_path / args[0]
        assert cli(args[0], tmp_path / "in.parquet", *args[1:], "-o", out)[0] == 0
        rows, rejects = outcome(out)
        assert set(rows) | set(rejects) == set(images)
        assert all(rows[i][C.TEXT] == texts[i] for i in rows)


@pytest.mark.parametrize(
    "args",
    [
        ["filter", "--where", "width > 20"],
        ["filter", "--top-fraction", "0.5", "--by", "width"],
        ["dedup", "-m", "exact"],
        ["mixup", "--fraction", "0.5"],
    ],
    ids=["where", "top-fraction", "dedup", "mixup"],
)
def test_empty_shards_between_full_ones(args, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    sizes = [0, 6, 0, 0, 5, 0]
    n = 0
    for k, size in enumerate(sizes):
        ids = [f"r{n + i:03d}" for i in range(size)]
        images = [image_bytes(n + i) for i in range(size)]
        n += size
        table = pa.table(
            {
                C.ID: pa.array(ids, pa.string()),
                C.IMAGE: C.media_array(images, [None] * size),
                C.TEXT: pa.array([f"t {i}" for i in ids], pa.string()),
                C.WIDTH: pa.array([10 + 3 * i for i in range(size)], pa.int32()),
            }
        )
        pq.write_table(table, d / f"part-{k}.parquet")
    out = tmp_path / "out"
    mmtools(args[0], d, *args[1:], "-o", out)
    manifest = json.loads((out / "_manifest.json").read_text())
    accounted = manifest["rows"] - manifest["generated"] + manifest["rejects"]["rows"]
    assert accounted + sum(manifest["dropped"].values()) == n
