"""Resizing at ingest: img2dataset's size rules, filters, encodings and OpenCV pixels."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from conftest import encode, mmtools, read_dataset, reject_reasons
from PIL import Image

from mmtools.media import MediaError, probe_image
from mmtools.steps.ingest.resize import ResizeOptions, check_size, output_size, resize_image

N = 64
SIZES = [(100, 100), (300, 100), (50, 200), (40, 30), (333, 127)]  # square, 3:1, 1:4, small, odd
# (width, height) out for each size above, from img2dataset's rules with --image-size 64:
# scale = 64 / (shorter or longer side), new side = round(side * scale), then crop or pad.
EXPECTED = {
    "no": [(100, 100), (300, 100), (50, 200), (40, 30), (333, 127)],
    "keep_ratio": [(64, 64), (192, 64), (64, 256), (85, 64), (168, 64)],
    "keep_ratio_largest": [(64, 64), (64, 21), (16, 64), (64, 48), (64, 24)],
    "center_crop": [(64, 64)] * 5,
    "border": [(64, 64)] * 5,
}
# With --resize-only-if-bigger, images whose deciding side is at most 64 stay as they are.
EXPECTED_ONLY_IF_BIGGER = {
    "keep_ratio": [(64, 64), (192, 64), (50, 200), (40, 30), (168, 64)],
    "keep_ratio_largest": [(64, 64), (64, 21), (16, 64), (40, 30), (64, 24)],
    "center_crop": [(64, 64), (64, 64), (50, 200), (40, 30), (64, 64)],
    "border": [(64, 64), (64, 64), (64, 64), (40, 30), (64, 64)],
}


def noise(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth random pixels (H, W, C), so that resampling has something to do."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 4), max(2, width // 4), channels), np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def png(width: int, height: int, seed: int = 0) -> bytes:
    return encode(Image.fromarray(noise(width, height, seed)), "PNG")


def jpeg(width: int, height: int, seed: int = 0, **save) -> bytes:
    return encode(Image.fromarray(noise(width, height, seed)), "JPEG", quality=90, **save)


def resize(data: bytes, **opts):
    """What ingest stores for `data`: (bytes, width, height, format); the same bytes if kept."""
    options = ResizeOptions(**{"image_size": N, **opts})
    info = probe_image(data)
    check_size(options, info.width, info.height)
    out = resize_image(data, info, options)
    if out is None:
        return data, info.width, info.height, info.format
    return out.data, out.width, out.height, out.format


def decoded(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_output_sizes_follow_img2dataset(mode):
    for (w, h), expected in zip(SIZES, EXPECTED[mode], strict=True):
        data, width, height, _ = resize(png(w, h), resize_mode=mode, encode_format="png")
        assert (width, height) == expected, (mode, w, h)
        assert decoded(data).shape[:2] == (height, width)
        assert output_size(ResizeOptions(image_size=N, resize_mode=mode), w, h) == expected


@pytest.mark.parametrize("mode", list(EXPECTED_ONLY_IF_BIGGER))
def test_resize_only_if_bigger(mode):
    for (w, h), expected in zip(SIZES, EXPECTED_ONLY_IF_BIGGER[mode], strict=True):
        opts = {"resize_mode": mode, "resize_only_if_bigger": True}
        assert resize(png(w, h), **opts)[1:3] == expected, (mode, w, h)
    small = jpeg(40, 30)
    assert resize(small, resize_mode=mode, resize_only_if_bigger=True) == (small, 40, 30, "jpeg")


def test_rounding_is_pythons_and_sides_stay_positive():
    """round() sends halves to even: 10x5 -> 5x2.5 -> 5x2, 14x7 -> 7x3.5 -> 7x4."""
    largest = {"resize_mode": "keep_ratio_largest"}
    assert output_size(ResizeOptions(image_size=5, **largest), 10, 5) == (5, 2)
    assert output_size(ResizeOptions(image_size=7, **largest), 14, 7) == (7, 4)
    assert output_size(ResizeOptions(image_size=64, **largest), 1000, 1) == (64, 1)
    assert resize(png(1000, 3), **largest)[1:3] == (64, 1)


def test_pixels_equal_a_direct_opencv_computation():
    """Downscaling (INTER_AREA) then white border, and upscaling (INTER_LANCZOS4)."""
    src = jpeg(333, 127)
    img = decoded(src)
    down = cv2.resize(img, (64, 24), interpolation=cv2.INTER_AREA)
    bordered = cv2.copyMakeBorder(down, 20, 20, 0, 0, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    expected = cv2.imencode(".jpg", bordered, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    assert resize(src, resize_mode="border")[0] == expected

    src = png(40, 30)
    up = cv2.resize(decoded(src), (85, 64), interpolation=cv2.INTER_LANCZOS4)
    out = resize(src, resize_mode="center_crop", encode_format="png")[0]
    assert np.array_equal(decoded(out), up[:, 10:74])


def test_size_filters_reject_with_reasons():
    with pytest.raises(MediaError) as e:
        resize(png(40, 30), min_image_size=31)
    assert e.value.reason == "too_small" and "40x30" in e.value.detail
    assert resize(png(40, 30), min_image_size=30)[1:3] == (40, 30)
    with pytest.raises(MediaError) as e:
        resize(png(50, 200), max_aspect_ratio=3)
    assert e.value.reason == "bad_aspect" and "--max-aspect-ratio 3" in e.value.detail
    assert resize(png(300, 100), max_aspect_ratio=3)[1:3] == (300, 100)  # 3.0 is not over 3
    with pytest.raises(MediaError) as e:
        resize(png(300, 100), max_image_area=10_000)
    assert e.value.reason == "too_large_area"
    assert resize(png(100, 100), max_image_area=10_000)[1:3] == (100, 100)


@pytest.mark.parametrize(
    ("fmt", "low", "high", "pil_format"),
    [("jpg", 10, 95, "JPEG"), ("png", 0, 9, "PNG"), ("webp", 10, 95, "WEBP")],
)
def test_encode_format_and_quality(fmt, low, high, pil_format):
    src = png(200, 150)
    small, big = (
        resize(src, resize_mode="keep_ratio", encode_format=fmt, encode_quality=q)[0]
        for q in (low, high)
    )
    for data in (small, big):
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == pil_format and img.size == (85, 64)
            img.load()
    if fmt == "png":  # compression level: same pixels, fewer bytes
        assert len(big) < len(small) and np.array_equal(decoded(big), decoded(small))
    else:
        assert len(small) < len(big)
    assert resize(src, resize_mode="keep_ratio", encode_format=fmt)[3] == pil_format.lower()


def test_default_quality_and_bad_options():
    assert ResizeOptions().quality == 95 and ResizeOptions(encode_format="png").quality == 9
    from mmtools.errors import UsageError

    for bad in (
        {"resize_mode": "stretch"},
        {"encode_format": "gif"},
        {"encode_format": "png", "encode_quality": 95},
        {"image_size": 0},
    ):
        with pytest.raises(UsageError):
            ResizeOptions(**bad)


def test_mode_no_keeps_bytes_unless_a_format_is_asked():
    src = png(300, 100)
    assert resize(src) == (src, 300, 100, "png")
    data, width, height, fmt = resize(src, encode_format="jpg")
    assert (width, height, fmt) == (300, 100, "jpeg") and data.startswith(b"\xff\xd8")


def test_exif_rotated_jpeg_comes_out_upright():
    """Stored 40x20 with a white top-left corner, EXIF orientation 6 (turn 90° clockwise)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:8, :8] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    src = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    data, width, height, _ = resize(src, resize_mode="keep_ratio_largest")
    assert (width, height) == (32, 64)  # displayed 20x40, longer side to 64
    out = decoded(data)
    assert out.shape[:2] == (64, 32)
    assert out[:8, -8:].mean() > 200 and out[:8, :8].mean() < 50  # the corner is now top-right


def test_alpha_is_flattened_over_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 128)  # half red
    rgba[0, 2] = (0, 0, 255, 0)  # transparent blue
    src = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    data, width, height, fmt = resize(src, encode_format="png")
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGB" and (width, height, fmt) == (3, 2, "png")
        # alpha / 255 * colour + 255 - alpha, rounded: 128/255*255 + 127 = 255; 0 + 127 = 127
        assert img.getpixel((0, 0)) == (255, 0, 0)
        assert img.getpixel((1, 0)) == (255, 127, 127)
        assert img.getpixel((2, 0)) == (255, 255, 255)


def test_cli_center_crop_keeps_original_size(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "wide.png").write_bytes(png(300, 100))
    (src / "wide.txt").write_text("a wide one")
    (src / "small.jpg").write_bytes(jpeg(40, 30))
    (src / "thin.png").write_bytes(png(50, 200))
    (src / "tiny.png").write_bytes(png(10, 10))
    out = tmp_path / "ds"
    args = ["ingest", src, "-o", out, "--image-size", N, "--resize-mode", "center_crop"]
    mmtools(*args, "--min-image-size", 20, "--max-aspect-ratio", 3.5, "-q")
    rows = {r["id"]: r for r in read_dataset(out).to_pylist()}
    assert reject_reasons(out) == {"tiny.png": "too_small", "thin.png": "bad_aspect"}
    assert set(rows) == {"wide.png", "small.jpg"}
    wide = rows["wide.png"]
    assert (wide["width"], wide["height"]) == (64, 64)
    assert (wide["original_width"], wide["original_height"]) == (300, 100)
    assert wide["image_format"] == "jpeg" and wide["text"] == "a wide one"
    assert wide["image_nbytes"] == len(wide["image"]["bytes"])
    assert decoded(wide["image"]["bytes"]).shape == (64, 64, 3)
    assert (rows["small.jpg"]["original_width"], rows["small.jpg"]["width"]) == (40, 64)

    # Resize options are part of the output's identity: other options do not resume it.
    proc = mmtools(*args[:-1], "border", check=False)
    assert proc.returncode == 6, proc.stderr.decode()


def test_cli_resizing_rejects_damaged_images_as_verifying_does(tmp_path):
    """Resizing decodes each image once, and that decode is its check: a truncated file is
    still `truncated`, not stored grey-filled."""
    src = tmp_path / "imgs"
    src.mkdir()
    good_jpg, good_png = jpeg(300, 100), png(300, 100)
    (src / "good.jpg").write_bytes(good_jpg)
    (src / "cut.jpg").write_bytes(good_jpg[: len(good_jpg) * 3 // 4])
    (src / "cut.png").write_bytes(good_png[: len(good_png) // 2])
    (src / "anim.gif").write_bytes(encode(Image.fromarray(noise(90, 60)), "GIF"))
    out = tmp_path / "ds"
    mmtools("ingest", src, "-o", out, "--image-size", N, "--resize-mode", "keep_ratio", "-q")
    assert reject_reasons(out) == {"cut.jpg": "truncated", "cut.png": "truncated"}
    rows = {r["id"]: r for r in read_dataset(out).to_pylist()}
    assert {k: (r["width"], r["height"]) for k, r in rows.items()} == {
        "good.jpg": (192, 64),
        "anim.gif": (96, 64),
    }
    assert rows["good.jpg"]["image"]["bytes"] == resize(good_jpg, resize_mode="keep_ratio")[0]


def test_cli_without_resizing_adds_no_columns_and_refuses_paths_only(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.png").write_bytes(png(30, 20))
    mmtools("ingest", src, "-o", tmp_path / "plain", "-q")
    table = read_dataset(tmp_path / "plain")
    assert "original_width" not in table.column_names
    assert table.column("image").to_pylist()[0]["bytes"] == (src / "a.png").read_bytes()
    proc = mmtools(
        "ingest", src, "-o", tmp_path / "p", "--paths-only", "--resize-mode", "border", check=False
    )
    assert proc.returncode == 2 and "--paths-only" in proc.stderr.decode()


def test_an_image_the_format_cannot_hold_is_rejected():
    """WebP holds at most 16383 pixels a side: 1000x3 with its shorter side to 64 cannot."""
    with pytest.raises(MediaError) as e:
        resize(png(1000, 3), resize_mode="keep_ratio", encode_format="webp")
    assert e.value.reason == "encode_error" and "21333x64" in e.value.detail
