"""`mmtools embed`."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute, open_source

AudioModel = Annotated[
    str,
    typer.Option(
        "--audio-model",
        help="CLAP model: a Hugging Face id or a local directory saved with save_pretrained.",
    ),
]
Dtype = Annotated[str, typer.Option("--dtype", help="Stored embedding type: float16 or float32.")]
Workers = Annotated[
    int, typer.Option("--workers", min=1, help="Threads decoding media ahead of the model.")
]
Modalities = Annotated[
    str | None,
    typer.Option(
        "--modalities",
        help="Comma-separated: image, text, audio (default: every one the input has).",
        show_default=False,
    ),
]


def default_workers() -> int:
    """Decoding threads: one per core, up to 8."""
    return min(8, os.cpu_count() or 1)


def split_modalities(value: str | None) -> list[str] | None:
    """'image, text' -> ['image', 'text']."""
    return [m.strip() for m in value.split(",") if m.strip()] if value else None


def embed(
    inputs: O.Inputs = None,
    output: O.Output = None,
    modalities: Modalities = None,
    model: O.Model = "ViT-B-32",
    pretrained: O.Pretrained = None,
    audio_model: AudioModel = "laion/clap-htsat-unfused",
    device: O.Device = "auto",
    precision: O.Precision = "fp32",
    dtype: Dtype = "float16",
    workers: Workers = default_workers(),
    overwrite: O.Overwrite = False,
    shard_rows: O.ShardRows = 10_000,
    shard_bytes: O.ShardBytes = 1 << 30,
    batch_size: O.BatchSize = 256,
    engine: O.Engine = "local",
    ray_address: O.RayAddress = None,
    ray_concurrency: O.Concurrency = None,
    num_gpus_per_worker: O.GpusPerWorker = None,
    quiet: O.Quiet = False,
    verbose: O.Verbose = False,
    json: O.Json = False,
    wait_lock: O.WaitLock = False,
) -> None:
    """Add L2-normalised image_embedding, text_embedding and/or audio_embedding columns.

    Example: mmtools embed ds/ --model ViT-B-32 --pretrained laion2b_s34b_b79k -o embedded/

    Images and their text go through an open_clip model: --model takes any open_clip
    architecture with --pretrained (a tag, a checkpoint file or directory, or 'none' for a
    random init from the config), an hf-hub: id, a local open_clip directory, a model config
    .json, or mmtools-shapes (the bundled offline model). Audio and its text go through CLAP
    (--audio-model); audio is decoded, mixed down, resampled to the model's rate and cut to
    its window (10 s for LAION CLAP). Text goes with the image model when images are embedded.
    Model, weights and precision are stored in the output metadata. Rows whose media cannot
    be decoded, whose text is null or blank (no_text), or whose embedding is NaN or zero
    (bad_embedding) become reject rows in _rejects/. --batch-size is also the model batch.
    """
    from mmtools.steps.embed import ModelOptions, embed_steps

    source = open_source(inputs)
    opts = ModelOptions(
        model, pretrained, audio_model, device, precision, dtype, batch_size, workers
    )
    steps = embed_steps(source.schema.names, split_modalities(modalities), opts)
    common = Common.of(locals())
    execute("embed", source, steps, common)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("embed")(embed)
