"""Every bad or odd input file gives a reject row with a reason, or decodes; none is lost."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import encode, image_bytes, mmtools, read_dataset, read_rejects
from PIL import Image

from mmtools.media import ENV_DECODE_TIMEOUT, MediaError, decode_image, within_time_limit


def _png(mode: str, size=(40, 30), **kw) -> bytes:
    return encode(Image.new(mode, size), "PNG", **kw)


def _bad_corpus() -> dict[str, bytes]:
    jpeg = image_bytes(1, size=(64, 64))
    png = image_bytes(2, size=(64, 64), fmt="PNG")
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "zero.jpg": b"",
        "text.jpg": b"just some text, not an image\n",
        "bomb.png": _png("L", size=(4000, 4000)),
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    }


def _odd_but_valid() -> dict[str, bytes]:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° clockwise
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    return {
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "sixteen.png": encode(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"),
        "palette_alpha.png": encode(palette, "PNG", transparency=0),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated.webp": encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "rotated.jpg": encode(rgb, "JPEG", exif=exif),
        "png_named.jpg": encode(rgb, "PNG"),
    }


def test_bad_images_become_rejects(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for name, data in {**_bad_corpus(), **_odd_but_valid()}.items():
        (d / name).write_bytes(data)
    (d / "good.jpg").write_bytes(image_bytes(5))
    (d / "good.txt").write_bytes(b"caf\xe9 latin-1 caption")  # not UTF-8: read as cp1252
    (d / "binary.jpg").write_bytes(image_bytes(7))
    (d / "binary.txt").write_bytes(b"\x81\x8d\x00\x9d not text")  # no encoding reads it
    (d / "nul.jpg").write_bytes(image_bytes(6))
    (d / "nul.txt").write_bytes(b"a caption\x00with a NUL")
    out = tmp_path / "out"
    proc = mmtools("ingest", d, "-o", out, "--max-pixels", 10_000_000)
    assert b"Traceback" not in proc.stderr
    rows = {r["id"]: r for r in read_dataset(out).to_pylist()}
    rejects = {r["id"]: r["reason"] for r in read_rejects(out).to_pylist()}
    assert rejects == {
        "truncated.jpg": "truncated",
        "truncated.png": "truncated",
        "zero.jpg": "zero_byte",
        "text.jpg": "not_image",
        "bomb.png": "decompression_bomb",
        "garbage.png": "corrupt",
        "binary.jpg": "bad_caption",
    }
    assert set(rows) == set(_odd_but_valid()) | {"nul.jpg", "good.jpg"}
    assert (rows["good.jpg"]["text"], rows["good.jpg"]["text_encoding"]) == (
        "café latin-1 caption",
        "cp1252",
    )
    assert rows["nul.jpg"]["text"] == "a captionwith a NUL"
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (30, 40)
    assert rows["png_named.jpg"]["image_format"] == "png"
    # Nothing lost: every file is a row or a reject.
    assert len(rows) + len(rejects) == len(
        list(d.glob("*.jpg"))
        + list(d.glob("*.png"))
        + list(d.glob("*.gif"))
        + list(d.glob("*.webp"))
    )


@pytest.mark.parametrize("name", sorted(_odd_but_valid()))
def test_odd_modes_decode_to_upright_rgb(name):
    img = decode_image(_odd_but_valid()[name])
    assert img.mode == "RGB"
    expected = (30, 40) if name == "rotated.jpg" else (40, 30)
    assert img.size == expected


def test_sixteen_bit_is_scaled_not_clipped():
    img = decode_image(_odd_but_valid()["sixteen.png"])
    assert np.asarray(img).max() == round(40000 / 257)  # 16-bit full scale maps to 8-bit


def test_decode_rejects_bomb_before_decoding():
    with pytest.raises(MediaError) as e:
        decode_image(_png("L", size=(4000, 4000)), max_pixels=1_000_000)
    assert e.value.reason == "decompression_bomb"


def test_missing_file_in_listing(tmp_path, image_folder):
    listing = tmp_path / "l.csv"
    listing.write_text(
        f"path,caption\n{image_folder}/img00001.jpg,ok\n/nonexistent/x.jpg,gone\n"
        f"{image_folder}/img00001.jpg,twice\n"
    )
    out = tmp_path / "out"
    mmtools("ingest", listing, "-o", out)
    assert read_dataset(out).column("text").to_pylist() == ["ok"]
    assert sorted(r["reason"] for r in read_rejects(out).to_pylist()) == [
        "duplicate_id",
        "missing_file",
    ]


def test_small_jpegs_and_pngs_decode_for_a_model_in_the_calling_thread(monkeypatch):
    """Handing a 2 ms decode to a helper thread and back cost embed's decoding threads more
    than the decode (they queued for Python's lock); other images keep the time limit."""
    from mmtools import media

    noise = np.random.default_rng(5).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    large = np.random.default_rng(6).integers(0, 256, (1100, 1000, 3), dtype=np.uint8)
    helped = []
    real = media.within_time_limit
    monkeypatch.setattr(media, "within_time_limit", lambda fn: helped.append(1) or real(fn))
    cases = {
        "small jpeg": (encode(Image.fromarray(noise), "JPEG"), 0),
        "small png": (encode(Image.fromarray(noise), "PNG"), 0),
        "small webp": (encode(Image.fromarray(noise), "WEBP"), 1),
        "large jpeg": (encode(Image.fromarray(large), "JPEG"), 1),
    }
    for name, (data, helper_calls) in cases.items():
        helped.clear()
        assert decode_image(data).size == Image.open(io.BytesIO(data)).size
        assert len(helped) == helper_calls, name


def test_a_decode_time_limit_below_a_second_still_stops_a_small_image_decoded_for_a_model(
    monkeypatch,
):
    noise = np.random.default_rng(3).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=95)
    monkeypatch.setenv(ENV_DECODE_TIMEOUT, "0.000001")
    with pytest.raises(MediaError) as e:
        decode_image(data)
    assert e.value.reason == "decode_timeout"


def test_the_decode_time_limit_rejects_an_overrun_and_reuses_its_threads(monkeypatch):
    import threading
    import time

    monkeypatch.setenv(ENV_DECODE_TIMEOUT, "0.2")
    helpers = lambda: sum(t.name == "mmtools-decode" for t in threading.enumerate())  # noqa: E731
    within_time_limit(lambda: None)
    before = helpers()
    assert [within_time_limit(lambda i=i: i * 2) for i in range(50)] == list(range(0, 100, 2))
    assert helpers() == before  # one call after another: the same thread serves them all
    start = time.monotonic()
    with pytest.raises(MediaError) as e:
        within_time_limit(lambda: time.sleep(1))
    assert e.value.reason == "decode_timeout" and time.monotonic() - start < 0.9
    with pytest.raises(ZeroDivisionError):  # the call's own error reaches the caller
        within_time_limit(lambda: 1 / 0)
    assert within_time_limit(lambda: "next") == "next"  # another thread took over...
    assert time.monotonic() - start < 0.9  # ...while the abandoned one still sleeps
    # Threads left idle by earlier tests in this process may take over; at most one is new.
    assert before <= helpers() <= before + 1
    time.sleep(1.0)  # the abandoned call ends and its thread serves again
    after = helpers()
    assert [within_time_limit(lambda i=i: -i) for i in range(20)] == [-i for i in range(20)]
    assert helpers() == after


def test_a_jpeg_cut_inside_its_header_is_truncated_not_corrupt():
    """Pillow reports a header that ends early as "Truncated File Read" (capital T) while
    opening: the reason is still `truncated`, as for data cut after the header."""
    import io

    from PIL import Image

    from mmtools.media import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "JPEG", quality=90)
    for cut in (300, len(buf.getvalue()) // 2):
        with pytest.raises(MediaError) as e:
            decode_image(buf.getvalue()[:cut])
        assert (e.value.reason, e.value.detail) == ("truncated", "OSError: Truncated File Read")


def test_decoding_threads_hold_at_most_the_pixel_budget_at_once(monkeypatch):
    """MMTOOLS_DECODE_PIXELS (default 89 M, Pillow's size limit) bounds the pixels decoded
    images hold together: with room for one 40x40 image, five threads decoding take turns;
    an image larger than the whole budget still decodes, alone."""
    import os
    import subprocess
    import sys
    import threading
    import time

    import mmtools.media as media

    code = "import mmtools.media as m; print(m.PIXEL_BUDGET.total)"
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    env = {**os.environ, media.ENV_DECODE_PIXELS: "2500"}
    low = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert int(default.stdout) == media.DEFAULT_MAX_PIXELS == 89_478_485
    assert int(low.stdout) == 2500

    monkeypatch.setattr(media, "PIXEL_BUDGET", media._PixelBudget(2500))
    now, most, sizes, lock = [0], [0], [], threading.Lock()

    def decode(data: bytes) -> None:
        with media.decoded_image(data) as img:
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
                sizes.append(img.size)
            time.sleep(0.05)
            with lock:
                now[0] -= 1

    images = [image_bytes(k, size=(40, 40)) for k in range(4)] + [image_bytes(9, (60, 60))]
    threads = [threading.Thread(target=decode, args=(b,)) for b in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert most[0] == 1 and sorted(sizes) == [(40, 40)] * 4 + [(60, 60)]
    assert media.PIXEL_BUDGET.free == 2500
    # The same five with the default budget decode together.
    monkeypatch.setattr(media, "PIXEL_BUDGET", media._PixelBudget(media.DEFAULT_MAX_PIXELS))
    threads = [threading.Thread(target=decode, args=(b,)) for b in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert most[0] > 1
