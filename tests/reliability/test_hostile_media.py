"""Hostile media must not push a worker past a memory budget (2 GiB RSS) or hang it.

Each run's peak RSS is the kernel's high-water mark of its own address space (VmHWM, read
while it runs: wait4's ru_maxrss would report this test process's own peak, which Linux
carries into a child across fork and exec). Files that lie about their
size, carry compressed-metadata bombs or thousands of frames are cheap to reject; images
that are legal but huge, and JPEGs that take minutes to decode, need a pixel budget and a
per-item decode time limit.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import time
import zlib

import numpy as np
from conftest import MMTOOLS, image_bytes, jpeg_scans, mmtools, photographs
from harness import THREADS, media_file, outcome, png_header, tiny_clip
from PIL import Image

from mmtools.media import ENV_DECODE_TIMEOUT, MAX_JPEG_SCANS

BUDGET = 2 << 30


def run_measured(argv: list, log, timeout: float, env: dict | None = None):
    """Run `mmtools ARGV`; return (exit code or None if it ran past `timeout`, peak RSS, s)."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [*MMTOOLS, *map(str, argv)], stderr=err, env={**os.environ, **THREADS, **(env or {})}
        )
    t0, code, peak = time.monotonic(), None, 0
    while True:
        peak = max(peak, _high_water(proc.pid))
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() - t0 > timeout:
            proc.kill()
            os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    proc.returncode = code  # reaped here; keep Popen from waiting again
    return code, peak, time.monotonic() - t0


def _high_water(pid: int) -> int:
    """Bytes of the peak RSS of `pid`'s address space so far (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def metadata_bomb(kind: bytes) -> bytes:
    """An 8x8 PNG with a zTXt or iCCP chunk that inflates to 200 MiB."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    png = buf.getvalue()
    bomb = zlib.compress(b"A" * (200 << 20), 9)
    head = b"Comment\x00\x00" if kind == b"zTXt" else b"icc\x00\x00"
    return png[:33] + _chunk(kind, head + bomb) + png[33:]


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims `width` x `height`."""
    data = bytearray(image_bytes(0, size=(16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def many_frames_gif(frames: int = 3000) -> bytes:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8), "L") for _ in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, "GIF", save_all=True, append_images=imgs[1:])
    return buf.getvalue()


def test_lying_headers_and_metadata_bombs_are_cheap_rejects(tmp_path):
    model = tiny_clip(tmp_path)
    images = {
        "png_claims_10g_pixels.png": png_header(100_000, 100_000),
        "jpeg_claims_3g_pixels.jpg": jpeg_claiming(60_000, 60_000),
        "ztxt_bomb.png": metadata_bomb(b"zTXt"),
        "iccp_bomb.png": metadata_bomb(b"iCCP"),
        "many_frames.gif": many_frames_gif(),
        "good.jpg": image_bytes(1),
    }
    media_file(tmp_path / "in.parquet", images)
    out = tmp_path / "out"
    argv = ["embed", tmp_path / "in.parquet", "--model", model, "--pretrained", "none"]
    argv += ["--device", "cpu", "--workers", "2", "-q", "-o", out]
    code, rss, _ = run_measured(argv, tmp_path / "log", timeout=300)
    assert code == 0, (tmp_path / "log").read_text()
    assert rss < BUDGET
    rows, rejects = outcome(out)
    assert set(rows) == {"many_frames.gif", "good.jpg"}
    assert rejects == {
        "png_claims_10g_pixels.png": "decompression_bomb",
        "jpeg_claims_3g_pixels.jpg": "decompression_bomb",
        "ztxt_bomb.png": "corrupt",
        "iccp_bomb.png": "corrupt",
    }


def zero_rgba_png(side: int) -> bytes:
    """A side x side RGBA PNG of zeros: 1.4 MB on disk, side * side * 4 bytes decoded."""
    row = b"\x00" * (1 + 4 * side)
    deflate = zlib.compressobj(1)
    parts = [deflate.compress(row * 100) for _ in range(side // 100)]
    parts.append(deflate.compress(row * (side % 100)) + deflate.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


def test_huge_legal_images_stay_within_the_memory_budget(tmp_path):
    model = tiny_clip(tmp_path)
    big = zero_rgba_png(9000)
    images = {"big1.png": big, "big2.png": big, "big3.png": big, "good.jpg": image_bytes(1)}
    media_file(tmp_path / "in.parquet", images)
    out = tmp_path / "out"
    argv = ["embed", tmp_path / "in.parquet", "--model", model, "--pretrained", "none"]
    argv += ["--device", "cpu", "--workers", "3", "-q", "-o", out]
    code, rss, _ = run_measured(argv, tmp_path / "log", timeout=300)
    assert code == 0, (tmp_path / "log").read_text()
    rows, rejects = outcome(out)
    assert set(rows) | set(rejects) == set(images) and "good.jpg" in rows
    assert rss < BUDGET


def scan_bomb(side: int = 4000, repeats: int = 12000) -> bytes:
    """A ~400 KB progressive JPEG whose last scan is repeated: minutes of decoding."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    start, end = jpeg_scans(data)[-1]
    return data[:start] + data[start:end] * repeats + data[start:]


def test_an_image_that_takes_minutes_to_decode_is_rejected_in_seconds(tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "slow.jpg").write_bytes(scan_bomb())
    for i in range(5):
        (folder / f"ok{i}.jpg").write_bytes(image_bytes(i))
    out = tmp_path / "out"
    argv = ["ingest", folder, "-q", "-o", out]
    code, _, seconds = run_measured(argv, tmp_path / "log", 20, {"MMTOOLS_DECODE_TIMEOUT": "2"})
    assert code == 0 and seconds < 20
    rows, rejects = outcome(out)
    assert set(rows) == {f"ok{i}.jpg" for i in range(5)}
    # Thousands of scans: refused by their count before any decoding starts.
    assert rejects == {"slow.jpg": "decompression_bomb"}


def test_only_the_decoded_images_own_scans_count(tmp_path):
    """A photograph with FFDA bytes in its metadata and a phone's MPO (frames appended to a
    JPEG) are kept; an MPO whose first frame has hundreds of scans is refused by the count,
    as a JPEG is, before it is decoded, also when an end-of-image marker hides in a comment
    between its scans."""
    photo = photographs()["grace_hopper.jpg"]
    comment = b"\xff\xfe" + (2 + 300).to_bytes(2, "big") + b"\xff\xda" * 150  # COM
    tagged = photo[:2] + comment + photo[2:]
    img = Image.open(io.BytesIO(photo))
    buf = io.BytesIO()
    frames = [img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] * 12
    img.save(buf, "MPO", save_all=True, append_images=frames, progressive=True)
    phone = buf.getvalue()
    assert Image.open(io.BytesIO(phone)).format == "MPO"
    start, end = jpeg_scans(phone)[-1]  # the first frame's last scan
    bomb = phone[:start] + phone[start:end] * 300 + phone[start:]
    # The same scans behind a comment, between two scans, that holds an end-of-image marker.
    hidden = phone[:start] + b"\xff\xfe\x00\x04\xff\xd9" + phone[start:end] * 300 + phone[start:]
    images = {"tagged.jpg": tagged, "phone.jpg": phone, "bomb.jpg": bomb, "hidden.jpg": hidden}
    folder = tmp_path / "media"
    folder.mkdir()
    for name, data in images.items():
        assert data.count(b"\xff\xda") > MAX_JPEG_SCANS
        (folder / name).write_bytes(data)
    mmtools("ingest", folder, "-q", "-o", tmp_path / "out")
    rows, rejects = outcome(tmp_path / "out")
    assert set(rows) == {"tagged.jpg", "phone.jpg"}
    assert rejects == {"bomb.jpg": "decompression_bomb", "hidden.jpg": "decompression_bomb"}
    assert all((rows[k]["width"], rows[k]["height"]) == img.size for k in rows)
    assert {rows[k]["image_format"] for k in rows} == {"jpeg"}  # an MPO is a JPEG's frames


def test_a_legal_image_slower_than_the_decode_time_limit_is_a_decode_timeout(tmp_path):
    """86 scans (under the scan limit) of 4000x4000 pixels: about a second to decode."""
    slow = scan_bomb(repeats=80)
    assert slow.count(b"\xff\xda") <= MAX_JPEG_SCANS
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "slow.jpg").write_bytes(slow)
    for i in range(3):
        (folder / f"ok{i}.jpg").write_bytes(image_bytes(i))
    ok = {f"ok{i}.jpg" for i in range(3)}
    mmtools("ingest", folder, "-q", "-o", tmp_path / "limited", env={ENV_DECODE_TIMEOUT: "0.1"})
    rows, rejects = outcome(tmp_path / "limited")
    assert set(rows) == ok and rejects == {"slow.jpg": "decode_timeout"}
    mmtools("ingest", folder, "-q", "-o", tmp_path / "default")  # the default limit: 60 s
    rows, rejects = outcome(tmp_path / "default")
    assert set(rows) == ok | {"slow.jpg"} and rejects == {}


def test_decoding_processes_keep_the_bounds_on_hostile_media(tmp_path):
    """`embed --decode-in processes`: a JPEG of thousands of scans is refused by its count, a
    legal one slower than the decode time limit is a decode_timeout (the limit reaches the
    processes), lying and bomb headers are rejected as in threads; the other rows come out."""
    model = tiny_clip(tmp_path)
    images = {
        "scans.jpg": scan_bomb(),
        "slow.jpg": scan_bomb(repeats=80),
        "png_claims_10g_pixels.png": png_header(100_000, 100_000),
        "ztxt_bomb.png": metadata_bomb(b"zTXt"),
        **{f"ok{i}.jpg": image_bytes(i) for i in range(3)},
    }
    media_file(tmp_path / "in.parquet", images)
    out = tmp_path / "out"
    argv = ["embed", tmp_path / "in.parquet", "--model", model, "--pretrained", "none"]
    argv += ["--device", "cpu", "--workers", "2", "--decode-in", "processes", "-q", "-o", out]
    code, _, _ = run_measured(argv, tmp_path / "log", 120, {ENV_DECODE_TIMEOUT: "0.1"})
    assert code == 0, (tmp_path / "log").read_text()
    rows, rejects = outcome(out)
    assert set(rows) == {f"ok{i}.jpg" for i in range(3)}
    assert rejects == {
        "scans.jpg": "decompression_bomb",
        "slow.jpg": "decode_timeout",
        "png_claims_10g_pixels.png": "decompression_bomb",
        "ztxt_bomb.png": "corrupt",
    }
