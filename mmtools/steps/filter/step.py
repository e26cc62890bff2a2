"""Row filters: SQL expressions, a global top fraction, named rule presets and audio rules.

Every rule is a named keep-condition. A row that fails several rules is counted under the
first one that fails, in this order: `top_fraction`, `where`, the preset rules, the audio
duration rule, then the audio rules that decode the waveform (`silence`, `loudness`), which
only decode the rows still alive. With `invert`, the rows some rule would drop are written
and the rows every rule keeps are counted as dropped by `inverted`.

Each dropped row gets a ledger row with the value its rule measured (`Rule.measure`): the
score or column a threshold reads, the caption's words or characters, the smaller image
side, the aspect ratio, the silent share of the frames, the loudness; null for a rule that
measures no number (`english`, an SQL condition on more than one column, `inverted`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.step import GlobalStep, Result, Step, concat_rows, rejects_at
from mmtools.steps.filter.rank import TopFraction, TopFractionConfig
from mmtools.steps.filter.rules import (
    AudioRule,
    Rule,
    build_rules,
    sql_columns,
    sql_condition,
    where_rule,
)

INVERTED_NOTE = "would_drop_"  # with --invert: rows each rule matched, as summary notes
FRAME_LENGTH, HOP_LENGTH = 2048, 512
__all__ = ["Filter", "FilterConfig", "RankedFilter", "make_filter", "sql_columns"]


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


# -- the global top fraction ----------------------------------------------------------------


# -- the filter step -------------------------------------------------------------------------


@dataclass
class _Verdict:
    alive: np.ndarray
    dropped: dict[str, int] = field(default_factory=dict)
    rejects: list[tuple[int, str, str]] = field(default_factory=list)
    # With the ledger on: (rule, rows it dropped, the values it measured or None) per rule.
    drops: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None

    def fail(self, name: str, keep: np.ndarray, value: np.ndarray | None = None) -> None:
        lost = self.alive & ~keep
        if lost.any():
            self.dropped[name] = self.dropped.get(name, 0) + int(lost.sum())
            self.alive &= keep
            if self.drops is not None:
                self.drops.append((name, lost, value))


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

    @property
    def light(self) -> bool:  # type: ignore[override]
        """No audio rule (those decode the audio)."""
        return not any(isinstance(r, AudioRule) for r in self.rules)

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The input schema, after checking every rule against it (before any row is read)."""
        self._active = self._plan(schema)
        if self.top is not None:
            self.top.output_schema(schema)
        return schema

    def _plan(self, schema: pa.Schema) -> list:
        active = []
        for rule in self.rules:
            if isinstance(rule, Rule) and rule.build is sql_condition:
                rule = where_rule(rule.args[0], schema)
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
        v = _Verdict(np.ones(batch.num_rows, bool), drops=[] if self.ledger else None)
        if self.top is not None:
            v.fail(self.top.name, self.top.keep(batch), self.top.measure(batch, self.ledger))
        exprs = [r for r in self._active if isinstance(r, Rule)]
        for rule, (keep, value) in zip(exprs, self._evaluate(batch, exprs), strict=True):
            v.fail(rule.name, keep, value)
        audio = [r for r in self._active if isinstance(r, AudioRule)]
        if audio and v.alive.any():
            self._audio(batch, audio, v)
        return self._result(batch, v)

    def _evaluate(
        self, batch: pa.RecordBatch, rules: list[Rule]
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Every expression rule in one polars pass over only the columns they read: whether
        each row passes, and (with the ledger on) the value the rule measured."""
        import polars as pl

        if not rules:
            return []
        if self._exprs is None:
            self._exprs = [r.expr().fill_null(False).alias(f"r{i}") for i, r in enumerate(rules)]
            measured = [i for i, r in enumerate(rules) if r.measure is not None and self.ledger]
            measures = [rules[i].measure().cast(pl.Float64).alias(f"m{i}") for i in measured]
            self._measured, self._exprs = measured, self._exprs + measures
        names = list(dict.fromkeys(c for r in rules for c in r.columns))
        try:
            frame = pl.from_arrow(batch.select(names)).fill_nan(None) if names else pl.DataFrame()
            out = frame.select(self._exprs)
        except pl.exceptions.PolarsError as e:
            msg = str(e).splitlines()[0]
            raise UsageError(f"a filter rule failed on the data: {msg}") from None
        n = batch.num_rows
        cols = [
            np.broadcast_to(s.to_numpy(), n) if s.len() == 1 and n != 1 else s.to_numpy()
            for s in out.get_columns()
        ]
        values: list[np.ndarray | None] = [None] * len(rules)
        for i, col in zip(self._measured, cols[len(rules) :], strict=True):
            values[i] = col
        return list(zip(cols[: len(rules)], values, strict=True))

    def _audio(self, batch: pa.RecordBatch, rules: list[AudioRule], v: _Verdict) -> None:
        """Decode the live rows' audio once and apply every audio rule."""
        from mmtools.media import cells

        rows = np.flatnonzero(v.alive)
        levels = list(self._pool.map(_levels, cells(batch.column(C.AUDIO).take(pa.array(rows)))))
        for rule in rules:
            keep = np.ones(batch.num_rows, bool)
            value = np.full(batch.num_rows, np.nan)
            for i, level in zip(rows, levels, strict=True):
                if isinstance(level, tuple):
                    keep[i], value[i] = rule.passes(*level), rule.value(*level)
            v.fail(rule.name, keep, value)
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
            drops = [
                self.drop_rows(batch, lost, rule, value) for rule, lost, value in v.drops or ()
            ]
            kept = batch if v.alive.all() else batch.filter(pa.array(v.alive))  # no copy
            return Result(kept, rejects, v.dropped, drops=concat_rows(*drops))
        out = ~v.alive & ~rejected
        kept = int(v.alive.sum())
        notes = {f"{INVERTED_NOTE}{name}": n for name, n in v.dropped.items()}
        return Result(
            batch.filter(pa.array(out)),
            rejects,
            {"inverted": kept} if kept else {},
            notes=notes,
            drops=self.drop_rows(batch, v.alive, "inverted"),
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
