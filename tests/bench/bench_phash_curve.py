"""Benchmark: the pHash radius curve on photographs, which sets `dedup --max-distance`.

Run: python tests/bench/bench_phash_curve.py [--quick] [--max-radius 20]

Distinct photos: the three real photographs available offline (matplotlib's
grace_hopper.jpg, scikit-learn's china.jpg and flower.jpg), each cut into a 4 x 4 grid of
tiles that do not overlap (128 x 150 px from grace_hopper, 160 x 106 px from the others):
48 photos, no two sharing a pixel. Each photo then gets the edits a copy meets on the web:
resized to 50% and 150%, re-encoded as JPEG quality 30, brightness -15% and +15%, cropped by
2% and 5% (of each side's length, from the centre and from one corner), and mirrored left
to right. All photos and copies are JPEG bytes hashed by the dedup step's own code.

For each radius it runs the same grouping as `dedup -m phash` (links within the radius,
then connected components over all 48 photos and their copies together) and prints, per
kind of edit, the share of copies grouped with their photo (recall), and the number of
groups holding two distinct photos (false merges) and the share of linked pairs that are of
one photo (pair precision), without and with --phash-flip. The default radius is two steps
(4 bits; distances are even) below the first radius with a false merge. --quick measures
the 16 tiles of the first photograph only (176 images), a smoke run whose figures differ
from the table's.
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np

GRID = 4
EDITS = (
    "resize50",
    "resize150",
    "jpeg30",
    "darker15",
    "brighter15",
    "crop2_centre",
    "crop2_corner",
    "crop5_centre",
    "crop5_corner",
    "flip",
)


def photographs() -> list:
    """The three real photographs, as RGB PIL images."""
    from matplotlib import cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        out = [Image.open(f).convert("RGB")]
    out += [Image.fromarray(a) for a in load_sample_images().images]
    return out


def distinct_photos(photos: int | None = None) -> list:
    """48 photos: each photograph cut into a 4 x 4 grid of tiles that share no pixel (the
    tiles of the first `photos` photographs only, when given)."""
    out = []
    for image in photographs()[:photos]:
        w, h = image.size
        tw, th = w // GRID, h // GRID
        for y in range(GRID):
            for x in range(GRID):
                out.append(image.crop((x * tw, y * th, (x + 1) * tw, (y + 1) * th)))
    return out


def _crop(image, share: float, corner: bool):
    w, h = image.size
    dx, dy = round(w * share), round(h * share)
    if corner:
        return image.crop((0, 0, w - dx, h - dy))
    return image.crop((dx // 2, dy // 2, w - (dx - dx // 2), h - (dy - dy // 2)))


def edited(image, edit: str):
    """`image` after one of the EDITS."""
    from PIL import Image, ImageEnhance, ImageOps

    w, h = image.size
    if edit.startswith("resize"):
        scale = int(edit[6:]) / 100
        return image.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
    if edit == "jpeg30":
        return image  # the quality is set when encoding
    if edit in ("darker15", "brighter15"):
        return ImageEnhance.Brightness(image).enhance(0.85 if edit == "darker15" else 1.15)
    if edit.startswith("crop"):
        share, where = edit[4:].split("_")
        return _crop(image, int(share) / 100, where == "corner")
    if edit == "flip":
        return ImageOps.mirror(image)
    raise ValueError(edit)


def jpeg(image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def corpus(photos: int | None = None) -> tuple[list[bytes], np.ndarray, list[str]]:
    """JPEG bytes of the photos and their copies, the photo of each, and its edit (the
    tiles of the first `photos` photographs only, when given)."""
    blobs, photo, edit = [], [], []
    for p, image in enumerate(distinct_photos(photos)):
        blobs.append(jpeg(image))
        photo.append(p)
        edit.append("original")
        for e in EDITS:
            blobs.append(jpeg(edited(image, e), 30 if e == "jpeg30" else 90))
            photo.append(p)
            edit.append(e)
    return blobs, np.array(photo), edit


def hashes(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """pHash and mirrored pHash of each image, by the dedup step's code."""
    from mmtools.steps.dedup.phash import image_phashes

    pairs = [image_phashes(b) for b in blobs]
    return np.array([p[0] for p in pairs], np.uint64), np.array([p[1] for p in pairs], np.uint64)


def groups(h: np.ndarray, m: np.ndarray, radius: int, flip: bool) -> np.ndarray:
    """Group label per image, as `dedup -m phash` makes them (-1: in no group)."""
    import pyarrow as pa

    from mmtools.steps.dedup.phash import KEY, MIRROR, PHash

    method = PHash(radius, flip=flip)
    keys = {KEY: pa.array(h), "_key_phash_error": pa.array([None] * len(h), pa.string())}
    if flip:
        keys[MIRROR] = pa.array(m)
    method.scan(pa.RecordBatch.from_pydict(keys), 0)
    return method.labels(np.arange(len(h)))


def measure(h, m, photo, edit, radius: int, flip: bool) -> dict:
    """Recall per edit, false merges and pair precision at one radius."""
    labels = groups(h, m, radius, flip)
    edit = np.array(edit)
    original = labels[edit == "original"]  # one per photo, in photo order
    found = {}
    for e in EDITS:
        at = np.flatnonzero(edit == e)
        found[e] = float(np.mean((labels[at] >= 0) & (labels[at] == original[photo[at]])))
    grouped = labels >= 0
    mixed, same_pairs, all_pairs = 0, 0, 0
    for g in np.unique(labels[grouped]):
        members = photo[labels == g]
        mixed += len(np.unique(members)) > 1
        counts = np.bincount(members)
        same_pairs += int((counts * (counts - 1) // 2).sum())
        all_pairs += len(members) * (len(members) - 1) // 2
    found["false_merges"] = mixed
    found["precision"] = same_pairs / all_pairs if all_pairs else 1.0
    return found


def curve(max_radius: int, flip: bool, data=None) -> list[dict]:
    """`measure` at radius 0 .. max_radius."""
    blobs, photo, edit = data or corpus()
    h, m = hashes(blobs)
    return [{"radius": r, **measure(h, m, photo, edit, r, flip)} for r in range(max_radius + 1)]


def default_radius(rows: list[dict], margin: int = 4) -> int:
    """The radius `margin` bits (two steps: distances are even) below the first one with a
    false merge (or the largest measured)."""
    first = next((r["radius"] for r in rows if r["false_merges"]), rows[-1]["radius"])
    return max(0, first - margin)


def show(rows: list[dict], title: str) -> None:
    print(title)
    short = [e.replace("_centre", "c").replace("_corner", "k") for e in EDITS]
    print("radius " + " ".join(f"{s:>10}" for s in short) + "  false_merges  precision")
    for row in rows:
        cells = " ".join(f"{row[e]:10.2f}" for e in EDITS)
        print(f"{row['radius']:6d} {cells}  {row['false_merges']:12d}  {row['precision']:9.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the tiles of one photograph (16), not of three"
    )
    parser.add_argument("--max-radius", type=int, default=20)
    args = parser.parse_args()
    data = corpus(1 if args.quick else None)
    print(f"{len(set(data[1].tolist()))} distinct photos, {len(data[0])} images in all")
    for flip in (False, True):
        rows = curve(args.max_radius, flip, data)
        show(rows, f"\n--phash-flip {'on' if flip else 'off'}:")
        print(f"first false merge - 4 bits = {default_radius(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
