"""`mmtools-shapes`: a small open_clip model trained on generated shapes, shipped offline.

The architecture lives in `mmtools-shapes.json` (open_clip's model-config format; open_clip
names a registered config after its file stem) and the fp16 weights in
`mmtools-shapes.safetensors`, both beside this file. `python -m mmtools.demo.train`
rebuilds the weights and writes `mmtools-shapes.train.json`, the training record: the
generator seeds and pairs it trained and was evaluated on, and its held-out metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_NAME = "mmtools-shapes"
_HERE = Path(__file__).resolve().parent

# The colours its shapes and backgrounds are drawn in (`mmtools.demo.synth` draws with them).
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
PALETTE_DISTANCE = 60.0  # RGB distance within which a pixel counts as a palette colour
IN_DOMAIN_SHARE = 0.8  # generated scenes have >= 0.9 of their pixels near the palette;
# photographs 0.45-0.55 (measured on 64x64 model inputs)


def config_path() -> Path:
    """Path of the shipped open_clip model config."""
    return _HERE / f"{MODEL_NAME}.json"


def weights_path() -> Path:
    """Path of the shipped weights (safetensors, fp16)."""
    return _HERE / f"{MODEL_NAME}.safetensors"


def record_path() -> Path:
    """Path of the training record written beside the weights."""
    return _HERE / f"{MODEL_NAME}.train.json"


def training_record() -> dict[str, Any]:
    """The training record (seeds, data, metrics), or {} when the weights have none."""
    import json

    path = record_path()
    return json.loads(path.read_text()) if path.exists() else {}


def palette_share(rgb: Any) -> Any:
    """Per image, the share of pixels near one of the palette's colours: `rgb` is
    (images, height, width, 3) in 0-255. Near 1 for the scenes the model knows."""
    import numpy as np

    palette = np.asarray(list(COLOURS.values()), np.float32)
    flat = np.asarray(rgb, np.float32).reshape(len(rgb), -1, 1, 3)
    nearest = np.sqrt(((flat - palette) ** 2).sum(-1)).min(-1)
    return (nearest < PALETTE_DISTANCE).mean(axis=1)


def register() -> None:
    """Make `MODEL_NAME` known to open_clip's model and tokenizer factories."""
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(config_path())


def create(device: str = "cpu") -> tuple[Any, Any, Any]:
    """Build the model with the shipped weights, in eval mode: (model, preprocess, tokenizer)."""
    import open_clip

    register()
    model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL_NAME, pretrained=str(weights_path()), device=device
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(MODEL_NAME)
