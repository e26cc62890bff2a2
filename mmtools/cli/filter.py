"""`mmtools filter`."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute, open_source
from mmtools.errors import UsageError
from mmtools.steps.filter.near import NearConfig
from mmtools.steps.filter.step import FilterConfig


def _audio(help: str, **kw) -> object:
    """An audio rule's option: a number, unset by default."""
    return Annotated[float | None, typer.Option(help=f"Audio: {help}", show_default=False, **kw)]


OPTIONS = O.Bundle(
    FilterConfig,
    {
        "where": Annotated[
            str | None,
            typer.Option(
                "--where",
                help="SQL condition over any columns (polars SQL), e.g. "
                '"clip_score >= 0.28 AND width >= 256".',
                show_default=False,
            ),
        ],
        "presets": Annotated[
            list[str] | None,
            typer.Option(
                "--preset",
                help="Named rules: datacomp-basic, laion, audio-basic (repeatable).",
                show_default=False,
            ),
        ],
        "top_fraction": Annotated[
            float | None,
            typer.Option(
                "--top-fraction",
                help="Keep this fraction of the whole input with the highest --by (e.g. 0.3).",
                show_default=False,
            ),
        ],
        "top_k": Annotated[
            int | None,
            typer.Option(
                "--top-k",
                min=0,
                help="Keep this many rows of the whole input with the highest --by.",
                show_default=False,
            ),
        ],
        "by": Annotated[
            str | None,
            typer.Option(
                "--by",
                help="Numeric column to rank by (ties: smaller id first).",
                show_default=False,
            ),
        ],
        "min_duration": _audio("shortest clip kept, seconds."),
        "max_duration": _audio("longest clip kept, seconds."),
        "max_silence": _audio(
            "largest fraction of silent frames kept (decodes the audio).", min=0, max=1
        ),
        "min_loudness": _audio(
            "quietest overall RMS level kept, dBFS (e.g. -50; decodes the audio)."
        ),
        "silence_db": Annotated[
            float,
            typer.Option(help="Audio: frames with RMS below this dBFS level count as silent."),
        ],
        "invert": Annotated[
            bool, typer.Option("--invert", help="Write the rows the rules would drop instead.")
        ],
    },
)


NEAR = O.Bundle(
    NearConfig,
    {
        "reference": Annotated[
            str | None,
            typer.Option(
                "--near",
                metavar="REFERENCE",
                help="Keep rows whose nearest neighbour in REFERENCE (a dataset, or an index "
                "from mmtools index) has cosine >= --min-sim.",
                show_default=False,
            ),
        ],
        "min_sim": Annotated[
            float | None,
            typer.Option(
                "--min-sim", help="With --near: the least cosine kept.", show_default=False
            ),
        ],
        "column": Annotated[
            str | None,
            typer.Option(
                "--near-column",
                help="With --near: the embedding column compared (default: the index's, or "
                "image_embedding).",
                show_default=False,
            ),
        ],
    },
)


@O.expand(config=OPTIONS, near=NEAR, common=O.LIGHT)
def filter_rows(config: FilterConfig, near: NearConfig, common: Common) -> None:
    """Keep the rows that pass every rule; count the rest by the rule that dropped them.

    Example: mmtools filter scored/ --where "clip_score >= 0.28 AND width >= 256" -o kept/

    Rules: --where (any polars SQL condition; NaN counts as NULL, and a NULL result drops
    the row), --top-fraction/--top-k --by COLUMN (the best rows of the whole input, exact,
    in two passes that hold only the key and id columns; a pipe on stdin is spooled to a
    temporary file; DataComp's CLIP-score baseline is --top-fraction 0.3 --by clip_score),
    --preset, and the audio rules. The ranking covers the whole input and the other rules
    are applied to the same rows, as DataComp intersects its baselines.

    Presets: datacomp-basic (more than 2 words and 5 characters of caption, smaller side
    >= 200 px, aspect ratio <= 3, English where a `language` column exists); laion
    (clip_score >= 0.28, caption >= 5 characters, image >= 5 KB where image_nbytes
    exists, English where a `language` column exists); audio-basic (>= 1 s, at most half
    the frames below -60 dBFS, overall RMS >= -50 dBFS).

    The summary counts dropped rows by rule (where, top_fraction, min_words, min_chars,
    min_side, max_aspect, english, clip_score, min_bytes, duration, silence, loudness).
    --invert writes exactly the rows that would be dropped; the kept ones are then counted
    as dropped by 'inverted'.

    --near REFERENCE --min-sim X keeps the rows whose nearest neighbour in REFERENCE (a
    dataset, or an index from mmtools index, e.g. k-means centres) has cosine >= X, counted
    as 'near'; rows without a usable embedding become reject rows.
    """
    from mmtools.steps.filter.near import near_steps
    from mmtools.steps.filter.step import make_filter

    step = make_filter(replace(config, presets=tuple(config.presets or ())))
    steps = [step] if step.rules or step.top is not None else []
    steps += near_steps(near, other_rules=bool(steps))
    if not steps:
        raise UsageError(
            "give at least one rule: --where, --top-fraction/--top-k, --preset, --near, or an "
            "audio option"
        )
    execute("filter", open_source(common.inputs), steps, common)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("filter")(filter_rows)
