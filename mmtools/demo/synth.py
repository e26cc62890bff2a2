"""Seeded procedural image–caption pairs: coloured shapes on a background.

A scene is a dict of attributes (count, size, colour, shape, background, position) plus
its layout (object centres as fractions of the side of the image's central square). `render` draws a
scene deterministically, so a caller can move the layout a little with `shifted` and render
a near-duplicate of the same scene.

A `Domain` says how widely scenes vary beyond that: image sides, shape radii, background
texture (a few soft waves of light and shade: like photographs, two distinct scenes then
differ in their coarse structure, so a perceptual hash tells them apart, while a
near-duplicate keeps its texture), salt-and-pepper noise and caption phrasings. The
bundled model trains on `TRAIN`; `HELD_OUT` differs from it in every one of these, to
measure how far the model generalises beyond what it saw.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mmtools.models.shapes import COLOURS

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: dict[str, float] = {"small": 0.08, "large": 0.13}  # radius as a fraction of the side
COUNTS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
# Boxes (x0, y0, x1, y1) that object centres are drawn from, as fractions of the side.
POSITIONS: dict[str, tuple[float, float, float, float]] = {
    "left": (0.0, 0.1, 0.38, 0.9),
    "right": (0.62, 0.1, 1.0, 0.9),
    "top": (0.1, 0.0, 0.9, 0.38),
    "bottom": (0.1, 0.62, 0.9, 1.0),
    "center": (0.26, 0.26, 0.74, 0.74),
}
PLACES: dict[str, tuple[str, ...]] = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "center": ("in the center", "in the middle"),
}
# Templates: {things} (with or without a count), {place}, {bg}, {a_bg}. One without {place}
# leaves the position out of the caption.
TEMPLATES = (
    "{things} {place} on {a_bg} background",
    "{things} on {a_bg} background, {place}",
    "{a_bg} background with {things} {place}",
    "{things} {place}, {bg} background",
)
TRAIN_TEMPLATES = (
    *TEMPLATES,
    "{things} on {a_bg} background",
    "a picture of {things} {place} on {a_bg} background",
    "{bg} background, {things}",
)
HELD_OUT_TEMPLATES = (
    "an image showing {things} {place}; the background is {bg}",
    "{things} over {a_bg} backdrop",
    "there are {things} {place} against {bg}",
)
_SUPERSAMPLE_SIDE = 256  # draw at least this large and downscale, for anti-aliased edges
_COLOUR_JITTER = 12
_WAVES = 4  # plane waves summed into a textured background
_WAVE_AMPLITUDE = 25  # their mean's peak, in 0-255 levels
_WAVE_CYCLES = (0.5, 4.0)  # cycles per image side: the scales a 64-bit pHash sees
_TEXTURE_GRID = 64  # the waves are computed on a grid this wide, then enlarged


@dataclass(frozen=True)
class Domain:
    """How widely generated scenes vary. The default is square images of `size`, the two
    named radii, plain backgrounds, no noise and the four original templates."""

    sides: tuple[tuple[int, int], ...] = ()  # ranges each side is drawn from; () = square
    radii: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    textured: float = 0.0  # share of scenes with a textured background
    noise: tuple[tuple[float, float], ...] = ()  # salt-and-pepper share of pixels, ranges
    noisy: float = 0.0  # share of scenes with noise
    templates: tuple[str, ...] = TEMPLATES
    counted: float = 1.0  # share of captions that state the count of several shapes


PLAIN = Domain()
TEXTURED = Domain(textured=1.0)
TRAIN = Domain(
    sides=((150, 600),),
    radii={"small": ((0.065, 0.095),), "large": ((0.115, 0.14),)},
    textured=0.75,
    noise=((0.0, 0.03),),
    noisy=0.5,
    templates=TRAIN_TEMPLATES,
    counted=0.8,
)
HELD_OUT = Domain(  # outside TRAIN's range in every respect
    sides=((96, 140), (620, 720)),
    radii={"small": ((0.05, 0.062),), "large": ((0.142, 0.15),)},
    textured=1.0,
    noise=((0.035, 0.05),),
    noisy=1.0,
    templates=HELD_OUT_TEMPLATES,
    counted=0.5,
)


@dataclass
class Sample:
    """One generated pair: the image, its caption and the attributes behind both."""

    image: Any  # PIL.Image.Image, RGB
    caption: str
    attrs: dict[str, Any]


def generate(
    n: int, seed: int, size: int = 64, textured: bool = False, domain: Domain | None = None
) -> Iterator[Sample]:
    """Yield `n` image–caption pairs; the same arguments give identical images.

    Without `domain`, square `size`×`size` images on plain backgrounds (`textured=True`:
    textured ones); with a `domain`, scenes varied as it says (`size` is then unused when
    the domain draws its own sides).
    """
    domain = domain or (TEXTURED if textured else PLAIN)
    rng = random.Random(seed)
    for _ in range(n):
        attrs = sample_attrs(rng, domain)
        if not domain.sides:
            attrs["wh"] = [size, size]
        yield Sample(image=render(attrs), caption=describe(attrs, rng, domain), attrs=attrs)


def _draw(rng: random.Random, ranges: tuple[tuple[float, float], ...]) -> float:
    return rng.uniform(*rng.choice(ranges))


def sample_attrs(rng: random.Random, domain: Domain = PLAIN) -> dict[str, Any]:
    """Draw a random scene: its attributes and a layout that fits them."""
    colour, background = rng.sample(sorted(COLOURS), 2)
    attrs: dict[str, Any] = {
        "count": rng.choice(sorted(COUNTS)),
        "size": rng.choice(sorted(SIZES)),
        "colour": colour,
        "shape": rng.choice(SHAPES),
        "background": background,
        "position": rng.choice(sorted(POSITIONS)),
        "rgb": _jitter(COLOURS[colour], rng),
        "bg_rgb": _jitter(COLOURS[background], rng),
    }
    radius = SIZES[attrs["size"]]
    if domain != PLAIN:  # PLAIN keeps the original stream, draw for draw
        if domain.radii:
            radius = attrs["radius"] = round(_draw(rng, domain.radii[attrs["size"]]), 4)
        if domain.sides:
            attrs["wh"] = [round(_draw(rng, domain.sides)) for _ in range(2)]
        if rng.random() < domain.textured:
            attrs["waves"] = [
                [rng.uniform(0, math.pi), rng.uniform(*_WAVE_CYCLES), rng.uniform(0, 2 * math.pi)]
                for _ in range(_WAVES)
            ]
        if rng.random() < domain.noisy:
            attrs["noise"] = [round(_draw(rng, domain.noise), 4), rng.getrandbits(32)]
    xy = None
    while xy is None:  # every combination fits; a tight one just needs a few more tries
        xy = _layout(attrs["count"], radius, POSITIONS[attrs["position"]], rng)
    attrs["xy"] = xy
    return attrs


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> list[int]:
    return [min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in rgb]


def _layout(
    count: int, radius: float, box: tuple[float, float, float, float], rng: random.Random
) -> list[list[float]] | None:
    """Place `count` non-overlapping centres in `box`, or None when they do not fit."""
    lo, hi = radius + 0.02, 1.0 - radius - 0.02  # keep every shape inside the frame
    x0, y0, x1, y1 = max(box[0], lo), max(box[1], lo), min(box[2], hi), min(box[3], hi)
    min_dist = 2 * radius + 0.03  # a visible gap, so the count can be read off the image
    along_x = x1 - x0 >= y1 - y0
    for _ in range(50):
        xy: list[list[float]] = []
        # One slot per object along the box's long side, so that three large shapes fit.
        for i in rng.sample(range(count), count):
            t = rng.uniform(i / count, (i + 1) / count)
            u = rng.random()
            x, y = (t, u) if along_x else (u, t)
            x, y = x0 + x * (x1 - x0), y0 + y * (y1 - y0)
            if all((x - a) ** 2 + (y - b) ** 2 >= min_dist**2 for a, b in xy):
                xy.append([round(x, 4), round(y, 4)])
        if len(xy) == count:
            return xy
    return None


def describe(attrs: dict[str, Any], rng: random.Random, domain: Domain = PLAIN) -> str:
    """Write a caption of the scene in one of the domain's templates: colour, shape, size
    and background always; the count of several shapes and the position as it says."""
    count, colour, shape = attrs["count"], attrs["colour"], attrs["shape"]
    if count == 1:
        things = f"{rng.choice(('a', 'one'))} {attrs['size']} {colour} {shape}"
    else:
        plural = shape + ("es" if shape.endswith("s") else "s")
        counted = domain == PLAIN or rng.random() < domain.counted
        number = f"{COUNTS[count]} " if counted else ""
        things = f"{number}{attrs['size']} {colour} {plural}"
    place = rng.choice(PLACES[attrs["position"]])
    bg = attrs["background"]
    a_bg = ("an " if bg[0] in "aeiou" else "a ") + bg
    return rng.choice(domain.templates).format(things=things, place=place, bg=bg, a_bg=a_bg)


def shifted(attrs: dict[str, Any], dx: float, dy: float) -> dict[str, Any]:
    """Return a copy of the scene moved by (dx, dy), in fractions of the image side."""
    moved = dict(attrs)
    moved["xy"] = [[x + dx, y + dy] for x, y in attrs["xy"]]
    return moved


def render(attrs: dict[str, Any], size: int | None = None) -> Any:
    """Draw the scene as an RGB PIL image (its `wh`, or `size`×`size`); deterministic."""
    from PIL import Image, ImageDraw

    w, h = (size, size) if size else attrs.get("wh", (64, 64))
    scale = max(1, math.ceil(_SUPERSAMPLE_SIDE / min(w, h)))
    big_w, big_h = w * scale, h * scale
    if attrs.get("waves"):
        image = _textured(attrs["bg_rgb"], attrs["waves"], big_w, big_h)
    else:
        image = Image.new("RGB", (big_w, big_h), tuple(attrs["bg_rgb"]))
    draw = ImageDraw.Draw(image)
    # The layout lives in the central square, the part a CLIP preprocess (resize the short
    # side, crop the centre) keeps; a wider or taller image only adds background.
    side = min(big_w, big_h)
    left, top = (big_w - side) / 2, (big_h - side) / 2
    radius = attrs.get("radius", SIZES[attrs["size"]]) * side
    for x, y in attrs["xy"]:
        for polygon in _outline(attrs["shape"], left + x * side, top + y * side, radius):
            draw.polygon(polygon, fill=tuple(attrs["rgb"]))
    image = image.resize((w, h), Image.Resampling.BOX)
    if attrs.get("noise"):
        image = _salt_and_pepper(image, *attrs["noise"])
    return image


def _textured(rgb: list[int], waves: list[list[float]], w: int, h: int) -> Any:
    """The background colour lightened and shaded by the mean of a few plane waves (computed
    on a coarse grid and smoothly enlarged: the waves are far coarser than a pixel)."""
    import numpy as np
    from PIL import Image

    k = min(1.0, _TEXTURE_GRID / max(w, h))
    gw, gh = max(2, round(w * k)), max(2, round(h * k))
    y, x = np.mgrid[0:gh, 0:gw]
    x, y = (x + 0.5) / gw, (y + 0.5) / gh
    shade = np.zeros((gh, gw), np.float32)
    for angle, cycles, phase in waves:
        shade += np.cos(2 * math.pi * cycles * (x * math.cos(angle) + y * math.sin(angle)) + phase)
    shade *= _WAVE_AMPLITUDE / len(waves)
    big = np.asarray(Image.fromarray(shade, "F").resize((w, h), Image.Resampling.BILINEAR))
    pixels = np.asarray(rgb, np.float32) + big[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _salt_and_pepper(image: Any, share: float, seed: int) -> Any:
    """`share` of the pixels set to black or white, at places drawn from `seed`."""
    import numpy as np
    from PIL import Image

    pixels = np.array(image)
    rng = np.random.default_rng(seed)
    hit = rng.random(pixels.shape[:2]) < share
    pixels[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255)[:, None]
    return Image.fromarray(pixels, "RGB")


def _outline(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
    """Polygons (one, or two for a cross) that draw `shape` centred at (cx, cy)."""

    def ring(n: int, radii: tuple[float, ...], start: float) -> list[tuple[float, float]]:
        points = []
        for i in range(n):
            angle = start + 2 * math.pi * i / n
            rad = radii[i % len(radii)]
            points.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
        return points

    if shape == "circle":
        return [ring(48, (r,), 0.0)]
    if shape == "square":
        return [ring(4, (r,), math.pi / 4)]
    if shape == "diamond":
        return [ring(4, (r * 1.1,), 0.0)]
    if shape == "triangle":
        return [ring(3, (r * 1.15,), -math.pi / 2)]
    if shape == "star":
        return [ring(10, (r * 1.15, r * 0.5), -math.pi / 2)]
    if shape == "cross":
        w = r * 0.36
        return [
            [(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
            [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)],
        ]
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
