"""Reading, probing and decoding image and audio; bad media raise `MediaError(reason)`.

Every step gets media bytes through `read`, so a row fails for the same reason everywhere:
`no_media` (neither bytes nor a path), `missing_file` (a file or object-store key that cannot
be read), a URL's download reasons (`timeout`, `http_error`, `connection_error`, `dns_error`,
`too_large`, `opted_out`; see `mmtools.io.http`), then the decoders' `zero_byte`, `corrupt`,
`truncated`, `not_image`, `not_audio`, `empty_audio`, `decompression_bomb` and
`decode_timeout`.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (about 0.25 GiB RGBA).
MAX_JPEG_SCANS = 100  # progressive JPEGs have ~10; thousands take minutes to decode
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # not stuffing, a restart or fill
ENV_DECODE_TIMEOUT = "MMTOOLS_DECODE_TIMEOUT"  # seconds one image may take to decode
DEFAULT_DECODE_TIMEOUT = 60.0
ENV_DECODE_PIXELS = "MMTOOLS_DECODE_PIXELS"  # pixels all decoding threads may hold at once
ENV_VERIFY = "MMTOOLS_VERIFY"  # "full": verify every image by a full-size decode in a helper
# An image this small (and in one of _QUICK_FORMATS) decodes in milliseconds: verifying it in
# the calling thread skips the hand-off to a time-limited helper, which costs as much as the
# decode itself. Under a decode time limit below QUICK_MIN_LIMIT every image takes the helper.
QUICK_PIXELS = 1 << 20
QUICK_BYTES = 4 << 20
QUICK_MIN_LIMIT = 1.0
_QUICK_FORMATS = {"jpeg": "JPEG", "png": "PNG"}
ENV_FETCH_TIMEOUT = "MMTOOLS_FETCH_TIMEOUT"  # seconds a URL may take, retries included
DEFAULT_FETCH_TIMEOUT = 30.0

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".opus", ".aiff", ".aif"}


_SIGNATURES = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG": "png",
    b"GIF8": "gif",
    b"BM": "bmp",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"fLaC": "flac",
    b"OggS": "ogg",
    b"ID3": "mp3",
}
IMAGE_FORMATS = {"jpeg", "png", "gif", "bmp", "tiff", "webp"}


def sniff_format(data: bytes) -> str:
    """The container format from the first bytes ('jpeg', 'png', 'wav', ...) or 'bytes'."""
    if data[:4] == b"RIFF":
        return {b"WEBP": "webp", b"WAVE": "wav"}.get(data[8:12], "bytes")
    return next((name for sig, name in _SIGNATURES.items() if data.startswith(sig)), "bytes")


class MediaError(Exception):
    """A per-row media problem: `reason` is a short code stored in the reject row."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read(value, kind: str, timeout: float | None = None) -> bytes:
    """The bytes of one `image`/`audio` cell: its inline bytes, else the file its path names.

    `value` is the {bytes, path} struct as a dict, a (bytes, path) pair, a pyarrow scalar or
    None. A path may be local, `file://`, `http(s)://`, or an object-store URI (`s3://`,
    `gs://`, ...); `timeout` (default `MMTOOLS_FETCH_TIMEOUT`) is a URL's deadline.
    """
    data, path = _parts(value)
    if data is None:
        if not path:
            raise MediaError("no_media", f"the row holds no {kind} bytes and no path")
        data = read_path(path, timeout)
    if not data:
        raise MediaError("zero_byte", "empty file")
    return data


def read_path(path: str, timeout: float | None = None, download=None) -> bytes:
    """The bytes of a local path, URL or object-store URI; `missing_file` if unreadable.

    A URL is downloaded with `download` (`mmtools.io.http.DownloadOptions`; by default
    those options with `timeout` as the deadline) and fails with the download's reasons.
    """
    from mmtools.io import http
    from mmtools.io.fs import read_file

    if http.is_url(path):
        if download is None:
            seconds = _seconds(ENV_FETCH_TIMEOUT, DEFAULT_FETCH_TIMEOUT, timeout)
            download = http.DownloadOptions(timeout=seconds)
        return http.download(path, download)
    try:
        return read_file(path)
    except OSError as e:
        detail = f"{path}: {e.strerror}" if e.strerror else str(e)
        raise MediaError("missing_file", detail) from None


def cells(column) -> list[tuple[bytes | None, str | None] | None]:
    """The (bytes, path) pairs of a media column (None where the cell is null), for `read`."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    nulls = column.is_null().to_pylist()
    data, paths = column.field("bytes").to_pylist(), column.field("path").to_pylist()
    return [None if z else (d, p) for z, d, p in zip(nulls, data, paths, strict=True)]


def _parts(value) -> tuple[bytes | None, str | None]:
    if hasattr(value, "as_py"):  # a pyarrow StructScalar
        value = value.as_py()
    if value is None:
        return None, None
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    data, path = value
    return data, path


def _seconds(env: str, default: float, given: float | None = None) -> float:
    if given is not None:
        return given
    try:
        return float(os.environ.get(env) or default)
    except ValueError:
        return default


@dataclass
class ImageInfo:
    """What ingest records about an image."""

    width: int
    height: int
    format: str
    orientation: int = 1  # EXIF orientation (1-8) still to apply to the stored pixels


@dataclass
class AudioInfo:
    """What ingest records about an audio clip."""

    sample_rate: int
    channels: int
    duration: float
    format: str


def _open_image(data: bytes, max_pixels: int, quick: bool = False):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise MediaError("zero_byte", "empty file")
    Image.MAX_IMAGE_PIXELS = None  # we apply our own limit below, before decoding
    img = _open_as_sniffed(data) if quick else None
    try:
        img = Image.open(io.BytesIO(data)) if img is None else img
    except UnidentifiedImageError:
        if sniff_format(data) in IMAGE_FORMATS:
            raise MediaError("corrupt", f"damaged {sniff_format(data)} data") from None
        raise MediaError("not_image", "not a recognised image format") from None
    except OSError as e:  # the header ends early: Pillow says "Truncated File Read"
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise MediaError(reason, f"{type(e).__name__}: {e}") from None
    except Exception as e:
        raise MediaError("corrupt", f"{type(e).__name__}: {e}") from None
    if img.width * img.height > max_pixels:
        raise MediaError(
            "decompression_bomb",
            f"{img.width}x{img.height} exceeds the limit of {max_pixels} pixels",
        )
    if _format(img) == "JPEG" and (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
        raise MediaError("decompression_bomb", f"{scans} JPEG scans (at most {MAX_JPEG_SCANS})")
    return img


def _format(img) -> str:
    """Pillow's format of an opened image; a phone's MPO (a JPEG with frames appended) is the
    JPEG its first frame, the one decoded, is."""
    return "JPEG" if img.format == "MPO" else (img.format or "unknown")


def jpeg_scans(data: bytes) -> int:
    """The start-of-scan segments of a JPEG's first image, walked as a decoder does: each
    segment skipped by its length, each scan's entropy-coded data to the next marker (there
    0xFF is followed by 0x00 or a restart), up to the end of image. So FFDA bytes in
    metadata (a comment, an EXIF thumbnail, an ICC profile) and images appended after it
    (MPO frames) do not count, and an end-of-image hidden in a segment ends nothing."""
    scans, i, n = 0, 2, len(data)
    while i + 4 <= n:
        marker = data[i + 1] if data[i] == 0xFF else None
        if marker is None or marker == 0xFF:  # junk or a fill byte: on to the next marker
            found = _JPEG_MARKER.search(data, i + 1)
            if found is None:
                break
            i = found.start()
            continue
        if marker == 0xD9:
            break
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:
            scans += 1
            found = _JPEG_MARKER.search(data, i)
            if found is None:
                break
            i = found.start()
    return scans


def _open_as_sniffed(data: bytes):
    """The image opened by the one Pillow plugin its signature names (JPEG, PNG), or None.

    Pillow alone tries its plugins in turn (for a JPEG, three without a signature check parse
    the header first); none of those can take data that starts with the JPEG or PNG
    signature, so the plugin is the one Pillow would reach. Data it refuses gets None,
    and the caller's Pillow-wide open gives the reason, as for any image.
    """
    from PIL import Image

    plugin = _QUICK_FORMATS.get(sniff_format(data))
    if plugin is None:
        return None
    try:
        return Image.open(io.BytesIO(data), formats=[plugin])
    except Exception:
        return None


def _load(img, inline: bool = False) -> None:
    """Decode the pixels, within the decode time limit (`inline`: in this thread)."""
    try:
        img.load() if inline else within_time_limit(img.load)
    except MediaError:
        raise
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise MediaError(reason, str(e)) from None
    except Exception as e:
        raise MediaError("corrupt", f"{type(e).__name__}: {e}") from None


def within_time_limit(fn):
    """`fn()`, run by a helper thread; past the decode time limit, reject the item
    (`decode_timeout`) and leave the helper to it.

    A decoder stuck in C cannot be stopped from Python; the abandoned helper finishes (or
    dies with the process) on its own, and another takes its place.
    """
    limit = _seconds(ENV_DECODE_TIMEOUT, DEFAULT_DECODE_TIMEOUT)
    if limit <= 0:
        return fn()
    call = _HELPERS.start(fn)
    if not call.done.wait(limit):
        raise MediaError("decode_timeout", f"decoding took more than {limit:g} s")
    if call.error is not None:
        raise call.error
    return call.result


class _Call:
    """One call handed to a helper thread, and its outcome."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn):
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None


class _Helpers:
    """Daemon threads that run calls for callers who wait a limited time (a thread per call
    would cost more than decoding a small image). There are as many as calls ever ran at
    once, plus those still stuck in a call their caller gave up on."""

    def __init__(self):
        self.calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0

    def start(self, fn) -> _Call:
        """Hand `fn` to an idle helper, or to a new one when none is idle."""
        call = _Call(fn)
        with self.lock:
            if self.idle:
                self.idle -= 1
            else:
                threading.Thread(target=self._serve, daemon=True, name="mmtools-decode").start()
        self.calls.put(call)
        return call

    def _serve(self) -> None:
        while True:
            call = self.calls.get()
            try:
                call.result = call.fn()
            except BaseException as e:  # handed to the caller's thread
                call.error = e
            call.fn = None
            with self.lock:  # idle before the caller hears: its next call finds this thread
                self.idle += 1
            call.done.set()


_HELPERS = _Helpers()


class _PixelBudget:
    """Pixels that the decoding threads of a process may hold at once.

    One image at the size limit takes the whole budget, so a few legal but huge images
    decode one after another instead of together; ordinary images share it freely.
    """

    def __init__(self, total: int):
        self.total, self.free = total, total
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Wait until `pixels` (at most the whole budget) are free; hold them meanwhile."""
        n = min(pixels, self.total)
        with self.cond:
            self.cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self.cond:
                self.free += n
                self.cond.notify_all()


def _budget_pixels() -> int:
    try:
        return int(os.environ.get(ENV_DECODE_PIXELS) or DEFAULT_MAX_PIXELS)
    except ValueError:
        return DEFAULT_MAX_PIXELS


PIXEL_BUDGET = _PixelBudget(_budget_pixels())


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = True):
    """Check an image decodes; return its size and format.

    Verification decodes all of the image's data. A JPEG decodes at 1/8 scale: libjpeg still
    reads every scan's entropy-coded data, so a truncated or damaged file fails as it does at
    full size, but most of the inverse DCT, upsampling and colour conversion is skipped. A
    small JPEG or PNG decodes in this thread (see QUICK_PIXELS).
    `MMTOOLS_VERIFY=full` decodes every image at full size in a time-limited helper instead.
    """
    quick = os.environ.get(ENV_VERIFY, "").lower() != "full"
    img = _open_image(data, max_pixels, quick)
    fmt = _format(img).lower()
    full_size, reduced = img.size, False
    if verify:
        inline = quick and _decodes_quickly(img, len(data))
        if quick and fmt == "jpeg":
            reduced = img.draft(img.mode, (1, 1)) is not None
        with PIXEL_BUDGET.hold(img.width * img.height):
            _load(img, inline)
    width, height = full_size if reduced else img.size
    orientation = _orientation(img)
    if orientation in (5, 6, 7, 8):  # EXIF-rotated by 90°: report the displayed size
        width, height = height, width
    return ImageInfo(width, height, fmt, orientation)


def _decodes_quickly(img, nbytes: int) -> bool:
    """Whether an opened image is a JPEG or PNG small enough to decode in milliseconds, and
    the decode time limit (when one is set) is far above that."""
    limit = _seconds(ENV_DECODE_TIMEOUT, DEFAULT_DECODE_TIMEOUT)
    return (
        _format(img) in _QUICK_FORMATS.values()
        and img.width * img.height <= QUICK_PIXELS
        and nbytes <= QUICK_BYTES
        and (limit <= 0 or limit >= QUICK_MIN_LIMIT)
    )


def _orientation(img) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 when it has none or a broken one."""
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block should not cost the image
        return 1
    return value if 1 <= value <= 8 else 1


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, hold: bool = True):
    """Decode to an upright RGB PIL image (EXIF orientation applied, alpha over white);
    `hold=False` where the caller already holds the image's pixels against the budget."""
    if not hold:
        return _upright_rgb(_open_image(data, max_pixels))
    with decoded_image(data, max_pixels) as img:
        return img


@contextlib.contextmanager
def decoded_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 0, longest: bool = False
):
    """`decode_image` as a context: the image's pixels count against the shared decoding
    budget (`MMTOOLS_DECODE_PIXELS`) until the caller is done with it. With `min_side`, a
    JPEG decodes at the smallest of 1/2, 1/4 and 1/8 scale (libjpeg's DCT scaling) that keeps
    its shorter side (its longer one with `longest`) at least `min_side` pixels, as Pillow's
    thumbnail() does."""
    img = _open_image(data, max_pixels, quick=True)
    w, h = img.size
    side = max(w, h) if longest else min(w, h)
    if min_side and _format(img) == "JPEG" and side >= 2 * min_side:
        img.draft(img.mode, (-(-w * min_side // side), -(-h * min_side // side)))
    with PIXEL_BUDGET.hold(img.width * img.height):
        yield _upright_rgb(img, _decodes_quickly(img, len(data)))


def _upright_rgb(img, inline: bool = False):
    from PIL import Image, ImageOps

    _load(img, inline)
    with contextlib.suppress(Exception):  # a broken EXIF block should not cost the image
        ImageOps.exif_transpose(img, in_place=True)
    if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":  # over white, with one full-size copy (the RGB result)
        rgb = Image.new("RGB", img.size, (255, 255, 255))
        rgb.paste(img, mask=img)
        return rgb
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        full_scale = max(65535.0, float(arr.max()))
        img = Image.fromarray(np.rint(arr * (255.0 / full_scale)).astype("uint8"), "L")
    return img.convert("RGB")


def probe_audio(data: bytes) -> AudioInfo:
    """Read an audio header; reject empty, silent-length or non-audio bytes."""
    import soundfile as sf

    if not data:
        raise MediaError("zero_byte", "empty file")
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as e:
        raise MediaError("not_audio", str(e).splitlines()[0][:200]) from None
    if info.frames <= 0:
        raise MediaError("empty_audio", "the file holds no samples")
    return AudioInfo(
        info.samplerate, info.channels, info.frames / info.samplerate, info.format.lower()
    )


def decode_audio(data: bytes, sample_rate: int | None = None, mono: bool = True):
    """Decode audio to float32 numpy, optionally resampled and mixed down to mono."""
    import numpy as np
    import soundfile as sf

    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise MediaError("not_audio", str(e).splitlines()[0][:200]) from None
    if wav.shape[0] == 0:
        raise MediaError("empty_audio", "the file holds no samples")
    wav = wav.T  # (channels, samples)
    if mono:
        wav = wav.mean(axis=0)
    if sample_rate and sr != sample_rate:
        import librosa

        wav = librosa.resample(wav, orig_sr=sr, target_sr=sample_rate)
        sr = sample_rate
    if not np.isfinite(wav).all():
        raise MediaError("corrupt", "audio holds NaN or infinite samples")
    return wav.astype(np.float32), sr
