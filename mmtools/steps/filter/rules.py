"""The filter's rules: named keep-conditions (polars expressions, SQL, audio levels), what
each measures for the drop ledger, and the presets."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import UsageError

if TYPE_CHECKING:
    from mmtools.steps.filter.step import FilterConfig

ENGLISH = r"(?i)^(en|eng|english)([-_].*)?$"


# -- rule expressions (polars is imported lazily: `mmtools --help` must stay fast) --------


def _col(name: str):
    import polars as pl

    return pl.col(name)


def _min_words(n: int):
    return _col(C.TEXT).str.count_matches(r"\S+") >= n


def _min_chars(n: int):
    return _col(C.TEXT).str.len_chars() >= n


def _min_side(n: int):
    import polars as pl

    return pl.min_horizontal(_col(C.WIDTH), _col(C.HEIGHT)) >= n


def _max_aspect(ratio: float):
    import polars as pl

    lo = pl.min_horizontal(_col(C.WIDTH), _col(C.HEIGHT)).cast(pl.Float64)
    hi = pl.max_horizontal(_col(C.WIDTH), _col(C.HEIGHT)).cast(pl.Float64)
    return (lo > 0) & (hi <= ratio * lo)


def _english():
    return _col(C.LANGUAGE).str.contains(ENGLISH)


# What each rule measured, for the ledger: polars float expressions (null: none).


def _words():
    return _col(C.TEXT).str.count_matches(r"\S+")


def _chars():
    return _col(C.TEXT).str.len_chars()


def _side():
    import polars as pl

    return pl.min_horizontal(_col(C.WIDTH), _col(C.HEIGHT))


def _aspect():
    import polars as pl

    lo = pl.min_horizontal(_col(C.WIDTH), _col(C.HEIGHT)).cast(pl.Float64)
    return pl.max_horizontal(_col(C.WIDTH), _col(C.HEIGHT)).cast(pl.Float64) / lo


def _value(column: str):
    import polars as pl

    return _col(column).cast(pl.Float64)


def _between(column: str, lo: float | None, hi: float | None):
    import polars as pl

    x = _col(column).cast(pl.Float64)
    keep = x.is_not_nan()  # NaN passes polars comparisons; a NaN score must not
    if lo is not None:
        keep = keep & (x >= lo)
    if hi is not None:
        keep = keep & (x <= hi)
    return keep


@dataclass(frozen=True)
class Rule:
    """A named keep-condition: `build(*args)` is a polars expression over `columns`."""

    name: str
    build: Callable
    args: tuple = ()
    columns: tuple[str, ...] = ()
    optional: bool = False  # skipped (not an error) when its columns are missing
    measure: Callable | None = None  # () -> the polars expression of the value it tests

    def expr(self):
        """The polars boolean expression; null counts as failing."""
        return self.build(*self.args)


@dataclass(frozen=True)
class AudioRule:
    """A keep-condition on the decoded waveform: silent-frame ratio or overall RMS level."""

    name: str  # "silence" (at most `limit` of the frames below `silence_db`) or "loudness"
    limit: float
    silence_db: float = -60.0
    columns: tuple[str, ...] = (C.AUDIO,)
    optional: bool = False

    def passes(self, frames_db: np.ndarray, rms_db: float) -> bool:
        """Whether a clip with these levels (dBFS) passes."""
        value = self.value(frames_db, rms_db)
        return value <= self.limit if self.name == "silence" else value >= self.limit

    def value(self, frames_db: np.ndarray, rms_db: float) -> float:
        """What the rule tests: the share of silent frames, or the RMS level (dBFS)."""
        if self.name == "silence":
            return float(np.mean(frames_db < self.silence_db))
        return rms_db


_DURATION = partial(_value, C.DURATION)
_ENGLISH_RULE = Rule("english", _english, (), (C.LANGUAGE,), optional=True)

# DataComp "basic": the baseline's own script (mlfoundations/datacomp, baselines/apply_filter.py)
# keeps > 2 words and > 5 characters, English (fastText), smaller side >= 200 px, aspect <= 3.
# LAION-400M/5B: alt-text of >= 5 characters, images of >= 5 KB, CLIP ViT-B/32 score >= 0.28
# (the LAION-2B-en threshold; DataComp's "laion" baseline adds English detection).
PRESETS: dict[str, list[Rule | AudioRule]] = {
    "datacomp-basic": [
        Rule("min_words", _min_words, (3,), (C.TEXT,), measure=_words),
        Rule("min_chars", _min_chars, (6,), (C.TEXT,), measure=_chars),
        Rule("min_side", _min_side, (200,), (C.WIDTH, C.HEIGHT), measure=_side),
        Rule("max_aspect", _max_aspect, (3.0,), (C.WIDTH, C.HEIGHT), measure=_aspect),
        _ENGLISH_RULE,
    ],
    "laion": [
        Rule(
            "clip_score",
            _between,
            (C.CLIP_SCORE, 0.28, None),
            (C.CLIP_SCORE,),
            measure=partial(_value, C.CLIP_SCORE),
        ),
        Rule("min_chars", _min_chars, (5,), (C.TEXT,), measure=_chars),
        Rule(
            "min_bytes",
            _between,
            (C.IMAGE_NBYTES, 5000, None),
            (C.IMAGE_NBYTES,),
            True,
            partial(_value, C.IMAGE_NBYTES),
        ),
        _ENGLISH_RULE,
    ],
    "audio-basic": [
        Rule("duration", _between, (C.DURATION, 1.0, None), (C.DURATION,), measure=_DURATION),
        AudioRule("silence", 0.5),
        AudioRule("loudness", -50.0),
    ],
}


def build_rules(config: FilterConfig) -> list[Rule | AudioRule]:
    """The expression and audio rules of `config`, in the order they are counted."""
    rules: list = []
    if config.where is not None:
        rules.append(Rule("where", sql_condition, (config.where,)))
    for name in config.presets:
        if name not in PRESETS:
            raise UsageError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        rules += PRESETS[name]
    if config.min_duration is not None or config.max_duration is not None:
        rules.append(
            Rule(
                "duration",
                _between,
                (C.DURATION, config.min_duration, config.max_duration),
                (C.DURATION,),
                measure=_DURATION,
            )
        )
    if config.max_silence is not None:
        rules.append(AudioRule("silence", config.max_silence, config.silence_db))
    if config.min_loudness is not None:
        rules.append(AudioRule("loudness", config.min_loudness))
    return sorted(rules, key=lambda r: isinstance(r, AudioRule))


# -- SQL -----------------------------------------------------------------------------------


def sql_condition(expression: str):
    import polars as pl

    return pl.sql_expr(expression)


def sql_columns(expression: str, schema: pa.Schema) -> list[str]:
    """Columns an SQL expression reads; a usage error for a bad one, checked on `schema`."""
    import polars as pl

    where = f"--where {expression!r}"
    available = f"the input has columns {', '.join(schema.names)}"
    try:
        expr = pl.sql_expr(expression)
    except pl.exceptions.PolarsError:
        raise UsageError(f"{where} is not valid SQL: {_parse_error(expression)}") from None
    names = list(dict.fromkeys(expr.meta.root_names()))
    if unknown := [n for n in names if n not in schema.names]:
        raise UsageError(f"{where}: unknown column {', '.join(unknown)}; {available}") from None
    try:
        # An empty table from its batches: Schema.empty_table() imports pandas.
        frame = pl.from_arrow(pa.Table.from_batches([], schema).select(names))
        dtype = frame.select(expr).dtypes[0] if names else pl.select(expr).dtypes[0]
    except pl.exceptions.PolarsError as e:
        raise UsageError(f"{where}: {str(e).splitlines()[0]}; {available}") from None
    if dtype != pl.Boolean:
        raise UsageError(f"{where} must be a condition (true or false); it gives {dtype}")
    return names


def where_rule(expression: str, schema: pa.Schema) -> Rule:
    """The --where rule, checked on `schema`; it measures its column when it reads one number."""
    columns = tuple(sql_columns(expression, schema))
    one = len(columns) == 1 and _numeric(schema.field(columns[0]).type)
    measure = partial(_value, columns[0]) if one else None
    return Rule("where", sql_condition, (expression,), columns, measure=measure)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _parse_error(expression: str) -> str:
    """The parser's message for `expression`, with the column counted within it."""
    import polars as pl

    prefix = "SELECT * FROM t WHERE "
    try:
        pl.SQLContext(t=pl.DataFrame()).execute(prefix + expression, eager=True)
    except pl.exceptions.PolarsError as e:
        msg = str(e).splitlines()[0].removeprefix("sql parser error: ")
        at = r"(Line: \d+, )?Column: (\d+)"
        return re.sub(at, lambda m: f"column {int(m[2]) - len(prefix)}", msg)
    return "cannot parse it as an expression"
