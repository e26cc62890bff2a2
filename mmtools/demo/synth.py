"""Seeded procedural image–caption pairs: coloured shapes on a plain background.

A scene is a dict of attributes (count, size, colour, shape, background, position) plus
its layout (object centres as fractions of the image side). `render` draws a scene
deterministically, so a caller can move the layout a little with `shifted` and render
a near-duplicate of the same scene.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "purple": (135, 50, 175),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
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
TEMPLATES = (
    "{things} {place} on {a_bg} background",
    "{things} on {a_bg} background, {place}",
    "{a_bg} background with {things} {place}",
    "{things} {place}, {bg} background",
)
_SUPERSAMPLE = 4  # draw large and downscale, for anti-aliased edges
_COLOUR_JITTER = 12


@dataclass
class Sample:
    """One generated pair: the image, its caption and the attributes behind both."""

    image: Any  # PIL.Image.Image, RGB
    caption: str
    attrs: dict[str, Any]


def generate(n: int, seed: int, size: int = 64) -> Iterator[Sample]:
    """Yield `n` image–caption pairs; the same (n, seed, size) gives identical images."""
    rng = random.Random(seed)
    for _ in range(n):
        attrs = sample_attrs(rng)
        yield Sample(image=render(attrs, size), caption=describe(attrs, rng), attrs=attrs)


def sample_attrs(rng: random.Random) -> dict[str, Any]:
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
    xy = None
    while xy is None:  # every combination fits; a tight one just needs a few more tries
        xy = _layout(attrs["count"], SIZES[attrs["size"]], POSITIONS[attrs["position"]], rng)
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


def describe(attrs: dict[str, Any], rng: random.Random) -> str:
    """Write a caption that states every attribute of the scene, in a random template."""
    count, colour, shape = attrs["count"], attrs["colour"], attrs["shape"]
    if count == 1:
        things = f"{rng.choice(('a', 'one'))} {attrs['size']} {colour} {shape}"
    else:
        plural = shape + ("es" if shape.endswith("s") else "s")
        things = f"{COUNTS[count]} {attrs['size']} {colour} {plural}"
    place = rng.choice(PLACES[attrs["position"]])
    bg = attrs["background"]
    a_bg = ("an " if bg[0] in "aeiou" else "a ") + bg
    return rng.choice(TEMPLATES).format(things=things, place=place, bg=bg, a_bg=a_bg)


def shifted(attrs: dict[str, Any], dx: float, dy: float) -> dict[str, Any]:
    """Return a copy of the scene moved by (dx, dy), in fractions of the image side."""
    moved = dict(attrs)
    moved["xy"] = [[x + dx, y + dy] for x, y in attrs["xy"]]
    return moved


def render(attrs: dict[str, Any], size: int = 64) -> Any:
    """Draw the scene as a `size`×`size` RGB PIL image; deterministic given `attrs`."""
    from PIL import Image, ImageDraw

    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), tuple(attrs["bg_rgb"]))
    draw = ImageDraw.Draw(image)
    radius = SIZES[attrs["size"]] * big
    for x, y in attrs["xy"]:
        for polygon in _outline(attrs["shape"], x * big, y * big, radius):
            draw.polygon(polygon, fill=tuple(attrs["rgb"]))
    return image.resize((size, size), Image.Resampling.BOX)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
    """Polygons (one, or two for a cross) that draw `shape` centred at (cx, cy)."""
    import math

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
