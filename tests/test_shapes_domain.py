"""The bundled model's domain: generator variants, the training record, and the one-line
warning when `embed --model mmtools-shapes` meets images unlike its generated shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import mmtools
from PIL import Image, ImageOps

from mmtools.demo import synth
from mmtools.models import shapes

WARNING = "look unlike the generated shapes"


def photographs() -> list[Image.Image]:
    """Real photographs that installed packages ship (matplotlib, scikit-learn)."""
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f).convert("RGB")
    return [hopper, *(Image.fromarray(a) for a in load_sample_images().images)]


def photo_variants() -> list[Image.Image]:
    """Twelve photographs: the three, mirrored, and two crops of each."""
    out = []
    for im in photographs():
        w, h = im.size
        out += [
            im,
            ImageOps.mirror(im),
            im.crop((0, 0, w // 2, h // 2)),
            im.crop((w // 3, h // 3, w, h)),
        ]
    return out


def model_inputs(images: list[Image.Image]) -> np.ndarray:
    """The 64x64 RGB pixels the model sees (resize the short side, crop the centre)."""
    return np.stack(
        [np.asarray(ImageOps.fit(im.convert("RGB"), (64, 64)), np.float32) for im in images]
    )


def test_palette_share_separates_photographs_from_every_generator_variant():
    photos = shapes.palette_share(model_inputs(photo_variants()))
    assert photos.max() < shapes.IN_DOMAIN_SHARE, photos
    for domain in (synth.PLAIN, synth.TEXTURED, synth.TRAIN, synth.HELD_OUT):
        scenes = [s.image for s in synth.generate(60, seed=99, domain=domain)]
        share = shapes.palette_share(model_inputs(scenes))
        assert share.min() >= 0.85, (domain, share.min())


def test_held_out_variant_differs_from_training_in_every_respect():
    train = list(synth.generate(300, seed=1, domain=synth.TRAIN))
    held = list(synth.generate(300, seed=1, domain=synth.HELD_OUT))

    def sides(samples):
        return [v for s in samples for v in s.image.size]

    assert min(sides(train)) >= 150 and max(sides(train)) <= 600
    assert all(v < 150 or v > 600 for v in sides(held))
    for size in ("small", "large"):
        r_train = [s.attrs["radius"] for s in train if s.attrs["size"] == size]
        r_held = [s.attrs["radius"] for s in held if s.attrs["size"] == size]
        assert not (min(r_train) <= min(r_held) <= max(r_train))
        assert not (min(r_train) <= max(r_held) <= max(r_train))
    noise_train = [s.attrs["noise"][0] for s in train if "noise" in s.attrs]
    noise_held = [s.attrs["noise"][0] for s in held]
    assert max(noise_train) < min(noise_held)
    # No held-out caption could come from a training template.
    assert not set(synth.HELD_OUT_TEMPLATES) & set(synth.TRAIN_TEMPLATES)
    assert any("background is" in s.caption for s in held)
    assert not any("background is" in s.caption or "backdrop" in s.caption for s in train)


def test_plain_stream_is_unchanged_by_domains():
    """The plain generator draws the same scenes as before domains existed."""
    a = [(s.image.tobytes(), s.caption) for s in synth.generate(20, seed=7)]
    b = [(s.image.tobytes(), s.caption) for s in synth.generate(20, seed=7, domain=synth.PLAIN)]
    assert a == b


def test_training_record_names_every_seed_it_used():
    record = shapes.training_record()
    assert record["model"] == shapes.MODEL_NAME
    seeds = {record["train"]["seed"], record["eval"]["seed"], record["variant"]["seed"]}
    assert len(seeds) == 3
    # The weights started from an earlier stage's: its seeds are listed too.
    assert set(record["seeds"]) == seeds | set(record["init"].get("seeds", []))
    assert record["metrics"]["auc_matched_vs_shuffled"] >= 0.99
    assert record["metrics"]["variant_auc_matched_vs_shuffled"] >= 0.9
    assert shapes.weights_path().stat().st_size < 20e6


def _folder(root: Path, images: list[Image.Image]) -> Path:
    root.mkdir(parents=True)
    for i, im in enumerate(images):
        im.convert("RGB").save(root / f"{i:03d}.jpg", quality=90)
        (root / f"{i:03d}.txt").write_text("a large red circle on a blue background")
    return root


@pytest.mark.parametrize("kind", ["photos", "scenes"])
def test_embed_warns_once_on_photographs_and_never_on_its_own_domain(tmp_path, kind):
    if not shapes.weights_path().exists():
        pytest.skip("mmtools-shapes weights not built")
    if kind == "photos":
        images = photo_variants() * 2
    else:
        images = [s.image for s in synth.generate(24, seed=5, domain=synth.HELD_OUT)]
    folder = _folder(tmp_path / kind, images)
    mmtools("ingest", folder, "-o", tmp_path / "ds", "-q")
    proc = mmtools(
        "embed",
        tmp_path / "ds",
        "--model",
        "mmtools-shapes",
        "-o",
        tmp_path / "emb",
        "--batch-size",
        8,
    )
    lines = [line for line in proc.stderr.decode().splitlines() if WARNING in line]
    if kind == "photos":
        assert len(lines) == 1, proc.stderr.decode()
        assert "8 of the first 8 images" in lines[0]  # decided on the first batch
    else:
        assert lines == [], proc.stderr.decode()
