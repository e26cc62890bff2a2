"""Safe probing and decoding of image and audio bytes; bad media raise `MediaError(reason)`."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (about 0.25 GiB RGBA).

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


@dataclass
class ImageInfo:
    """What ingest records about an image."""

    width: int
    height: int
    format: str


@dataclass
class AudioInfo:
    """What ingest records about an audio clip."""

    sample_rate: int
    channels: int
    duration: float
    format: str


def _open_image(data: bytes, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise MediaError("zero_byte", "empty file")
    Image.MAX_IMAGE_PIXELS = None  # we apply our own limit below, before decoding
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if sniff_format(data) in IMAGE_FORMATS:
            raise MediaError("corrupt", f"damaged {sniff_format(data)} data") from None
        raise MediaError("not_image", "not a recognised image format") from None
    except Exception as e:
        raise MediaError("corrupt", f"{type(e).__name__}: {e}") from None
    if img.width * img.height > max_pixels:
        raise MediaError(
            "decompression_bomb",
            f"{img.width}x{img.height} exceeds the limit of {max_pixels} pixels",
        )
    return img


def _load(img) -> None:
    try:
        img.load()
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) else "corrupt"
        raise MediaError(reason, str(e)) from None
    except Exception as e:
        raise MediaError("corrupt", f"{type(e).__name__}: {e}") from None


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = True):
    """Check an image fully decodes; return its size and format."""
    img = _open_image(data, max_pixels)
    fmt = (img.format or "unknown").lower()
    if verify:
        _load(img)
    width, height = img.size
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    if orientation in (5, 6, 7, 8):  # EXIF-rotated by 90°: report the displayed size
        width, height = height, width
    return ImageInfo(width, height, fmt)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode to an upright RGB PIL image (EXIF orientation applied, alpha over white)."""
    from PIL import Image, ImageOps

    img = _open_image(data, max_pixels)
    _load(img)
    with contextlib.suppress(Exception):  # a broken EXIF block should not cost the image
        img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
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
