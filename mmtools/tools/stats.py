"""Per-column distributions of a dataset in one streaming pass with bounded memory.

Exact: row count, nulls, NaN or infinite values, min, max, mean and standard deviation
(merged per batch with Chan's parallel update). Approximate beyond `sample_size` finite
values per column: quantiles and histograms come from a uniform random sample of that many
values (bottom-k sampling on random priorities, seeded, so reruns agree); with fewer values
they are exact. The rank error of a quantile from a sample of K values is about 1/sqrt(K)
(0.3% for the default 100,000). Top string values use a Misra–Gries counter of `capacity`
entries per column: counts are lower bounds, short by at most the reported `top_error`
(0 when exact)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
UNIQUE_KEYS = (C.ID, C.IMAGE_SHA256, C.AUDIO_SHA256, C.SOURCE)  # top values say nothing
CAPTIONS = (C.TEXT, C.TEXT_ORIGINAL, C.TEXT_SYNTHETIC)
SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class StatsConfig:
    """What `mmtools stats` measures."""

    columns: tuple[str, ...] | None = None  # None: every column except media bytes
    sample_size: int = 100_000
    capacity: int = 1000
    top: int = 10
    bins: int = 20
    seed: int = 0
    cuts: tuple[tuple[str, float], ...] = ()  # (column, threshold): rows kept (>=) and dropped


class Numeric:
    """Exact moments and extremes, and a bounded uniform sample for quantiles."""

    def __init__(self, sample_size: int, rng: np.random.Generator):
        self.k, self.rng = sample_size, rng
        self.count = self.nulls = self.non_finite = 0
        self.min, self.max, self.mean, self.m2 = math.inf, -math.inf, 0.0, 0.0
        self.sample, self.prio = np.empty(0), np.empty(0)

    def update(self, values: pa.Array) -> None:
        """Add one batch of values (nulls, NaN and ±inf are counted, not measured)."""
        self.nulls += values.null_count
        x = pc.drop_null(values.cast(pa.float64())).to_numpy(zero_copy_only=False)
        finite = np.isfinite(x)
        self.non_finite += int((~finite).sum())
        x = x[finite]
        if not len(x):
            return
        n, mean = len(x), float(x.mean())
        total = self.count + n
        delta = mean - self.mean
        self.m2 += float(((x - mean) ** 2).sum()) + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        self.sample = np.concatenate([self.sample, x])
        self.prio = np.concatenate([self.prio, self.rng.random(n)])
        if len(self.sample) > 2 * self.k:
            self._shrink()

    def _shrink(self) -> None:
        if len(self.sample) > self.k:
            keep = np.argpartition(self.prio, self.k)[: self.k]
            self.sample, self.prio = self.sample[keep], self.prio[keep]

    def report(self, bins: int) -> dict:
        """count, nulls, non-finite, min, max, mean, std, quantiles and a histogram."""
        self._shrink()
        out = {"count": self.count, "nulls": self.nulls, "non_finite": self.non_finite}
        if not self.count:
            return out
        sampled = len(self.sample) < self.count
        qs = dict(zip(QUANTILES, np.quantile(self.sample, QUANTILES).tolist(), strict=True))
        counts, edges = np.histogram(self.sample, bins=bins, range=(self.min, self.max))
        if sampled:
            counts = np.rint(counts * (self.count / len(self.sample))).astype(int)
        out.update(
            min=self.min,
            max=self.max,
            mean=self.mean,
            std=math.sqrt(self.m2 / self.count),
            quantiles={f"p{round(q * 100):02d}": v for q, v in qs.items()},
            histogram={"edges": edges.tolist(), "counts": counts.tolist()},
            sampled=sampled,
        )
        return out


class TopValues:
    """Most frequent values with a Misra–Gries counter of bounded size, merged per batch."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.table = pa.table({"value": pa.array([], pa.string()), "n": pa.array([], pa.int64())})
        self.error = 0

    def update(self, values: pa.Array) -> None:
        """Count one batch of values."""
        vc = pc.value_counts(pc.drop_null(values.cast(pa.string())))
        batch = pa.table({"value": vc.field("values"), "n": vc.field("counts").cast(pa.int64())})
        merged = pa.concat_tables([self.table, batch]).group_by("value").aggregate([("n", "sum")])
        merged = merged.rename_columns(["value", "n"])
        if merged.num_rows > self.capacity:
            n = merged.column("n").to_numpy()
            cut = int(np.partition(n, n.size - self.capacity - 1)[n.size - self.capacity - 1])
            merged = merged.set_column(1, "n", pa.array(n - cut)).filter(pc.greater(n, cut))
            self.error += cut
        self.table = merged

    def report(self, k: int) -> list[list]:
        """The `k` largest counts as [value, count] pairs."""
        top = self.table.sort_by([("n", "descending"), ("value", "ascending")]).slice(0, k)
        return [
            [v, n]
            for v, n in zip(
                top.column("value").to_pylist(), top.column("n").to_pylist(), strict=True
            )
        ]


def _kind(t: pa.DataType) -> str:
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "numeric"
    if pa.types.is_boolean(t):
        return "numeric"  # min, max and mean (the fraction true) say all there is
    if (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))
    ):
        return "string"
    if pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type):
        return "embedding"
    if t == C.MEDIA_TYPE:
        return "media"
    return "other"


def _words(batch: pa.RecordBatch, col: str) -> pa.Array:
    return pc.count_substring_regex(batch.column(col), r"\S+")


def _norms(batch: pa.RecordBatch, col: str) -> pa.Array:
    emb = batch.column(col)
    flat = pc.list_flatten(emb).to_numpy(zero_copy_only=False).astype(np.float32)
    norms = np.linalg.norm(flat.reshape(-1, emb.type.list_size), axis=1)
    full = np.full(len(emb), np.nan)
    full[~np.asarray(emb.is_null())] = norms
    return pa.array(full, mask=np.asarray(emb.is_null()))


def _aspect(batch: pa.RecordBatch, _col: str) -> pa.Array:
    w, h = batch.column(C.WIDTH).cast(pa.float64()), batch.column(C.HEIGHT).cast(pa.float64())
    return pc.if_else(pc.greater(h, 0), pc.divide(w, h), pa.scalar(None, pa.float64()))


def _min_side(batch: pa.RecordBatch, _col: str) -> pa.Array:
    return pc.min_element_wise(batch.column(C.WIDTH), batch.column(C.HEIGHT), skip_nulls=False)


def _media_bytes(batch: pa.RecordBatch, col: str) -> pa.Array:
    return pc.binary_length(pc.struct_field(batch.column(col), "bytes"))


def _derived(schema: pa.Schema, names: list[str]) -> dict[str, tuple[str, Callable]]:
    """Derived numeric measures: caption length, image shape, embedding norm, media size."""
    out = {}
    for name in names:
        kind = _kind(schema.field(name).type)
        if name in CAPTIONS and kind == "string":
            out[f"{name}.words"] = (name, _words)
            out[f"{name}.chars"] = (name, lambda b, c: pc.utf8_length(b.column(c)))
        elif kind == "embedding":
            out[f"{name}.norm"] = (name, _norms)
        elif kind == "media":
            out[f"{name}.bytes"] = (name, _media_bytes)
    if C.WIDTH in names and C.HEIGHT in names:
        out["image.aspect"] = (C.WIDTH, _aspect)
        out["image.min_side"] = (C.WIDTH, _min_side)
    return out


def wanted_columns(schema: pa.Schema, columns: tuple[str, ...] | None) -> list[str]:
    """The columns to read: those asked for, or all but the media bytes."""
    if columns is None:
        return [f.name for f in schema if _kind(f.type) != "media"]
    C.require_named(schema, columns, "-c/--columns")
    return list(dict.fromkeys(columns))


def _cut_columns(schema: pa.Schema, config: StatsConfig) -> tuple[str, ...] | None:
    """The columns asked for, plus those a --cut is on (a derived measure needs its source)."""
    if config.columns is None:
        return None
    derived = _derived(schema, list(schema.names))
    extra = [derived[c][0] if c in derived else c for c, _ in config.cuts]
    return tuple(dict.fromkeys([*config.columns, *extra]))


def _count_cut(counts: list[int], values: pa.Array, cut: float) -> None:
    """Add the set values of one batch to [kept (>= cut), dropped (< cut)]."""
    x = pc.drop_null(values.cast(pa.float64())).to_numpy(zero_copy_only=False)
    x = x[~np.isnan(x)]
    kept = int((x >= cut).sum())
    counts[0] += kept
    counts[1] += len(x) - kept


def _cut_counters(config: StatsConfig, numeric: dict) -> dict[str, tuple[float, list[int]]]:
    """name -> (threshold, [kept, dropped]) for each --cut, checked against the measures."""
    if unknown := [name for name, _ in config.cuts if name not in numeric]:
        from mmtools.errors import UsageError

        raise UsageError(f"--cut {unknown[0]}: not a numeric column or measure of the input")
    return {name: (value, [0, 0]) for name, value in config.cuts}


def profile(source, config: StatsConfig, batch_size: int | None = None) -> dict:
    """Stream `source` once and return the distributions of its columns, in batches of
    `batch_size` rows (None: about 4 MiB of the columns read, at most 8192 rows)."""
    schema = source.schema
    names = wanted_columns(schema, _cut_columns(schema, config))
    kinds = {n: _kind(schema.field(n).type) for n in names}
    derived = _derived(schema, names)
    seeds = iter(range(1 << 30))
    numeric = {
        n: Numeric(config.sample_size, np.random.default_rng([config.seed, next(seeds)]))
        for n in [*(n for n in names if kinds[n] == "numeric"), *derived]
    }
    tops = {
        n: TopValues(config.capacity)
        for n in names
        if kinds[n] == "string" and n not in UNIQUE_KEYS
    }
    simple = {n: {"count": 0, "nulls": 0} for n in names if kinds[n] != "numeric"}
    cuts = _cut_counters(config, numeric)
    rows = 0
    batch_size = batch_size or source.batch_rows(names)
    for batch in source.batches(columns=names, batch_size=batch_size):
        rows += batch.num_rows
        for name in names:
            col = batch.column(name)
            if name in numeric:
                numeric[name].update(col)
            else:
                simple[name]["nulls"] += col.null_count
                simple[name]["count"] += len(col) - col.null_count
            if name in tops:
                tops[name].update(col)
            if name in cuts:
                _count_cut(cuts[name][1], col, cuts[name][0])
        for name, (column, fn) in derived.items():
            values = fn(batch, column)
            numeric[name].update(values)
            if name in cuts:
                _count_cut(cuts[name][1], values, cuts[name][0])
    report: dict = {"rows": rows, "columns": {}, "derived": {}}
    for name in names:
        entry = {"type": _short_type(schema.field(name).type), "kind": kinds[name]}
        entry.update(numeric[name].report(config.bins) if name in numeric else simple[name])
        if name in tops:
            entry["top"] = tops[name].report(config.top)
            entry["top_error"] = tops[name].error
        report["columns"][name] = entry
    for name in derived:
        report["derived"][name] = {
            "type": "derived",
            "kind": "numeric",
            **numeric[name].report(config.bins),
        }
    for name, (value, (kept, dropped)) in cuts.items():
        entry = report["columns"].get(name) or report["derived"][name]
        share = round(kept / (kept + dropped), 4) if kept + dropped else None
        entry["cut"] = {"value": value, "kept": kept, "dropped": dropped, "kept_fraction": share}
    return report


def _short_type(t: pa.DataType) -> str:
    if t == C.MEDIA_TYPE:
        return "media"
    if pa.types.is_fixed_size_list(t):
        return f"{t.value_type}[{t.list_size}]"
    return str(t)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def sparkline(counts: list[int]) -> str:
    """A histogram as one line of block characters."""
    peak = max(counts, default=0)
    if not peak:
        return ""
    return "".join(
        SPARK[min(len(SPARK) - 1, math.ceil(c / peak * len(SPARK)) - 1)] if c else " "
        for c in counts
    )


def render(report: dict, width: int = 40) -> str:
    """The report as a readable text table, then the top values of string columns."""
    head = [
        "column",
        "type",
        "count",
        "nulls",
        "min",
        "p05",
        "p50",
        "p95",
        "max",
        "mean",
        "histogram",
    ]
    rows = []
    for name, s in [*report["columns"].items(), *report["derived"].items()]:
        q = s.get("quantiles", {})
        hist = sparkline(s["histogram"]["counts"]) if "histogram" in s else ""
        rows.append(
            [
                name,
                s["type"],
                s["count"],
                s["nulls"],
                s.get("min"),
                q.get("p05"),
                q.get("p50"),
                q.get("p95"),
                s.get("max"),
                s.get("mean"),
                hist,
            ]
        )
    cells = [[_fmt(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(head)]
    lines = [f"rows: {report['rows']}", ""]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    entries = [*report["columns"].items(), *report["derived"].items()]
    cuts = [(n, s["cut"]) for n, s in entries if "cut" in s]
    if cuts:
        lines += ["", *(cut_line(n, c) for n, c in cuts)]
    for name, s in report["columns"].items():
        if s.get("top") and s["top"][0][1] == 1 and not s["top_error"]:
            lines += ["", f"top {name}: every value occurs once"]
        elif s.get("top"):
            approx = f" (counts may be short by up to {s['top_error']})" if s["top_error"] else ""
            lines += ["", f"top {name}{approx}:"]
            for value, n in s["top"]:
                text = value if len(value) <= width else value[: width - 1] + "…"
                lines.append(f"  {n:>8}  {text!r}")
    return "\n".join(lines)


def cut_line(name: str, cut: dict) -> str:
    """What a cut keeps and drops, in words."""
    share = "" if cut["kept_fraction"] is None else f" ({cut['kept_fraction']:.1%})"
    return f"cut {name} >= {cut['value']:g}: keeps {cut['kept']}{share}, drops {cut['dropped']}"


def _draw_cut(ax, cut: dict) -> None:
    """The cut as a vertical line over the histogram; the legend says what it keeps."""
    share = "" if cut["kept_fraction"] is None else f" ({cut['kept_fraction']:.1%})"
    label = f">= {cut['value']:g} keeps {cut['kept']}{share}, drops {cut['dropped']}"
    ax.axvline(cut["value"], color="#c82828", linestyle="--", linewidth=1.5, label=label)
    ax.legend(loc="best", fontsize=8)


def plot(report: dict, directory: str) -> list[str]:
    """Write one PNG histogram per numeric measure into `directory`; return the paths."""
    import os

    from mmtools.errors import require_module

    require_module("matplotlib", "plot")
    from matplotlib.figure import Figure

    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, s in [*report["columns"].items(), *report["derived"].items()]:
        if "histogram" not in s:
            continue
        edges, counts = s["histogram"]["edges"], s["histogram"]["counts"]
        fig = Figure(figsize=(6, 3.5), dpi=100)
        ax = fig.subplots()
        ax.stairs(counts, edges, fill=True)
        note = " (from a sample)" if s.get("sampled") else ""
        ax.set_title(f"{name}: {s['count']} values{note}")
        if "cut" in s:
            _draw_cut(ax, s["cut"])
        ax.set_xlabel(name)
        ax.set_ylabel("rows")
        fig.tight_layout()
        path = os.path.join(directory, re.sub(r"[^\w.-]", "_", name) + ".png")
        fig.savefig(path)
        paths.append(path)
    return paths
