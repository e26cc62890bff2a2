"""The arithmetic of mixup: pixel blends, waveform sums and slerp on the unit hypersphere.

Everywhere, `lam` is the weight of the first parent: `lam = 1` gives the first parent back.
"""

from __future__ import annotations

import io

import numpy as np

from mmtools.media import DEFAULT_MAX_PIXELS, MediaError, decode_audio, decode_image

IMAGE_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
AUDIO_FORMATS = {"wav": "WAV", "flac": "FLAC"}


class ParentError(Exception):
    """A parent of a pair could not be decoded; `which` is 0 (first) or 1 (second)."""

    def __init__(self, which: int, error: MediaError):
        super().__init__(str(error))
        self.which = which
        self.error = error


def blend(a: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:
    """Pixel-wise `lam * a + (1 - lam) * b` of two uint8 images of one shape, rounded."""
    # b + lam * (a - b) in place: a third of the passes over memory of the textbook form.
    out = a.astype(np.float32)
    out -= b
    out *= np.float32(lam)
    out += b
    out += np.float32(0.5)  # a convex combination stays in [0, 255]: truncation rounds
    return out.astype(np.uint8)


def encode_image(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    """Encode an RGB uint8 array as jpeg, png or webp."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(pixels, "RGB")
    if fmt == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, IMAGE_FORMATS[fmt], quality=quality)
    return buf.getvalue()


def mix_images(
    a: bytes,
    b: bytes,
    lam: float,
    fmt: str,
    quality: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[bytes, int, int]:
    """MixGen blend of two encoded images: (encoded mix, width, height).

    The second image is resized (bilinear, aspect ratio not kept) to the first one's size.
    """
    from PIL import Image

    first = _decode(0, a, decode_image, max_pixels)
    second = _decode(1, b, decode_image, max_pixels)
    if second.size != first.size:
        second = second.resize(first.size, Image.BILINEAR)
    pixels = blend(np.asarray(first), np.asarray(second), lam)
    return encode_image(pixels, fmt, quality), first.width, first.height


def mix_waveforms(a: np.ndarray, b: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """`lam * a + (1 - lam) * b`, the shorter zero-padded; scaled by 1/peak if it would clip.

    Returns the mix and the peak before normalisation.
    """
    n = max(len(a), len(b))
    mix = np.zeros(n, np.float64)
    mix[: len(a)] += lam * a.astype(np.float64)
    mix[: len(b)] += (1.0 - lam) * b.astype(np.float64)
    peak = float(np.abs(mix).max()) if n else 0.0
    if peak > 1.0:
        mix /= peak
    return mix.astype(np.float32), peak


def mix_audio(
    a: bytes, b: bytes, lam: float, fmt: str, sample_rate: int | None
) -> tuple[bytes, int, float]:
    """Mix two encoded clips at one rate: (encoded mono mix, sample rate, duration in s).

    Both are decoded to mono; the rate is `sample_rate`, or the first clip's own rate.
    """
    import soundfile as sf

    first, sr = _decode(0, a, decode_audio, sample_rate)
    second, _ = _decode(1, b, decode_audio, sr)
    mix, _ = mix_waveforms(first, second, lam)
    buf = io.BytesIO()
    sf.write(buf, mix, sr, format=AUDIO_FORMATS[fmt], subtype="PCM_16")
    return buf.getvalue(), sr, len(mix) / sr


def _decode(which: int, data: bytes, decode, arg):
    try:
        return decode(data, arg)
    except MediaError as e:
        raise ParentError(which, e) from None


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows of `x` scaled to unit L2 norm (float64)."""
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def slerp(a: np.ndarray, b: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Spherical interpolation, row by row, between unit directions `a` and `b` (n, d).

    The result lies on the great arc from `a` to `b`: with θ the angle between them, its
    angle to `a` is (1 - lam)·θ and to `b` is lam·θ. Nearly equal vectors fall back to a
    normalised lerp; for antipodal ones (no unique arc) a fixed orthogonal direction is used.
    """
    a, b = normalize(a), normalize(b)
    lam = np.asarray(lam, np.float64).reshape(-1, 1)
    dot = np.clip(np.sum(a * b, axis=1, keepdims=True), -1.0, 1.0)
    theta = np.arccos(dot)
    sin = np.sin(theta)
    general = sin > 1e-6
    safe = np.where(general, sin, 1.0)
    out = np.where(
        general,
        (np.sin(lam * theta) * a + np.sin((1 - lam) * theta) * b) / safe,
        lam * a + (1 - lam) * b,
    )
    antipodal = (~general & (dot < 0)).ravel()
    if antipodal.any():
        aa, t = a[antipodal], 1 - lam[antipodal]
        out[antipodal] = np.cos(t * np.pi) * aa + np.sin(t * np.pi) * _orthogonal(aa)
    return normalize(out)


def _orthogonal(a: np.ndarray) -> np.ndarray:
    """A unit vector orthogonal to each row of `a`, chosen deterministically."""
    k = np.argmin(np.abs(a), axis=1)
    e = np.zeros_like(a)
    e[np.arange(len(a)), k] = 1.0
    return normalize(e - a[np.arange(len(a)), k][:, None] * a)
