"""Options every command shares, spelled the same everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

from mmtools.engines.ray.cluster import ENV_ADDRESS, ENV_CONCURRENCY, ENV_GPUS

Inputs = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="INPUT",
        help="Dataset directory, Parquet file or glob; '-' (or nothing, in a pipe) reads an "
        "Arrow stream from stdin.",
        show_default=False,
    ),
]
Output = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--output",
        help="Output dataset directory; '-' writes an Arrow stream to stdout (the default when "
        "stdout is a pipe).",
        show_default=False,
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Start over instead of resuming an existing output.")
]
ShardRows = Annotated[
    int, typer.Option("--shard-rows", min=1, help="Rows per output Parquet shard (about).")
]
ShardBytes = Annotated[
    int, typer.Option("--shard-bytes", min=1 << 20, help="Bytes per output shard, at most.")
]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Rows per processed batch.")]
Engine = Annotated[
    str, typer.Option("--engine", help="Where to run: 'local' (this process) or 'ray'.")
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        envvar=ENV_ADDRESS,
        help="With --engine ray: the cluster to join ('auto': the one running here, or "
        "HOST:PORT, ray://HOST:PORT); default: start a local cluster for this run.",
        show_default=False,
    ),
]
_RAY_CONCURRENCY = dict(
    envvar=ENV_CONCURRENCY,
    min=1,
    help="With --engine ray: model-loading workers (actors) per model step; default: "
    "from 1 up to what the cluster's CPUs or GPUs allow.",
    show_default=False,
)
Concurrency = Annotated[
    int | None, typer.Option("--concurrency", "--ray-concurrency", **_RAY_CONCURRENCY)
]
# rewrite's own --concurrency is its requests in flight
RayConcurrency = Annotated[int | None, typer.Option("--ray-concurrency", **_RAY_CONCURRENCY)]
GpusPerWorker = Annotated[
    float | None,
    typer.Option(
        "--num-gpus-per-worker",
        envvar=ENV_GPUS,
        min=0,
        help="With --engine ray: GPUs each model worker reserves (0.5: two share a GPU); "
        "default: 1 when the cluster has GPUs, else 0.",
        show_default=False,
    ),
]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar or summary line.")]
Verbose = Annotated[
    bool, typer.Option("-v", "--verbose", help="More logging; full tracebacks on errors.")
]
Json = Annotated[
    bool, typer.Option("--json", help="Print the end-of-run summary as JSON on stderr.")
]
WaitLock = Annotated[
    bool,
    typer.Option("--wait-lock", help="Wait for another run writing the same output to finish."),
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; same seed, same output.")]
Model = Annotated[
    str,
    typer.Option(
        "--model", help="Model name (open_clip architecture, 'hf-hub:…', or 'mmtools-shapes')."
    ),
]
Pretrained = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="Pretrained tag (e.g. laion2b_s34b_b79k) or a local checkpoint file/directory.",
        show_default=False,
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
Precision = Annotated[str, typer.Option("--precision", help="fp32, fp16 or bf16.")]
