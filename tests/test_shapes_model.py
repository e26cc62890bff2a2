"""The synth generator and the shipped `mmtools-shapes` model, offline."""

from __future__ import annotations

import socket

import pytest

from mmtools.demo import synth

HELD_OUT_SEED = 4242  # training draws from seeds 0 and 1_000_000


def test_generate_is_deterministic_under_a_seed():
    first = [(s.image.tobytes(), s.caption) for s in synth.generate(20, seed=7)]
    again = [(s.image.tobytes(), s.caption) for s in synth.generate(20, seed=7)]
    other = [(s.image.tobytes(), s.caption) for s in synth.generate(20, seed=8)]
    assert first == again
    assert first != other


def test_captions_state_what_is_drawn():
    for sample in synth.generate(50, seed=3, size=64):
        attrs, caption = sample.attrs, sample.caption
        assert sample.image.mode == "RGB" and sample.image.size == (64, 64)
        for word in (attrs["colour"], attrs["shape"], attrs["size"], attrs["background"]):
            assert word in caption
        # The background fills most pixels and each shape's centre has the shape's colour.
        assert max(sample.image.getcolors(64 * 64))[1] == tuple(attrs["bg_rgb"])
        for x, y in attrs["xy"]:
            assert sample.image.getpixel((int(x * 64), int(y * 64))) == tuple(attrs["rgb"])
        assert len(attrs["xy"]) == attrs["count"]


def test_shifted_copy_is_a_near_duplicate():
    attrs = next(synth.generate(1, seed=5)).attrs
    moved = synth.shifted(attrs, 0.03, -0.02)
    assert synth.render(moved).tobytes() != synth.render(attrs).tobytes()
    assert moved["xy"] != attrs["xy"] and moved["shape"] == attrs["shape"]


@pytest.fixture(scope="module")
def shapes():
    pytest.importorskip("open_clip")
    from mmtools.models import shapes as shapes_model

    if not shapes_model.weights_path().exists():
        pytest.skip("mmtools-shapes weights not built: python -m mmtools.demo.train")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", _no_network)
        model, preprocess, tokenizer = shapes_model.create()
    return model, preprocess, tokenizer


def _no_network(*args, **kwargs):
    raise OSError("network access in a test")


def _embed(shapes, samples):
    from mmtools.demo.train import embed

    return embed(*shapes, samples)


def test_shipped_model_separates_matched_from_shuffled(shapes):
    import numpy as np

    from mmtools.demo.train import roc_auc

    samples = list(synth.generate(300, seed=HELD_OUT_SEED))
    image_emb, text_emb = _embed(shapes, samples)
    matched = np.sum(image_emb * text_emb, axis=1)
    shuffled = np.sum(image_emb * np.roll(text_emb, 1, axis=0), axis=1)
    assert roc_auc(matched, shuffled) >= 0.95


def test_embeddings_are_finite_and_normalised(shapes):
    import numpy as np

    image_emb, text_emb = _embed(shapes, list(synth.generate(8, seed=HELD_OUT_SEED)))
    for emb in (image_emb, text_emb):
        assert emb.shape == (8, 128)
        assert np.isfinite(emb).all()
        assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def test_near_duplicates_land_close(shapes):
    import numpy as np

    samples = list(synth.generate(50, seed=HELD_OUT_SEED))
    copies = [
        synth.Sample(synth.render(synth.shifted(s.attrs, 0.02, 0.02)), s.caption, s.attrs)
        for s in samples
    ]
    original, _ = _embed(shapes, samples)
    shifted, _ = _embed(shapes, copies)
    to_copy = np.sum(original * shifted, axis=1)
    to_others = original @ original.T - 2 * np.eye(len(samples))
    assert np.mean(to_copy > to_others.max(axis=1)) >= 0.9
