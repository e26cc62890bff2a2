"""Options shared by the commands, declared once, and the bundles that fill a config from them.

A `Bundle` pairs a dataclass with the Typer declaration of each field it takes from the
command line; its defaults are the dataclass's own. `expand` puts the bundles' options into a
command's signature (Typer reads `__signature__`) and hands the command the built objects.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import MISSING, dataclass, field, fields
from typing import Annotated, Any

import typer

from mmtools.cli.common import Common
from mmtools.engines.ray.cluster import ENV_ADDRESS, ENV_CONCURRENCY, ENV_GPUS
from mmtools.io.source import AUTO_BATCH_ROWS, BATCH_BYTES
from mmtools.steps.embed.step import EmbedConfig

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
AutoBatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        min=1,
        help=f"Rows per processed batch [default: about {BATCH_BYTES >> 20} MiB of data, at most "
        f"{AUTO_BATCH_ROWS}].",
        show_default=False,
    ),
]
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
MaxRejectRate = Annotated[
    float | None,
    typer.Option(
        "--max-reject-rate",
        min=0,
        max=1,
        help="Exit 7 (after committing the output) when more than this share of the input "
        "rows is rejected by this command; default: only when every row is (1: never).",
        show_default=False,
    ),
]
MaxDropRate = Annotated[
    float | None,
    typer.Option(
        "--max-drop-rate",
        min=0,
        max=1,
        help="Exit 7 (after committing the output) when more than this share of the input "
        "rows is dropped by this command's rules; default: no limit (dedup: 0.95).",
        show_default=False,
    ),
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

Dtype = Annotated[str, typer.Option("--dtype", help="Stored embedding type: float16 or float32.")]
Workers = Annotated[
    int, typer.Option("--workers", min=1, help="Threads decoding media ahead of the model.")
]
DecodeIn = Annotated[
    str,
    typer.Option(
        "--decode-in",
        help="Where images are decoded: threads (of this process) or processes (--workers "
        "of them; for many workers feeding a GPU: threads share Python's lock and stop "
        "scaling near six; Linux; a few seconds to start). Audio: always threads.",
    ),
]
ReducedJpeg = Annotated[
    bool,
    typer.Option(
        "--reduced-jpeg",
        help="Decode large JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, as Pillow's "
        "thumbnail does), keeping at least twice the model's input side: 2-3x faster on "
        "photographs; the model's input differs slightly from a full-size decode.",
    ),
]
AudioModel = Annotated[
    str,
    typer.Option(
        "--audio-model",
        help="CLAP model: a Hugging Face id or a local directory saved with save_pretrained.",
    ),
]


def split_commas(values: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """'a, b' or ['a,b', 'c'] -> ['a', 'b', 'c']: repeated and comma-joined values alike."""
    items = [values] if isinstance(values, str) else values or []
    return [v.strip() for item in items for v in item.split(",") if v.strip()]


@dataclass(frozen=True)
class Bundle:
    """Command-line options that fill one dataclass; defaults are the dataclass's own."""

    cls: type
    options: dict[str, Any]  # field name -> its Annotated Typer declaration
    defaults: dict[str, Any] = field(default_factory=dict)  # a command's own defaults

    def but(self, **defaults: Any) -> Bundle:
        """The same options with some of a command's own defaults."""
        return Bundle(self.cls, self.options, {**self.defaults, **defaults})

    def declare(self, **options: Any) -> Bundle:
        """The same options with some declared differently (other help, other names)."""
        return Bundle(self.cls, {**self.options, **options}, self.defaults)

    def only(self, *names: str) -> Bundle:
        """A subset of the options."""
        return Bundle(self.cls, {n: self.options[n] for n in names}, self.defaults)

    def without(self, *names: str) -> Bundle:
        """All the options but some."""
        kept = [n for n in self.options if n not in names]
        return self.only(*kept)

    def default(self, name: str) -> Any:
        """An option's default: the command's own, else the dataclass field's."""
        if name in self.defaults:
            return self.defaults[name]
        f = next(f for f in fields(self.cls) if f.name == name)
        return f.default_factory() if f.default is MISSING else f.default

    def parameters(self) -> list[inspect.Parameter]:
        """The options as keyword-only parameters, as Typer reads them."""
        kind = inspect.Parameter.KEYWORD_ONLY
        return [
            inspect.Parameter(name, kind, default=self.default(name), annotation=annotation)
            for name, annotation in self.options.items()
        ]

    def build(self, values: dict[str, Any], given: set[str]) -> Any:
        """The dataclass from the parsed options (`given`: the names every bundle declares)."""
        # A field another bundle declares is filled from that option too: embed's
        # --batch-size is the run's batch and the model's.
        names = {f.name for f in fields(self.cls)} & given
        return self.cls(**{n: values[n] for n in names})


def expand(**bundles: Bundle):
    """Decorator: replace each parameter named in `bundles` by that bundle's options.

    The command keeps its own parameters and receives one built object per bundle, so its
    signature lists only what is its own; an option two bundles share is declared once.
    """

    def wrap(command):
        own = [
            p
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.name not in bundles
        ]
        params, seen = list(own), {p.name for p in own}
        for bundle in bundles.values():
            for p in bundle.parameters():
                if p.name not in seen:
                    params.append(p)
                    seen.add(p.name)
        given = seen - {p.name for p in own}

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            built = {name: b.build(values, given) for name, b in bundles.items()}
            return command(**{p.name: values[p.name] for p in own}, **built)

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return wrap


LEDGER_HELP = "Write a row for each dropped row to _dropped/ (or down the pipe); on by default."
# The options of a dataset-to-dataset command.
DATASET = Bundle(
    Common,
    {
        "inputs": Inputs,
        "output": Output,
        "overwrite": Overwrite,
        "shard_rows": ShardRows,
        "shard_bytes": ShardBytes,
        "batch_size": BatchSize,
        "engine": Engine,
        "ray_address": RayAddress,
        "ray_concurrency": Concurrency,
        "num_gpus_per_worker": GpusPerWorker,
        "quiet": Quiet,
        "verbose": Verbose,
        "json": Json,
        "wait_lock": WaitLock,
        "ledger": Annotated[bool, typer.Option("--ledger/--no-ledger", help=LEDGER_HELP)],
        "max_reject_rate": MaxRejectRate,
        "max_drop_rate": MaxDropRate,
    },
)

# The options of a command that runs no model: its batches are sized by bytes by default.
LIGHT = DATASET.declare(batch_size=AutoBatchSize).but(batch_size=None)

# The model options `embed` and `score` share; DATASET's --batch-size is the model batch.
MODEL = Bundle(
    EmbedConfig,
    {
        "model": Model,
        "pretrained": Pretrained,
        "audio_model": AudioModel,
        "device": Device,
        "precision": Precision,
        "dtype": Dtype,
        "workers": Workers,
        "decode_in": DecodeIn,
        "reduced_jpeg": ReducedJpeg,
    },
)
