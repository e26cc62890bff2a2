"""`mmtools-shapes`: a small open_clip model trained on generated shapes, shipped offline.

The architecture lives in `mmtools-shapes.json` (open_clip's model-config format; open_clip
names a registered config after its file stem) and the fp16 weights in
`mmtools-shapes.safetensors`, both beside this file. `python -m mmtools.demo.train`
rebuilds the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_NAME = "mmtools-shapes"
_HERE = Path(__file__).resolve().parent


def config_path() -> Path:
    """Path of the shipped open_clip model config."""
    return _HERE / f"{MODEL_NAME}.json"


def weights_path() -> Path:
    """Path of the shipped weights (safetensors, fp16)."""
    return _HERE / f"{MODEL_NAME}.safetensors"


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
