"""`mmtools train-head`."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, open_source, report_line, setup_logging
from mmtools.errors import UsageError
from mmtools.tools.train_head import KINDS, TrainConfig

OPTIONS = O.Bundle(
    TrainConfig,
    {
        "label": Annotated[
            str,
            typer.Option(
                "--label",
                help="Column of labels: boolean, 0/1 (a classifier) or float (a regressor); "
                "rows with a null label are ignored.",
                show_default=False,
            ),
        ],
        "embedding": Annotated[str, typer.Option("--embedding", help="Embedding column.")],
        "kind": Annotated[
            str | None,
            typer.Option(
                "--kind",
                help=f"{', '.join(KINDS)} (default: logistic for 0/1 labels, linear otherwise).",
                show_default=False,
            ),
        ],
        "folds": Annotated[int, typer.Option("--folds", min=2, help="Cross-validation folds.")],
        "seed": O.Seed,
        "l2": Annotated[
            float | None,
            typer.Option(
                "--l2",
                min=0.0,
                help="L2 penalty on standardised embeddings (sklearn's 1/C). Default: the "
                "one of 0.1, 1, 10, 100, 1000 with the least out-of-fold loss (MLP: 1).",
                show_default=False,
            ),
        ],
        "hidden": Annotated[int, typer.Option("--hidden", min=1, help="MLP hidden units.")],
        "min_per_class": Annotated[
            int, typer.Option("--min-per-class", min=1, help="Fewest labelled rows per class.")
        ],
    },
)
Output = Annotated[
    str,
    typer.Option(
        "-o",
        "--output",
        help="The head to write: PATH.safetensors and PATH.json beside it.",
        show_default=False,
    ),
]


@O.expand(
    config=OPTIONS.but(label=...),  # required
    common=O.DATASET.only("inputs", "overwrite", "quiet", "verbose", "json").declare(
        overwrite=Annotated[bool, typer.Option("--overwrite", help="Replace an existing head.")]
    ),
)
def train_head(config: TrainConfig, common: Common, output: Output) -> None:
    """Train a head on labelled rows (a probe over an embedding column) for score --head.

    Example: mmtools train-head labelled/ --label blurry -o blurry.safetensors

    Then: mmtools score ds/ --head blurry=blurry.safetensors -o scored/

    Prints the class balance and the k-fold cross-validated AUC (R² for float labels) with
    its 95% interval, then fits on every labelled row. Embeddings are L2-normalised, as
    score --head does. The head records its embedding column and model, so scoring other
    embeddings with it is refused. Seeded: the same input and --seed give the same head.
    """
    from mmtools.models.heads import save
    from mmtools.tools.train_head import fit

    setup_logging(common.verbose, common.quiet)
    if not output.endswith(".safetensors"):
        raise UsageError(f"-o must name a .safetensors file, not {output!r}")
    sidecar = output.removesuffix(".safetensors") + ".json"
    if not common.overwrite and any(os.path.exists(p) for p in (output, sidecar)):
        raise UsageError(f"{output} exists; pass --overwrite to replace it")
    source = open_source(common.inputs)
    bar = _progress(source, common)
    try:
        head, report = fit(source, config, progress=bar and bar.update)
    finally:
        if bar is not None:
            bar.close()  # before any error line
        source.close()
    save(head, output)
    report_line(
        f"mmtools train-head: {report.line()} -> {output}",
        common,
        {"output": output, **head.extra["training"]},
    )


def _progress(source, common: Common):
    """A progress bar over the rows read, on stderr; None with -q or --json."""
    if common.quiet or common.json:
        return None
    from tqdm import tqdm

    return tqdm(
        total=source.total_rows, unit="rows", desc="train-head", file=sys.stderr, leave=False
    )


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("train-head")(train_head)
