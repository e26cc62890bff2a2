"""One query embedded by the model recorded for an embedding column (a search, a lookup).

`info` is the provenance `embed` stores with an embedding column (`model`, `pretrained`,
`library`, ...). The model is rebuilt from it exactly as `embed` resolves it: an open_clip
architecture with a tag or checkpoint, a config file, a local directory, the bundled
`mmtools-shapes`, or a CLAP model; weights that cannot be had fail in one line.
"""

from __future__ import annotations

import numpy as np

from mmtools import models
from mmtools.errors import UsageError
from mmtools.models.device import resolve_device


def is_clap(info: dict) -> bool:
    """Whether the recorded model is a CLAP (audio-text) model."""
    return str(info.get("library", "")).startswith("transformers")


def _clip(info: dict):
    pretrained = info.get("pretrained")
    if pretrained == models.BUNDLED:
        pretrained = None  # the bundled model's own weights
    return models.resolve_clip(info["model"], pretrained)


def embed_text(info: dict, text: str, device: str = "auto") -> np.ndarray:
    """A caption's embedding (1 x dim, float32, L2-normalised)."""
    import torch

    dev = resolve_device(device)
    if is_clap(info):
        encoder = models.load_clap(models.resolve_clap(info["model"]), dev, "fp32")
        tok = encoder.tokenizer([text], padding=True, truncation=True, return_tensors="pt")
        out = encoder.encode_text({k: v.to(dev) for k, v in tok.items()})
    else:
        encoder = models.load_clip(_clip(info), dev, "fp32")
        out = encoder.encode_text(encoder.tokenizer([text]).to(dev))
    return _unit(out, torch)


def embed_image(info: dict, image, device: str = "auto") -> np.ndarray:
    """An image's embedding (1 x dim, float32, L2-normalised); `image` is an RGB PIL image."""
    import torch

    if is_clap(info):
        raise UsageError(f"{info['model']} embeds audio and text; query it with --text or --id")
    dev = resolve_device(device)
    encoder = models.load_clip(_clip(info), dev, "fp32")
    out = encoder.encode_image(encoder.preprocess(image).unsqueeze(0).to(dev))
    return _unit(out, torch)


def _unit(out, torch) -> np.ndarray:
    vec = out.detach().to(torch.float32).cpu().numpy()
    norm = np.linalg.norm(vec, axis=1, keepdims=True)
    if not np.isfinite(vec).all() or not norm.all():
        raise UsageError("the query's embedding came out NaN or zero; try another query")
    return (vec / norm).astype(np.float32)
