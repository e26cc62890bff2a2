"""Row filters: SQL expressions, a global top fraction, named rule presets and audio rules.

Every rule is a named keep-condition. A row that fails several rules is counted under the
first one that fails, in this order: `top_fraction`, `where`, the preset rules, the audio
duration rule, then the audio rules that decode the waveform (`silence`, `loudness`), which
only decode the rows still alive. With `invert`, the rows some rule would drop are written
and the rows every rule keeps are counted as dropped by `inverted`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.step import GlobalStep, Result, Step, rejects_at
from mmtools.steps.filter.rank import TopFraction, TopFractionConfig

INVERTED_NOTE = "would_drop_"  # with --invert: rows each rule matched, as summary notes
ENGLISH = r"(?i)^(en|eng|english)([-_].*)?$"
FRAME_LENGTH, HOP_LENGTH = 2048, 512


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
        if self.name == "silence":
            return float(np.mean(frames_db < self.silence_db)) <= self.limit
        return rms_db >= self.limit


_ENGLISH_RULE = Rule("english", _english, (), (C.LANGUAGE,), optional=True)

# DataComp "basic": the baseline's own script (mlfoundations/datacomp, baselines/apply_filter.py)
# keeps > 2 words and > 5 characters, English (fastText), smaller side >= 200 px, aspect <= 3.
# LAION-400M/5B: alt-text of >= 5 characters, images of >= 5 KB, CLIP ViT-B/32 score >= 0.28
# (the LAION-2B-en threshold; DataComp's "laion" baseline adds English detection).
PRESETS: dict[str, list[Rule | AudioRule]] = {
    "datacomp-basic": [
        Rule("min_words", _min_words, (3,), (C.TEXT,)),
        Rule("min_chars", _min_chars, (6,), (C.TEXT,)),
        Rule("min_side", _min_side, (200,), (C.WIDTH, C.HEIGHT)),
        Rule("max_aspect", _max_aspect, (3.0,), (C.WIDTH, C.HEIGHT)),
        _ENGLISH_RULE,
    ],
    "laion": [
        Rule("clip_score", _between, (C.CLIP_SCORE, 0.28, None), (C.CLIP_SCORE,)),
        Rule("min_chars", _min_chars, (5,), (C.TEXT,)),
        Rule("min_bytes", _between, (C.IMAGE_NBYTES, 5000, None), (C.IMAGE_NBYTES,), True),
        _ENGLISH_RULE,
    ],
    "audio-basic": [
        Rule("duration", _between, (C.DURATION, 1.0, None), (C.DURATION,)),
        AudioRule("silence", 0.5),
        AudioRule("loudness", -50.0),
    ],
}


@dataclass
class FilterConfig:
    """What `mmtools filter` keeps; every set option is one more rule that must hold."""

    where: str | None = None
    presets: tuple[str, ...] = ()
    by: str | None = None
    top_fraction: float | None = None
    top_k: int | None = None
    min_duration: float | None = None
    max_duration: float | None = None
    max_silence: float | None = None
    min_loudness: float | None = None
    silence_db: float = -60.0
    invert: bool = False


def build_rules(config: FilterConfig) -> list[Rule | AudioRule]:
    """The expression and audio rules of `config`, in the order they are counted."""
    rules: list = []
    if config.where is not None:
        rules.append(Rule("where", _sql, (config.where,)))
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
            )
        )
    if config.max_silence is not None:
        rules.append(AudioRule("silence", config.max_silence, config.silence_db))
    if config.min_loudness is not None:
        rules.append(AudioRule("loudness", config.min_loudness))
    return sorted(rules, key=lambda r: isinstance(r, AudioRule))


# -- SQL -----------------------------------------------------------------------------------


def _sql(expression: str):
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
        frame = pl.from_arrow(schema.empty_table().select(names))
        dtype = frame.select(expr).dtypes[0] if names else pl.select(expr).dtypes[0]
    except pl.exceptions.PolarsError as e:
        raise UsageError(f"{where}: {str(e).splitlines()[0]}; {available}") from None
    if dtype != pl.Boolean:
        raise UsageError(f"{where} must be a condition (true or false); it gives {dtype}")
    return names


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


# -- the global top fraction ----------------------------------------------------------------


# -- the filter step -------------------------------------------------------------------------


@dataclass
class _Verdict:
    alive: np.ndarray
    dropped: dict[str, int] = field(default_factory=dict)
    rejects: list[tuple[int, str, str]] = field(default_factory=list)

    def fail(self, name: str, keep: np.ndarray) -> None:
        lost = self.alive & ~keep
        if lost.any():
            self.dropped[name] = self.dropped.get(name, 0) + int(lost.sum())
            self.alive &= keep


class Filter(Step):
    """Keep the rows that pass every rule; count the others by the first rule they fail."""

    name = "filter"
    transient = ("_pool",)

    def __init__(self, config: FilterConfig):
        super().__init__(config)
        self.rules = build_rules(config)
        self.top = None
        if config.top_fraction is not None or config.top_k is not None:
            self.top = TopFraction(
                TopFractionConfig(by=config.by, fraction=config.top_fraction, k=config.top_k)
            )
        self._active: list | None = None
        self._exprs = None
        self._pool: ThreadPoolExecutor | None = None

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The input schema, after checking every rule against it (before any row is read)."""
        self._active = self._plan(schema)
        if self.top is not None:
            self.top.output_schema(schema)
        return schema

    def _plan(self, schema: pa.Schema) -> list:
        active = []
        for rule in self.rules:
            if isinstance(rule, Rule) and rule.build is _sql:
                rule = Rule("where", _sql, rule.args, tuple(sql_columns(rule.args[0], schema)))
            if rule.optional and not set(rule.columns) <= set(schema.names):
                continue
            C.require(schema, rule.columns, f"filter rule {rule.name}")
            active.append(rule)
        return active

    def setup(self) -> None:
        """Start the audio decoding threads when an audio rule is on."""
        if any(isinstance(r, AudioRule) for r in self.rules):
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="filter-audio")

    def close(self) -> None:
        """Stop the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def process(self, batch: pa.RecordBatch) -> Result:
        """Apply the rules to one batch."""
        if self._active is None:
            self._active = self._plan(batch.schema)
        v = _Verdict(np.ones(batch.num_rows, bool))
        if self.top is not None:
            v.fail(self.top.name, self.top.keep(batch))
        exprs = [r for r in self._active if isinstance(r, Rule)]
        for rule, keep in zip(exprs, self._evaluate(batch, exprs), strict=True):
            v.fail(rule.name, keep)
        audio = [r for r in self._active if isinstance(r, AudioRule)]
        if audio and v.alive.any():
            self._audio(batch, audio, v)
        return self._result(batch, v)

    def _evaluate(self, batch: pa.RecordBatch, rules: list[Rule]) -> list[np.ndarray]:
        """Every expression rule in one polars pass over only the columns they read."""
        import polars as pl

        if not rules:
            return []
        if self._exprs is None:
            self._exprs = [r.expr().fill_null(False).alias(f"r{i}") for i, r in enumerate(rules)]
        names = list(dict.fromkeys(c for r in rules for c in r.columns))
        try:
            frame = pl.from_arrow(batch.select(names)).fill_nan(None) if names else pl.DataFrame()
            out = frame.select(self._exprs)
        except pl.exceptions.PolarsError as e:
            msg = str(e).splitlines()[0]
            raise UsageError(f"a filter rule failed on the data: {msg}") from None
        n = batch.num_rows
        return [
            np.broadcast_to(s.to_numpy(), n) if s.len() == 1 and n != 1 else s.to_numpy()
            for s in out.get_columns()
        ]

    def _audio(self, batch: pa.RecordBatch, rules: list[AudioRule], v: _Verdict) -> None:
        """Decode the live rows' audio once and apply every audio rule."""
        from mmtools.media import cells

        rows = np.flatnonzero(v.alive)
        levels = list(self._pool.map(_levels, cells(batch.column(C.AUDIO).take(pa.array(rows)))))
        for rule in rules:
            keep = np.ones(batch.num_rows, bool)
            for i, level in zip(rows, levels, strict=True):
                keep[i] = not isinstance(level, tuple) or rule.passes(*level)
            v.fail(rule.name, keep)
        for i, level in zip(rows, levels, strict=True):
            if isinstance(level, Exception) and v.alive[i]:
                v.rejects.append((i, getattr(level, "reason", "corrupt"), str(level)))
                v.alive[i] = False

    def _result(self, batch: pa.RecordBatch, v: _Verdict) -> Result:
        rejects = None
        if v.rejects:
            why = {i: (r, d) for i, r, d in v.rejects}
            rejects = rejects_at(self.name, batch, list(why), why)
        rejected = np.zeros(batch.num_rows, bool)
        rejected[[i for i, _, _ in v.rejects]] = True
        if not self.config.invert:
            return Result(batch.filter(pa.array(v.alive)), rejects, v.dropped)
        out = ~v.alive & ~rejected
        kept = int(v.alive.sum())
        notes = {f"{INVERTED_NOTE}{name}": n for name, n in v.dropped.items()}
        return Result(
            batch.filter(pa.array(out)), rejects, {"inverted": kept} if kept else {}, notes=notes
        )


class RankedFilter(Filter, GlobalStep):
    """A filter with a global top fraction: pass 1 scans the key column, pass 2 filters."""

    @property
    def scan_columns(self) -> tuple[str, ...]:
        """The id and key columns."""
        return self.top.scan_columns

    def keys(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Pass 1 where the batch is: ids and keys."""
        return self.top.keys(batch)

    def scan(self, batch: pa.RecordBatch) -> None:
        """Pass 1: remember keys and ids."""
        self.top.scan(batch)

    def finish_scan(self) -> None:
        """Find the cut."""
        self.top.finish_scan()

    def sort_order(self) -> list[tuple[str, str]]:
        """The order in which the best key rows come first."""
        return self.top.sort_order()

    def wanted(self, n: int) -> int:
        """How many of `n` rows to keep."""
        return self.top.wanted(n)

    def set_cut(self, n: int, last: dict | None) -> None:
        """The cut from the k-th best key row (found by a distributed sort)."""
        self.top.set_cut(n, last)


def make_filter(config: FilterConfig) -> Filter:
    """The filter step for `config`: a two-pass one when it ranks the whole input."""
    if (config.top_fraction is None) == (config.top_k is None):
        if config.top_fraction is not None:
            raise UsageError("give --top-fraction or --top-k, not both")
        if config.by is not None:
            raise UsageError("--by needs --top-fraction or --top-k")
        return Filter(config)
    if config.by is None:
        raise UsageError("--top-fraction/--top-k need --by COLUMN (e.g. --by clip_score)")
    if config.top_fraction is not None and not 0 < config.top_fraction <= 1:
        raise UsageError(f"--top-fraction must be in (0, 1], not {config.top_fraction}")
    return RankedFilter(config)


def _levels(value):
    """(per-frame RMS in dBFS, overall RMS in dBFS) of one clip, or the MediaError."""
    from mmtools.media import MediaError, decode_audio, read

    try:
        wav, _ = decode_audio(read(value, "audio"))
        import librosa

        rms = librosa.feature.rms(y=wav, frame_length=FRAME_LENGTH, hop_length=HOP_LENGTH)[0]
        overall = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
        return 20 * np.log10(np.maximum(rms, 1e-10)), 20 * np.log10(max(overall, 1e-10))
    except MediaError as e:
        return e
