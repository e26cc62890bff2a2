"""All model loading: open_clip (by name, tag or local checkpoint), the bundled model, and CLAP.

`resolve_clip`/`resolve_clap` are cheap after the first call: they check the name, fetch the
weights when they come from a hub, and return a small picklable spec with the embedding size,
so a bad name or a missing network fails before any output is written. `load_clip`/`load_clap`
build the model from a spec on the chosen device (once per worker, in a step's `setup()`).

`--pretrained none` builds a randomly initialised model from the architecture config, with a
fixed seed, so two processes build the same model (tests and benchmarks use it).
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import logging
import os
from dataclasses import dataclass
from typing import Any

from mmtools.errors import TemporaryError, UsageError
from mmtools.models.device import autocast

log = logging.getLogger("mmtools")

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = {"ViT-B-32": "laion2b_s34b_b79k"}
DEFAULT_AUDIO_MODEL = "laion/clap-htsat-unfused"
SHAPES_MODEL = "mmtools-shapes"
RANDOM_INIT = "none"
BUNDLED = "bundled"
RANDOM_SEED = 0
_CHECKPOINTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)


class ModelLoadError(UsageError):
    """A model name, tag or checkpoint that cannot be used."""


class ModelDownloadError(TemporaryError):
    """Weights that had to be fetched from a hub could not be (no network, hub down)."""


def file_stamps(*paths: str | None) -> list[str]:
    """Size and mtime of each local model file (every file of a directory), so that a model
    replaced behind the same path changes a run's fingerprint; names and tags give nothing."""
    stamps = []
    for path in paths:
        if not path or not os.path.exists(path):
            continue
        files = [path] if os.path.isfile(path) else sorted(glob.glob(f"{path}/**", recursive=True))
        for f in files:
            if os.path.isfile(f):
                st = os.stat(f)
                stamps.append(f"{os.path.relpath(f, path)}:{st.st_size}:{st.st_mtime_ns}")
    return stamps


@dataclass(frozen=True)
class ClipSpec:
    """A resolved open_clip model: what to build, what to record, and its embedding size."""

    name: str  # the name open_clip's factory knows (after registering `config_file`)
    weights: str | None  # tag or checkpoint path for open_clip; None: random init or schema
    label: str  # the model as recorded in the metadata
    pretrained: str | None  # the weights as recorded in the metadata
    dim: int
    config_file: str | None = None
    quick_gelu: bool = False  # weights trained with QuickGELU (OpenAI's) on a GELU config

    def files(self) -> list[str]:
        """Stamps of the local config and checkpoint files (see `file_stamps`)."""
        return file_stamps(self.config_file, self.weights)

    def info(self, precision: str) -> dict:
        """Provenance of an embedding made with this model."""
        import open_clip

        return {
            "model": self.label,
            "pretrained": self.pretrained,
            "dim": self.dim,
            "library": f"open_clip {open_clip.__version__}",
            "normalized": True,
            "precision": precision,
        }


@dataclass(frozen=True)
class ClapSpec:
    """A resolved CLAP model (Hugging Face id or local directory) and its embedding size."""

    name: str
    dim: int

    def files(self) -> list[str]:
        """Stamps of the files of a local model directory (see `file_stamps`)."""
        return file_stamps(self.name)

    def info(self, precision: str) -> dict:
        """Provenance of an embedding made with this model."""
        import transformers

        return {
            "model": self.name,
            "pretrained": None,
            "dim": self.dim,
            "library": f"transformers {transformers.__version__}",
            "normalized": True,
            "precision": precision,
        }


def offline_hint(model: str, weights: str | None) -> str:
    """The one line shown when weights cannot be fetched."""
    if model.startswith("hf-hub:"):
        return (
            f"cannot load {model} (no network?); pass a local copy of the repository with "
            "--model /path/to/dir (holding open_clip_config.json and the weights), or "
            f"--model {SHAPES_MODEL} for the bundled offline model"
        )
    what = f"{model} weights '{weights}'" if weights else model
    return (
        f"cannot load {what} (no network?); pass a local checkpoint with --pretrained "
        f"/path/to/open_clip_pytorch_model.bin, or --model {SHAPES_MODEL} for the bundled "
        "offline model"
    )


def resolve_clip(model: str, pretrained: str | None = None) -> ClipSpec:
    """Check an open_clip model and its weights, fetching hub weights into the cache."""
    import open_clip

    if model == SHAPES_MODEL:
        return _resolve_shapes(pretrained)
    if model.startswith(("hf-hub:", "local-dir:")) or os.path.isdir(model):
        return _resolve_schema(model, pretrained)
    config_file = None
    if model.endswith(".json") and os.path.isfile(model):
        config_file = os.path.abspath(model)
        open_clip.add_model_config(config_file)
        model = os.path.splitext(os.path.basename(model))[0]
    elif model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelLoadError(
            f"unknown model {model!r}; {hint}pass an open_clip architecture "
            f"(e.g. {DEFAULT_MODEL}), an hf-hub: id, a model config .json, or "
            f"{SHAPES_MODEL}"
        )
    dim = int(open_clip.get_model_config(model)["embed_dim"])
    weights, recorded = _clip_weights(model, pretrained, config_file is not None)
    tag = open_clip.get_pretrained_cfg(model, weights) if weights else {}
    quick = bool(tag.get("quick_gelu")) and not open_clip.get_model_config(model).get("quick_gelu")
    return ClipSpec(model, weights, config_file or model, recorded, dim, config_file, quick)


def _clip_weights(model: str, pretrained: str | None, custom: bool) -> tuple[str | None, str]:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained is None:
        if custom or not tags:
            raise ModelLoadError(
                f"{model} has no default weights; pass --pretrained "
                f"/path/to/checkpoint, or --pretrained {RANDOM_INIT} for random init"
            )
        pretrained = DEFAULT_PRETRAINED.get(model, tags[0])
    if pretrained == RANDOM_INIT:
        return None, RANDOM_INIT
    if os.path.isfile(pretrained):
        return os.path.abspath(pretrained), os.path.abspath(pretrained)
    if os.path.isdir(pretrained):
        path = _checkpoint_in(pretrained)
        return path, path
    if pretrained not in tags:
        known = f"one of: {', '.join(tags)}" if tags else "a checkpoint path"
        raise ModelLoadError(
            f"--pretrained {pretrained!r} is not a file, a directory or a known "
            f"tag for {model}; pass {known}, or {RANDOM_INIT}"
        )
    try:
        with _hub_logs_once():
            open_clip.download_pretrained(open_clip.get_pretrained_cfg(model, pretrained))
    except Exception as e:
        log.debug("download failed: %r", e)
        raise ModelDownloadError(offline_hint(model, pretrained)) from None
    return pretrained, pretrained


def _checkpoint_in(directory: str) -> str:
    for name in _CHECKPOINTS:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return os.path.abspath(path)
    found = sorted(f for f in os.listdir(directory) if f.endswith((".safetensors", ".bin", ".pt")))
    if len(found) == 1:
        return os.path.abspath(os.path.join(directory, found[0]))
    raise ModelLoadError(
        f"no single checkpoint in {directory} (looked for {_CHECKPOINTS[0]}, "
        f"{_CHECKPOINTS[2]}, ...); pass the checkpoint file itself"
    )


def _resolve_shapes(pretrained: str | None) -> ClipSpec:
    from mmtools.models import shapes as shapes_model

    shapes_model.register()
    dim = _config_dim(str(shapes_model.config_path()))
    if pretrained == RANDOM_INIT:
        return ClipSpec(SHAPES_MODEL, None, SHAPES_MODEL, RANDOM_INIT, dim)
    if pretrained is None:
        path = shapes_model.weights_path()
        if not path.is_file():
            raise ModelLoadError(
                f"the bundled weights {path} are missing; reinstall mmtools or "
                "rebuild them with python -m mmtools.demo.train"
            )
        return ClipSpec(SHAPES_MODEL, str(path), SHAPES_MODEL, BUNDLED, dim)
    _, recorded = _clip_weights(SHAPES_MODEL, pretrained, custom=True)
    return ClipSpec(SHAPES_MODEL, recorded, SHAPES_MODEL, recorded, dim)


def _config_dim(path: str) -> int:
    import json

    with open(path) as f:
        return int(json.load(f)["embed_dim"])


def _resolve_schema(model: str, pretrained: str | None) -> ClipSpec:
    import open_clip

    if pretrained is not None:
        raise ModelLoadError(
            f"--pretrained cannot be used with --model {model}: the weights "
            "come from the model's own directory or hub repository"
        )
    if os.path.isdir(model):
        model = "local-dir:" + os.path.abspath(model)
    try:
        cfg = open_clip.get_model_config(model)
    except Exception as e:
        log.debug("config load failed: %r", e)
        if model.startswith("hf-hub:"):
            raise ModelDownloadError(offline_hint(model, None)) from None
        first = str(e).splitlines()[0][:200]
        raise ModelLoadError(f"cannot read the open_clip config of {model}: {first}") from None
    if not cfg:
        raise ModelLoadError(f"{model} holds no open_clip model config (open_clip_config.json)")
    return ClipSpec(model, None, model, None, int(cfg["embed_dim"]))


@contextlib.contextmanager
def _quiet_libraries():
    """Silence the model libraries' expected chatter (random-init notices, progress bars)."""
    import warnings

    root = logging.getLogger()
    level = root.level
    if log.getEffectiveLevel() > logging.DEBUG:
        root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), _hub_logs_once():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _hub_logs_once():
    """The Hugging Face hub's warnings (a download's retries, five of them on a machine
    offline) reach stderr once, through mmtools' handler: the hub adds a handler of its own
    and still passes each record on, so every line came twice."""
    hub = logging.getLogger("huggingface_hub")
    own = hub.handlers[:] if hub.propagate and logging.getLogger().handlers else []
    for handler in own:
        hub.removeHandler(handler)
    try:
        yield
    finally:
        for handler in own:
            hub.addHandler(handler)


class ClipEncoder:
    """An open_clip model on a device: preprocess, tokenise, encode (unnormalised float32)."""

    def __init__(self, spec: ClipSpec, device, precision: str):
        import open_clip
        import torch

        if spec.config_file:
            open_clip.add_model_config(spec.config_file)
        if spec.name == SHAPES_MODEL:
            from mmtools.models import shapes as shapes_model

            shapes_model.register()
        self.device, self.precision = device, precision
        random_init = spec.weights is None and spec.pretrained == RANDOM_INIT
        try:
            with _quiet_libraries(), torch.random.fork_rng(devices=[]):
                if random_init:
                    torch.manual_seed(RANDOM_SEED)  # the same random model in every process
                model, _, self.preprocess = open_clip.create_model_and_transforms(
                    spec.name, pretrained=spec.weights, force_quick_gelu=spec.quick_gelu
                )
                self.tokenizer = open_clip.get_tokenizer(spec.name)
        except (RuntimeError, OSError) as e:
            log.debug("model load failed: %r", e)
            local = spec.name.startswith("local-dir:") or random_init
            if local or (spec.weights and os.path.isfile(spec.weights)):
                raise ModelLoadError(
                    f"cannot build {spec.name} from {spec.weights or 'its config'}"
                    f": {str(e).splitlines()[0][:200]}"
                ) from None
            raise ModelDownloadError(offline_hint(spec.name, spec.weights)) from None
        self.model = model.to(device).eval()

    def encode_image(self, pixels) -> Any:
        """Image embeddings (float32, not normalised) of preprocessed pixels on the device."""
        import torch

        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.model.encode_image(pixels).float()

    def encode_text(self, tokens) -> Any:
        """Text embeddings (float32, not normalised) of token ids on the device."""
        import torch

        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.model.encode_text(tokens).float()


def load_clip(spec: ClipSpec, device, precision: str) -> ClipEncoder:
    """Build an open_clip model from a resolved spec."""
    return ClipEncoder(spec, device, precision)


def _clap_hint(model: str) -> str:
    return (
        f"cannot load CLAP model {model!r} (no network?); pass a local directory holding a "
        "ClapModel and ClapProcessor saved with save_pretrained, e.g. --audio-model "
        "/path/to/clap-htsat-unfused"
    )


def resolve_clap(model: str = DEFAULT_AUDIO_MODEL) -> ClapSpec:
    """Check a CLAP model (hub id or local directory) and read its embedding size."""
    from mmtools.errors import require_module

    transformers = require_module("transformers", "audio")
    local = os.path.isdir(model)
    name = os.path.abspath(model) if local else model
    try:
        with _quiet_libraries():
            config = transformers.AutoConfig.from_pretrained(name)
    except Exception as e:
        log.debug("CLAP config load failed: %r", e)
        if local:
            raise ModelLoadError(
                f"{model} is not a saved CLAP model directory: {str(e).splitlines()[0][:200]}"
            ) from None
        raise ModelDownloadError(_clap_hint(model)) from None
    if getattr(config, "model_type", None) != "clap":
        raise ModelLoadError(f"{model} is a {config.model_type!r} model, not CLAP")
    return ClapSpec(name, int(config.projection_dim))


class ClapEncoder:
    """A CLAP model on a device, with its feature extractor and tokenizer."""

    def __init__(self, spec: ClapSpec, device, precision: str):
        import transformers

        self.device, self.precision = device, precision
        transformers.utils.logging.disable_progress_bar()
        try:
            with _quiet_libraries():
                model = transformers.ClapModel.from_pretrained(spec.name)
                processor = transformers.ClapProcessor.from_pretrained(spec.name)
        except Exception as e:
            log.debug("CLAP load failed: %r", e)
            raise ModelDownloadError(_clap_hint(spec.name)) from None
        self.model = model.to(device).eval()
        self.features = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        self.sample_rate = int(self.features.sampling_rate)
        self.max_samples = int(self.features.nb_max_samples)

    def encode_audio(self, inputs: dict) -> Any:
        """Audio embeddings (float32) of feature-extractor outputs on the device."""
        return self._run(self.model.get_audio_features, inputs)

    def encode_text(self, inputs: dict) -> Any:
        """Text embeddings (float32) of tokenizer outputs on the device."""
        return self._run(self.model.get_text_features, inputs)

    def _run(self, fn, inputs: dict) -> Any:
        import torch

        with torch.inference_mode(), autocast(self.device, self.precision):
            out = fn(**inputs)
        # transformers >= 5 returns a model output whose pooler_output is the embedding.
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return out.float()


def load_clap(spec: ClapSpec, device, precision: str) -> ClapEncoder:
    """Build a CLAP model from a resolved spec."""
    return ClapEncoder(spec, device, precision)
