"""Ingest's quick verification (JPEGs at 1/8 scale, small images in the calling thread)
rejects exactly the files, with exactly the reasons, that a full-size decode rejects."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import encode, mmtools, read_dataset, read_rejects
from PIL import Image

from mmtools.media import ENV_DECODE_TIMEOUT, ENV_VERIFY, QUICK_PIXELS, MediaError, probe_image


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients with some noise: entropy data like a photo's, not like pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    return np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)


def _sources() -> dict[str, bytes]:
    rgb = Image.fromarray(_photo(128, 96, 0))
    large = Image.fromarray(_photo(640, 480, 1))
    return {
        "base": encode(rgb, "JPEG", quality=90),
        "large": encode(large, "JPEG", quality=85),
        "progressive": encode(large, "JPEG", quality=85, progressive=True),
        "grey": encode(rgb.convert("L"), "JPEG"),
        "cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "444": encode(rgb, "JPEG", subsampling=0),
        "png": encode(rgb, "PNG"),
    }


def _damaged(name: str, data: bytes) -> dict[str, bytes]:
    """Copies of one file damaged in the ways that real downloads and disks damage files."""
    out = {f"{name}-ok": data}
    for frac in (0.05, 0.3, 0.5, 0.8, 0.97):
        out[f"{name}-cut{frac}"] = data[: int(len(data) * frac)]
    for k in (1, 2, 3, 7):
        out[f"{name}-short{k}"] = data[:-k]
    if name == "png":
        idat = data.find(b"IDAT")
        flipped = bytearray(data)
        flipped[idat + 20] ^= 0xFF
        out["png-idat-flip"] = bytes(flipped)
        out["png-bad-ihdr"] = data[:16] + bytes(8) + data[24:]
        return out
    sos = data.find(b"\xff\xda")
    step = max(1, (len(data) - sos) // 12)
    for off in range(sos + 16, len(data) - 2, step):
        for bit in (0, 5):
            flipped = bytearray(data)
            flipped[off] ^= 1 << bit
            out[f"{name}-flip{off}.{bit}"] = bytes(flipped)
        marker = bytearray(data)
        marker[off : off + 4] = b"\xff\xff\xff\xff"
        out[f"{name}-ff{off}"] = bytes(marker)
        zeros = bytearray(data)
        zeros[off : off + 16] = bytes(16)
        out[f"{name}-zeros{off}"] = bytes(zeros)
    sof = next(i for i in (data.find(b"\xff\xc0"), data.find(b"\xff\xc2")) if i > 0)
    out[f"{name}-zero-size"] = data[: sof + 5] + bytes(4) + data[sof + 9 :]
    dht = data.find(b"\xff\xc4")
    out[f"{name}-bad-huffman"] = data[: dht + 5] + b"\xff" * 16 + data[dht + 21 :]
    out[f"{name}-header-only"] = data[:sos]
    return out


def _corpus() -> dict[str, bytes]:
    corpus: dict[str, bytes] = {}
    for name, data in _sources().items():
        corpus.update(_damaged(name, data))
    progressive = _sources()["progressive"]
    scans = [i for i in range(len(progressive)) if progressive.startswith(b"\xff\xda", i)]
    third = scans[2]  # cut in the middle of the third scan's entropy-coded data
    corpus["progressive-mid-scan"] = progressive[: (third + scans[3]) // 2]
    corpus["zero-byte"] = b""
    corpus["text"] = b"just some text, not an image\n"
    corpus["jpeg-signature-then-garbage"] = b"\xff\xd8\xff" + bytes(range(256)) * 4
    corpus["png-signature-then-garbage"] = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    return corpus


def _outcome(data: bytes):
    try:
        return probe_image(data)
    except MediaError as e:
        return e.reason


def test_quick_verification_rejects_what_a_full_decode_rejects(monkeypatch):
    corpus = _corpus()
    monkeypatch.setenv(ENV_VERIFY, "full")
    full = {name: _outcome(data) for name, data in corpus.items()}
    monkeypatch.delenv(ENV_VERIFY)
    quick = {name: _outcome(data) for name, data in corpus.items()}
    assert quick == full  # every reason, and every good file's size, format and orientation
    # The damage is the kind verification exists for: the cut files are caught as cut...
    for name in _sources():
        for k in (0.3, 0.5, 0.8, 0.97):
            assert quick[f"{name}-cut{k}"] == "truncated", name
        if name != "png":  # a PNG cut inside its closing IEND chunk still decodes, as ever
            assert quick[f"{name}-short7"] == "truncated", name
    assert quick["progressive-mid-scan"] == "truncated"
    # ... bad headers and non-images get their own reasons...
    assert quick["zero-byte"] == "zero_byte"
    assert quick["text"] == "not_image"
    assert quick["jpeg-signature-then-garbage"] == "corrupt"
    assert quick["png-signature-then-garbage"] == "corrupt"
    assert quick["large-zero-size"] == "corrupt"
    assert quick["png-idat-flip"] == "corrupt"
    # ... and the good files keep their full size although decoded at 1/8.
    assert (quick["large-ok"].width, quick["large-ok"].height) == (640, 480)
    assert (quick["cmyk-ok"].format, quick["png-ok"].format) == ("jpeg", "png")
    # The corpus is a real test of the decoder: many files of each kind of damage are caught.
    reasons = [v for v in quick.values() if isinstance(v, str)]
    assert min(reasons.count("truncated"), reasons.count("corrupt")) >= 40


def test_quick_verification_keeps_the_displayed_size_of_rotated_jpegs():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° clockwise
    data = encode(Image.fromarray(_photo(640, 480, 2)), "JPEG", exif=exif)
    info = probe_image(data)
    assert (info.width, info.height, info.orientation) == (480, 640, 6)


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_a_decode_time_limit_below_a_second_still_rejects_small_images(monkeypatch, mode):
    # A tight limit sends even an image small enough for the calling thread to the
    # time-limited helper, so the limit holds as it did before.
    side = 1000
    assert side * side <= QUICK_PIXELS
    noise = np.random.default_rng(3).integers(0, 256, (side, side, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=95)
    monkeypatch.setenv(ENV_VERIFY, mode)
    monkeypatch.setenv(ENV_DECODE_TIMEOUT, "0.000001")
    with pytest.raises(MediaError) as e:
        probe_image(data)
    assert e.value.reason == "decode_timeout"


def test_ingest_rejects_and_rows_are_the_same_with_either_verification(tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    for name, data in _corpus().items():
        (folder / (name + (".png" if name.startswith("png") else ".jpg"))).write_bytes(data)
    outputs = {}
    for mode in ("quick", "full"):
        out = tmp_path / mode
        mmtools("ingest", folder, "-o", out, "-q", env={ENV_VERIFY: mode})
        columns = ["id", "width", "height", "image_format", "image_nbytes", "image_sha256"]
        rows = sorted(read_dataset(out).select(columns).to_pylist(), key=lambda r: r["id"])
        rejects = {r["id"]: r["reason"] for r in read_rejects(out).to_pylist()}
        outputs[mode] = rows, rejects
    assert outputs["quick"] == outputs["full"]
    rows, rejects = outputs["quick"]
    assert len(rows) + len(rejects) == len(_corpus())
    assert rejects["progressive-mid-scan.jpg"] == "truncated"
    assert rejects["zero-byte.jpg"] == "zero_byte"
