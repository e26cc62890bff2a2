"""An offline, deterministic rule-based captioner: synonyms, clause reordering and templates.

For pipelines and tests without a model. Each row's choices are seeded by the seed and the row
id, so the output does not depend on batch layout, worker count or run. In caption mode it
describes what it can measure (shape, brightness, main colour); it ignores the prompt text.
"""

from __future__ import annotations

import hashlib
import random
import re

from mmtools.media import MediaError
from mmtools.steps.rewrite.backends import InProcessBackend
from mmtools.steps.rewrite.prompts import Outcome, Request, open_image

VERSION = "rules-v1"

SYNONYMS = {
    "photo": ("picture", "image", "snapshot", "shot"),
    "picture": ("photo", "image"),
    "image": ("picture", "photo"),
    "small": ("little", "tiny"),
    "little": ("small",),
    "big": ("large", "huge"),
    "large": ("big",),
    "man": ("person", "guy"),
    "woman": ("person", "lady"),
    "dog": ("puppy", "pup"),
    "cat": ("kitten", "kitty"),
    "car": ("vehicle", "automobile"),
    "beautiful": ("lovely", "pretty", "gorgeous"),
    "pretty": ("lovely", "beautiful"),
    "old": ("vintage", "aged"),
    "house": ("home", "building"),
    "road": ("street",),
    "street": ("road",),
    "sea": ("ocean",),
    "ocean": ("sea",),
    "shows": ("depicts", "features"),
    "view": ("scene", "vista"),
    "near": ("beside", "by"),
    "walking": ("strolling",),
    "sitting": ("resting",),
}
REWRITE_TEMPLATES = (
    "{}",
    "a photo of {}",
    "an image of {}",
    "a picture showing {}",
    "{}, in a photograph",
    "a close look at {}",
)
CAPTION_TEMPLATES = (
    "a {tone} {shape} image in {colour} tones",
    "a {shape} picture, {tone}, mostly {colour}",
    "a {tone} photo dominated by {colour}",
)
_LEAD = re.compile(r"^(?:an?\s+)?(?:photo|picture|image|snapshot)\s+(?:of|showing)\s+", re.I)
_WORD = re.compile(r"[A-Za-z]+")
_COLOURS = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "red": (200, 30, 30),
    "orange": (240, 140, 20),
    "yellow": (230, 220, 40),
    "green": (40, 160, 50),
    "blue": (40, 80, 200),
    "purple": (130, 50, 160),
    "pink": (240, 150, 190),
    "brown": (120, 80, 40),
}


def row_rng(seed: int, row_id: str) -> random.Random:
    """A random generator for one row, independent of batch layout."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _synonyms(text: str, rng: random.Random) -> str:
    def swap(m: re.Match) -> str:
        word = m.group(0)
        options = SYNONYMS.get(word.lower())
        if not options or rng.random() < 0.5:
            return word
        new = rng.choice(options)
        return new.capitalize() if word[0].isupper() else new

    return _WORD.sub(swap, text)


def rewrite_text(text: str, rng: random.Random) -> str:
    """Rewrite an alt-text: swap synonyms, maybe rotate clauses, wrap in a template."""
    core = _LEAD.sub("", " ".join(text.split())).rstrip(" .")
    clauses = [c.strip() for c in core.split(",") if c.strip()]
    if len(clauses) > 1 and rng.random() < 0.5:
        clauses = clauses[1:] + clauses[:1]
    core = _synonyms(", ".join(clauses), rng)
    if core[:1].isupper() and not core[:2].isupper():
        core = core[0].lower() + core[1:]
    return rng.choice(REWRITE_TEMPLATES).format(core)


def describe_image(image, rng: random.Random) -> str:
    """Describe what can be measured in an image: shape, brightness and main colour."""
    import numpy as np

    w, h = image.size
    shape = "wide" if w > 1.2 * h else "tall" if h > 1.2 * w else "square"
    pixels = np.asarray(image.resize((16, 16)), dtype=np.float32).reshape(-1, 3)
    mean = pixels.mean(axis=0)
    tone = "bright" if mean.mean() > 160 else "dark" if mean.mean() < 80 else "softly lit"
    names = list(_COLOURS)
    ref = np.array([_COLOURS[n] for n in names], dtype=np.float32)
    nearest = np.argmin(((pixels[:, None, :] - ref[None]) ** 2).sum(-1), axis=1)
    colour = names[int(np.bincount(nearest, minlength=len(names)).argmax())]
    return rng.choice(CAPTION_TEMPLATES).format(tone=tone, shape=shape, colour=colour)


class TemplateBackend(InProcessBackend):
    """Rule-based captions; needs no model and no network."""

    def __init__(self, mode: str, seed: int = 0, max_image_side: int = 256):
        self.mode, self.seed, self.max_image_side = mode, seed, max_image_side

    def generate(self, requests: list[Request], on_done) -> list[Outcome]:
        """One caption per request."""
        outcomes = []
        for i, req in enumerate(requests):
            try:
                text = self._one(req)
            except MediaError as e:
                outcomes.append(Outcome(error=e.detail, reason=e.reason))
                continue
            on_done(i, text)
            outcomes.append(Outcome(text=text))
        return outcomes

    def _one(self, req: Request) -> str:
        rng = row_rng(self.seed, req.row_id)
        if self.mode == "rewrite":
            return rewrite_text(req.text or "", rng)
        if self.mode == "fuse":
            alt, desc = (req.text or "").strip(" ."), (req.description or "").strip(" .")
            if alt.lower() in desc.lower():
                return desc
            return f"{desc}, {_LEAD.sub('', alt)}" if rng.random() < 0.5 else f"{alt}; {desc}"
        description = describe_image(open_image(req.image, self.max_image_side), rng)
        if req.text and req.text.strip():
            return f"{description}, showing {_LEAD.sub('', req.text.strip().rstrip('.'))}"
        return description
