"""Resizing and re-encoding images at ingest, with img2dataset's rules and OpenCV's pixels.

The rules (`--image-size N`):
- `keep_ratio`: the shorter side becomes N; `center_crop`: the same, then the centre N x N.
- `keep_ratio_largest`: the longer side becomes N; `border`: the same, then white padding
  to N x N around the centre.
- The scale is N / side; each new side is round(side * scale) (Python's round, halves to
  even), at least 1. INTER_AREA when the deciding side shrinks, INTER_LANCZOS4 otherwise.
- A crop or pad leaves the odd pixel on the bottom/right.
- `--resize-only-if-bigger`: an image whose deciding side is at most N is kept as it is.
- Alpha is flattened over white; 16-bit images are scaled to 8 bits.
- `--min-image-size`, `--max-image-area`, `--max-aspect-ratio` reject before resizing.

Where mmtools departs from img2dataset, on purpose: EXIF orientation is applied (OpenCV's
unchanged read ignores it and re-encoding drops the tag, so img2dataset stores such photos
sideways); an image that needs no resizing and is already in the output format without
alpha keeps its bytes (img2dataset's `skip_reencode`); `--resize-mode no` keeps the bytes
unless `--encode-format` is given.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mmtools.errors import UsageError
from mmtools.media import PIXEL_BUDGET, ImageInfo, MediaError, within_time_limit

MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
SHORTER_SIDE_MODES = ("keep_ratio", "center_crop")
FORMATS = {"jpg": "jpeg", "png": "png", "webp": "webp"}  # --encode-format -> image_format
DEFAULT_QUALITY = {"jpg": 95, "png": 9, "webp": 95}  # img2dataset's; png: compression level
QUALITY_RANGE = {"jpg": (0, 100), "png": (0, 9), "webp": (1, 100)}
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ResizeOptions:
    """How ingest resizes, re-encodes and filters images by size (img2dataset's options)."""

    image_size: int = 256
    resize_mode: str = "no"
    resize_only_if_bigger: bool = False
    min_image_size: int = 0
    max_image_area: float | None = None
    max_aspect_ratio: float | None = None
    encode_format: str | None = None  # None: jpg when resizing, else the source's bytes
    encode_quality: int | None = None  # None: the format's default

    def __post_init__(self):
        if self.resize_mode not in MODES:
            raise UsageError(
                f"--resize-mode must be one of {', '.join(MODES)}, not {self.resize_mode!r}"
            )
        if self.image_size < 1:
            raise UsageError(f"--image-size must be at least 1, not {self.image_size}")
        if self.encode_format is not None and self.encode_format not in FORMATS:
            raise UsageError(
                f"--encode-format must be jpg, png or webp, not {self.encode_format!r}"
            )
        low, high = QUALITY_RANGE[self.format]
        if not low <= self.quality <= high:
            what = "compression level" if self.format == "png" else "quality"
            raise UsageError(
                f"--encode-quality for {self.format} is a {what} from {low} to {high}, "
                f"not {self.quality}"
            )

    @property
    def reencodes(self) -> bool:
        """Whether stored images may differ from the source bytes."""
        return self.resize_mode != "no" or self.encode_format is not None

    @property
    def format(self) -> str:
        """The output encoding: jpg, png or webp."""
        return self.encode_format or "jpg"

    @property
    def quality(self) -> int:
        """JPEG/WebP quality or PNG compression level."""
        return DEFAULT_QUALITY[self.format] if self.encode_quality is None else self.encode_quality


@dataclass
class Resized:
    """A re-encoded image and its size."""

    data: bytes
    width: int
    height: int
    format: str


def check_size(opts: ResizeOptions, width: int, height: int) -> None:
    """Reject (`too_small`, `too_large_area`, `bad_aspect`) an image outside the size limits."""
    short, long = min(width, height), max(width, height)
    if short < opts.min_image_size:
        raise MediaError(
            "too_small",
            f"{width}x{height}: shorter side under --min-image-size {opts.min_image_size}",
        )
    if opts.max_image_area is not None and width * height > opts.max_image_area:
        raise MediaError(
            "too_large_area",
            f"{width}x{height}: {width * height} pixels, over --max-image-area "
            f"{opts.max_image_area:g}",
        )
    if opts.max_aspect_ratio is not None and long / short > opts.max_aspect_ratio:
        raise MediaError(
            "bad_aspect",
            f"{width}x{height}: aspect ratio {long / short:.3g} over --max-aspect-ratio "
            f"{opts.max_aspect_ratio:g}",
        )


def scaled_size(opts: ResizeOptions, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) after scaling, before any crop or pad; None when not scaled."""
    if opts.resize_mode == "no":
        return None
    side = min(width, height) if opts.resize_mode in SHORTER_SIDE_MODES else max(width, height)
    if opts.resize_only_if_bigger and side <= opts.image_size:
        return None
    scale = opts.image_size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def output_size(opts: ResizeOptions, width: int, height: int) -> tuple[int, int]:
    """(width, height) of the stored image for a source of `width` x `height`."""
    scaled = scaled_size(opts, width, height)
    if scaled is None:
        return width, height
    if opts.resize_mode in ("center_crop", "border"):
        return opts.image_size, opts.image_size
    return scaled


def resize_image(data: bytes, info: ImageInfo, opts: ResizeOptions) -> Resized | None:
    """The image resized and re-encoded per `opts`; None when the source bytes can stay.

    Every image is decoded here (OpenCV, within the decode time limit), so this decode also
    verifies it: what OpenCV cannot read is decoded by Pillow, which either reads it (a
    format OpenCV lacks) or rejects it with the reason verifying gives (`truncated`,
    `corrupt`). `info` comes from `probe_image`, which need not decode the pixels first.
    """
    if not opts.reencodes:
        return None
    scaled = scaled_size(opts, info.width, info.height)
    with PIXEL_BUDGET.hold(info.width * info.height):
        img, orientation = _decode(data, info)
        alpha = img.ndim == 3 and img.shape[2] == 4
        if scaled is None and not alpha and info.format == FORMATS[opts.format]:
            return None
        img = _upright(_flatten(img) if alpha else img, orientation)
        if scaled is not None:
            img = _scale(img, scaled, opts)
        height, width = img.shape[:2]
        return Resized(_encode(img, opts), width, height, FORMATS[opts.format])


@functools.cache
def _cv2():
    import cv2

    # Ingest already decodes many images in parallel; OpenCV's own threads would
    # oversubscribe the CPUs. A failure becomes a reject row, so OpenCV's log stays quiet.
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


def _decode(data: bytes, info: ImageInfo):
    """Pixels as OpenCV reads them unchanged (BGR, BGRA or grey; 8-bit) and the EXIF
    orientation still to apply."""
    import numpy as np

    cv2 = _cv2()
    raw = np.frombuffer(data, np.uint8)
    try:
        img = within_time_limit(lambda: cv2.imdecode(raw, cv2.IMREAD_UNCHANGED))
    except cv2.error:
        img = None
    if img is None or img.dtype not in (np.uint8, np.uint16) or img.ndim not in (2, 3):
        return _decode_with_pillow(data), 1
    if img.dtype == np.uint16:
        img = np.rint(img * (255.0 / 65535.0)).astype(np.uint8)
    return img, info.orientation


def _decode_with_pillow(data: bytes):
    """BGR pixels, upright and over white, of what OpenCV cannot read (its pixels are
    already held against the decoding budget)."""
    import numpy as np

    from mmtools.media import decode_image

    try:
        rgb = decode_image(data, hold=False)
        return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
    except MediaError:
        raise
    except Exception as e:
        raise MediaError("corrupt", f"cannot decode for resizing: {e}") from None


def _flatten(img):
    """Alpha over white, computed as img2dataset does (in float, then rounded)."""
    import numpy as np

    alpha = img[:, :, 3:4]
    out = alpha / 255 * img[:, :, :3] + 255 - alpha
    return np.rint(out.clip(0, 255)).astype(np.uint8)


def _upright(img, orientation: int):
    """Apply an EXIF orientation (1-8) to a pixel array."""
    import numpy as np

    turned = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    if orientation not in turned:
        return img
    return np.ascontiguousarray(turned[orientation](img))


def _scale(img, scaled: tuple[int, int], opts: ResizeOptions):
    """Resize to `scaled`, then centre-crop or pad to a square as the mode asks."""
    cv2 = _cv2()
    height, width = img.shape[:2]
    n = opts.image_size
    if scaled != (width, height):
        side = min(width, height) if opts.resize_mode in SHORTER_SIDE_MODES else max(width, height)
        inter = cv2.INTER_AREA if side > n else cv2.INTER_LANCZOS4
        img = cv2.resize(img, scaled, interpolation=inter)
        width, height = scaled
    if opts.resize_mode == "center_crop":
        top, left = (height - n) // 2, (width - n) // 2
        img = img[top : top + n, left : left + n]
    elif opts.resize_mode == "border":
        top, left = max(0, n - height) // 2, max(0, n - width) // 2
        bottom, right = max(0, n - height) - top, max(0, n - width) - left
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=WHITE)
    return img


def _encode(img, opts: ResizeOptions) -> bytes:
    cv2 = _cv2()
    flag = {
        "jpg": cv2.IMWRITE_JPEG_QUALITY,
        "png": cv2.IMWRITE_PNG_COMPRESSION,
        "webp": cv2.IMWRITE_WEBP_QUALITY,
    }[opts.format]
    height, width = img.shape[:2]
    try:
        ok, buf = cv2.imencode(f".{opts.format}", img, [int(flag), opts.quality])
    except cv2.error:
        ok = False
    if not ok:  # e.g. WebP holds at most 16383 pixels a side
        raise MediaError("encode_error", f"cannot encode a {width}x{height} image as {opts.format}")
    return buf.tobytes()
