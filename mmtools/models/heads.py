"""Heads over embeddings: small models that turn an embedding into one score per row.

`load(path)` reads a published head or mmtools' own format into a `Head`: its linear layers
(numpy, float32), the activation after each, an optional per-dimension standardisation
before the first layer, an output transform, and the embedding model the head was trained
on. `Head.check` refuses a head that does not fit an embedding column (one line, exit 3);
`Head.build` gives a torch function of a batch of embeddings. Layouts read (README.md has
the table of published files):

- LAION's improved aesthetic predictor: `layers.{0,2,4,6,7}` (768-1024-128-64-16-1, no
  activation) or its ReLU variant `layers.{0,3,6,9,11}`; OpenAI ViT-L/14, normalised input.
- LAION's linear aesthetic heads (`sa_0_4_vit_*_linear.pth`): `weight`, `bias`.
- LAION's CLIP NSFW detector as ported from Keras: `norm.mean`, `norm.variance`,
  `linear_1..N` with ReLU between and a sigmoid; and its H/14 head `layers.{0,3,...,15,16}`
  (ReLU after the first five, no output transform: it was trained by MSE on 0/1).
- mmtools' own: `layers.N.weight/bias` in safetensors and a JSON (`save`) beside it and in
  the safetensors header: activation, output transform, input column, model, label.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmtools.errors import DataContractError
from mmtools.models import ModelLoadError

log = logging.getLogger("mmtools")

FORMAT = "mmtools-head"
VERSION = 1
ACTIVATIONS = ("none", "relu", "gelu")
OUTPUTS = ("identity", "sigmoid")
JSON_KEY = "mmtools_head"  # the JSON, also kept in the safetensors header
OPENAI = "openai"
NSFW_EPS = 1e-10  # the ported Keras normalisation divides by sqrt(variance) + this

# `layers.N` indices of the Linear modules in each published nn.Sequential, with the
# activation after each, keyed by the indices (they tell the layouts apart).
SEQUENTIAL = {
    (0, 2, 4, 6, 7): ("laion-aesthetic-mlp", ["none"] * 5, "identity"),
    (0, 3, 6, 9, 11): ("laion-aesthetic-mlp-relu", ["relu"] * 4 + ["none"], "identity"),
    (0, 3, 6, 9, 12, 15, 16): ("laion-nsfw-h14", ["relu"] * 5 + ["none"] * 2, "identity"),
}
# The embedding model of a published head, by its input size.
PUBLISHED_MODEL = {
    "laion-aesthetic-mlp": {768: ("ViT-L-14", OPENAI)},
    "laion-aesthetic-mlp-relu": {768: ("ViT-L-14", OPENAI)},
    "laion-aesthetic-linear": {768: ("ViT-L-14", OPENAI)},  # 512: B/32 or B/16, see the name
    "laion-nsfw": {512: ("ViT-B-32", OPENAI), 768: ("ViT-L-14", OPENAI)},
    "laion-nsfw-h14": {1024: ("ViT-H-14", "laion2b_s32b_b79k")},
}
# The same weights under other names: open_clip's QuickGELU configs and the hub copies.
ALIASES = {
    "hf-hub:timm/vit_large_patch14_clip_224.openai": ("ViT-L-14", OPENAI),
    "hf-hub:timm/vit_base_patch32_clip_224.openai": ("ViT-B-32", OPENAI),
    "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K": ("ViT-H-14", "laion2b_s32b_b79k"),
}


@dataclass
class Layer:
    """One linear layer (`weight` is out x in) and the activation after it."""

    weight: np.ndarray
    bias: np.ndarray | None
    activation: str = "none"


@dataclass
class Head:
    """A head: layers, input standardisation, output transform and what it expects."""

    format: str
    layers: list[Layer]
    output: str = "identity"
    normalize: bool = True  # L2-normalise embeddings before the head
    # Before the first layer: x -> (x - mean) / (sqrt(variance) + eps), as Keras normalises.
    mean: np.ndarray | None = None
    variance: np.ndarray | None = None
    eps: float = 0.0
    model: str | None = None  # the embedding model the head was trained on
    pretrained: str | None = None
    input: str | None = None  # its embedding column; None: the scored media's
    label: str | None = None
    path: str = ""
    extra: dict = field(default_factory=dict)  # mmtools heads: how it was trained

    @property
    def dim(self) -> int:
        """Size of the embeddings the head takes."""
        return int(self.layers[0].weight.shape[1])

    def describe(self) -> str:
        """The expected embedding, for messages: '768-d ViT-L-14 (openai)'."""
        what = f"{self.model} ({self.pretrained})" if self.pretrained else f"{self.model}"
        return f"{self.dim}-d" + (f" {what}" if self.model else "")

    def check(self, column: str, dim: int, info: dict | None, name: str, force: bool) -> None:
        """Refuse (DataContractError) a head whose size or model does not fit `column`."""
        if dim != self.dim:
            raise DataContractError(
                f"head {name} ({self.path}) takes {self.describe()} embeddings but {column} has "
                f"{dim} dimensions; embed with the head's model (mmtools embed --model ...)"
            )
        if not self.model:
            log.warning("head %s does not say which model it expects; not checked", name)
            return
        if not info or not info.get("model"):
            log.warning("%s has no model metadata; cannot check head %s against it", column, name)
            return
        if same_model((self.model, self.pretrained), (info["model"], info.get("pretrained"))):
            return
        made_by = f"{info['model']} ({info.get('pretrained')})"
        if force:
            what = (name, self.describe(), column, made_by)
            log.warning("head %s expects %s but %s was made by %s (--force)", *what)
            return
        raise DataContractError(
            f"head {name} expects {self.describe()} embeddings but {column} was made by "
            f"{made_by}; embed with that model, or pass --force if they are the same weights"
        )

    def build(self, device) -> Any:
        """A function: (n, dim) float32 tensor on `device` -> (n,) float32 scores."""
        import torch
        import torch.nn.functional as F

        def tensor(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)

        layers = [(tensor(la.weight), tensor(la.bias), la.activation) for la in self.layers]
        mean, variance = tensor(self.mean), tensor(self.variance)
        scale = None if variance is None else variance.sqrt() + self.eps
        acts = {"none": lambda x: x, "relu": F.relu, "gelu": F.gelu}
        out = torch.sigmoid if self.output == "sigmoid" else (lambda x: x)

        def apply(x):
            if mean is not None:
                x = (x - mean) / scale
            for weight, bias, act in layers:
                x = acts[act](F.linear(x, weight, bias))
            return out(x)[:, 0]

        return apply


def same_model(a: tuple[str | None, str | None], b: tuple[str | None, str | None]) -> bool:
    """Whether two (model, pretrained) pairs name the same weights."""

    def canon(pair):
        model, tag = ALIASES.get(pair[0] or "", pair)
        return (model or "").removesuffix("-quickgelu").lower(), (tag or "").lower() or None

    (ma, ta), (mb, tb) = canon(a), canon(b)
    return ma == mb and (ta is None or tb is None or ta == tb)


def load(path: str) -> Head:
    """Read a head file (see the module table); a bad file is a one-line ModelLoadError."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"head file {path} does not exist")
    if path.endswith((".safetensors", ".json")):
        head = _load_mmtools(path)
    else:
        head = _load_state_dict(path)
    head.path = os.path.abspath(path)
    return head


def _load_state_dict(path: str) -> Head:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot read head {path} as a torch state dict: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} is not a state dict of tensors")
    arrays = {k: v.detach().float().numpy() for k, v in state.items()}
    head = _published(arrays, os.path.basename(path))
    if head is None and any(a.ndim == 4 for a in arrays.values()):
        raise ModelLoadError(
            f"{path} is an image model (it has convolution weights, as LAION's EfficientNet "
            "watermark detector does): it reads pixels, not embeddings; train a head on your "
            "embeddings instead (mmtools train-head)"
        )
    if head is None:
        keys = ", ".join(sorted(arrays)[:6])
        raise ModelLoadError(
            f"{path} is not a head layout mmtools reads (keys: {keys}...); it reads LAION's "
            "aesthetic and NSFW heads and its own format (see mmtools score --help)"
        )
    _check_chain(head, path)
    return head


def _published(arrays: dict[str, np.ndarray], filename: str) -> Head | None:
    """Recognise a published layout by its keys."""
    keys = set(arrays)
    if keys == {"weight", "bias"} and arrays["weight"].ndim == 2:
        head = Head("laion-aesthetic-linear", [Layer(arrays["weight"], arrays["bias"])])
    elif keys and all(k.startswith("layers.") for k in keys):
        index = tuple(sorted({int(k.split(".")[1]) for k in keys if k.split(".")[1].isdigit()}))
        wanted = {f"layers.{i}.{p}" for i in index for p in ("weight", "bias")}
        if index not in SEQUENTIAL or keys != wanted:
            return None
        fmt, acts, output = SEQUENTIAL[index]
        layers = [
            Layer(arrays[f"layers.{i}.weight"], arrays[f"layers.{i}.bias"], act)
            for i, act in zip(index, acts, strict=True)
        ]
        head = Head(fmt, layers, output)
    elif {"norm.mean", "norm.variance", "linear_1.weight"} <= keys:
        head = _keras_nsfw(arrays)
    else:
        return None
    head.model, head.pretrained = _expected_model(head.format, head.dim, filename)
    return head


def _keras_nsfw(arrays: dict[str, np.ndarray]) -> Head | None:
    """LAION's NSFW detector ported from Keras: normalisation, Dense+ReLU..., Dense+sigmoid."""
    n = 1
    while f"linear_{n + 1}.weight" in arrays:
        n += 1
    wanted = {"norm.mean", "norm.variance"} | {
        f"linear_{i}.{p}" for i in range(1, n + 1) for p in ("weight", "bias")
    }
    if set(arrays) != wanted:
        return None
    layers = [
        Layer(arrays[f"linear_{i}.weight"], arrays[f"linear_{i}.bias"], "relu" if i < n else "none")
        for i in range(1, n + 1)
    ]
    mean, variance = arrays["norm.mean"].reshape(-1), arrays["norm.variance"].reshape(-1)
    return Head("laion-nsfw", layers, "sigmoid", mean=mean, variance=variance, eps=NSFW_EPS)


def _expected_model(fmt: str, dim: int, filename: str) -> tuple[str | None, str | None]:
    """The model a published head expects: from LAION's file names, else from its size."""
    name = filename.lower()
    if m := re.search(r"vit_([bl])_(\d+)", name):  # sa_0_4_vit_b_32_linear.pth
        return f"ViT-{m.group(1).upper()}-{m.group(2)}", OPENAI
    if m := re.search(r"clip_(vit-[a-z]+-\d+)_([a-z0-9_]+?)_binary", name):
        return "ViT-" + m.group(1)[4:].upper(), m.group(2)
    return PUBLISHED_MODEL.get(fmt, {}).get(dim, (None, None))


def _check_chain(head: Head, path: str) -> None:
    """Each layer's input is the previous one's output, and the head gives one value."""
    prev = head.dim
    for i, layer in enumerate(head.layers):
        out, inp = layer.weight.shape
        if inp != prev or (layer.bias is not None and layer.bias.shape != (out,)):
            raise ModelLoadError(f"head {path}: layer {i} does not fit the one before it")
        prev = out
    if prev != 1:
        raise ModelLoadError(f"head {path} gives {prev} values per row, not one score")
    for a in (head.mean, head.variance):
        if a is not None and a.shape != (head.dim,):
            raise ModelLoadError(f"head {path}: normalisation of {a.shape}, not ({head.dim},)")


def _paths(path: str) -> tuple[Path, Path]:
    """(weights, JSON) of an mmtools head given either file."""
    p = Path(path)
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def _load_mmtools(path: str) -> Head:
    from safetensors import safe_open

    weights, sidecar = _paths(path)
    if not weights.is_file():
        raise ModelLoadError(f"head {path}: its weights {weights} are missing")
    try:
        with safe_open(str(weights), framework="numpy") as f:
            arrays = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}  # noqa: SIM118
            embedded = (f.metadata() or {}).get(JSON_KEY)
        spec = json.loads(sidecar.read_text() if sidecar.is_file() else embedded or "null")
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read head {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ModelLoadError(f"{path} has no {FORMAT} description ({sidecar.name} or header)")
    return from_spec(spec, arrays, path)


def from_spec(spec: dict, arrays: dict[str, np.ndarray], path: str = "") -> Head:
    """A head from the mmtools JSON description and its named arrays."""
    act, output = spec.get("activation", "relu"), spec.get("output", "identity")
    if act not in ACTIVATIONS or output not in OUTPUTS:
        raise ModelLoadError(f"head {path}: activation {act!r} or output {output!r} unknown")
    n = int(spec.get("layers", 0))
    try:
        layers = [
            Layer(
                arrays[f"layers.{i}.weight"],
                arrays.get(f"layers.{i}.bias"),
                act if i < n - 1 else "none",
            )
            for i in range(n)
        ]
    except KeyError as e:
        raise ModelLoadError(f"head {path}: tensor {e} is missing") from None
    if not layers:
        raise ModelLoadError(f"head {path} has no layers")
    head = Head(
        FORMAT,
        layers,
        output,
        normalize=bool(spec.get("normalize", True)),
        model=spec.get("model"),
        pretrained=spec.get("pretrained"),
        input=spec.get("input"),
        label=spec.get("label"),
        path=path,
        extra={k: v for k, v in spec.items() if k == "training"},
    )
    _check_chain(head, path)
    return head


def save(head: Head, path: str) -> tuple[str, str]:
    """Write `head` in the mmtools format: PATH.safetensors and PATH.json; return both."""
    from safetensors.numpy import save_file

    if head.mean is not None:
        raise ValueError("fold the standardisation into the first layer before saving")
    weights, sidecar = _paths(path)
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "label": head.label,
        "input": head.input,
        "model": head.model,
        "pretrained": head.pretrained,
        "dim": head.dim,
        "normalize": head.normalize,
        "layers": len(head.layers),
        "sizes": [list(layer.weight.shape[::-1]) for layer in head.layers],
        "activation": head.layers[0].activation if len(head.layers) > 1 else "none",
        "output": head.output,
        **head.extra,
    }
    text = json.dumps(spec, indent=2, sort_keys=True)
    arrays = {}
    for i, layer in enumerate(head.layers):
        arrays[f"layers.{i}.weight"] = np.ascontiguousarray(layer.weight, np.float32)
        if layer.bias is not None:
            arrays[f"layers.{i}.bias"] = np.ascontiguousarray(layer.bias, np.float32)
    save_file(arrays, str(weights), metadata={JSON_KEY: text})
    sidecar.write_text(text + "\n")
    return str(weights), str(sidecar)
