"""`mmtools stats` in this process: exact report values, the table, cuts and the sketches."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.io.source import Source
from mmtools.tools import stats as S


@pytest.fixture
def small(tmp_path):
    """Eight rows with exactly known distributions."""
    emb = np.array([[3, 4], [0, 1], [6, 8], [1, 0], [0, 0], [5, 12], [8, 6], [0, 2]], np.float32)
    table = pa.table(
        {
            C.ID: [f"r{i}" for i in range(8)],
            C.TEXT: ["a cat", "a cat", "the dog, ok", None, "a cat", "x", "the dog, ok", "a b c d"],
            "score": pa.array([1.0, 2.0, None, 4.0, float("nan"), 6.0, float("inf"), 8.0]),
            "n": pa.array([1, 1, 2, 3, 5, 8, 13, 21], pa.int64()),
            "flag": pa.array([True, False, True, True, None, False, False, True]),
            C.WIDTH: pa.array([100, 200, 300, 400, 0, 60, 70, 80], pa.int32()),
            C.HEIGHT: pa.array([50, 100, 300, 100, 10, 0, 140, None], pa.int32()),
            C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 2),
            C.IMAGE: pa.array(
                [{"bytes": b"x" * i, "path": f"p{i}"} for i in range(8)], C.MEDIA_TYPE
            ),
            "tags": pa.array([["a"]] * 8, pa.list_(pa.string())),
        }
    )
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=3)
    return path


def profile(path, batch_size=3, **config):
    return S.profile(Source([str(path)]), S.StatsConfig(**config), batch_size=batch_size)


def test_report_of_every_column_is_exact(small):
    r = profile(small)
    assert r["rows"] == 8
    cols = r["columns"]
    assert list(cols) == [
        C.ID,
        C.TEXT,
        "score",
        "n",
        "flag",
        C.WIDTH,
        C.HEIGHT,
        C.IMAGE_EMBEDDING,
        "tags",
    ]  # media bytes are not read by default
    assert cols[C.ID] == {"type": "string", "kind": "string", "count": 8, "nulls": 0}
    assert cols[C.TEXT]["top"] == [["a cat", 3], ["the dog, ok", 2], ["a b c d", 1], ["x", 1]]
    assert cols[C.TEXT]["top_error"] == 0 and cols[C.TEXT]["nulls"] == 1
    assert cols[C.TEXT]["count"] == 7
    s = cols["score"]
    assert (s["type"], s["kind"], s["count"], s["nulls"], s["non_finite"]) == (
        "double",
        "numeric",
        5,
        1,
        2,
    )
    assert (s["min"], s["max"], s["mean"]) == (1.0, 8.0, 4.2)
    assert s["std"] == pytest.approx(math.sqrt(np.var([1, 2, 4, 6, 8])), rel=1e-12)
    assert s["quantiles"] == {
        f"p{round(q * 100):02d}": pytest.approx(float(np.quantile([1, 2, 4, 6, 8], q)))
        for q in S.QUANTILES
    }
    assert s["histogram"]["edges"][0] == 1.0 and s["histogram"]["edges"][-1] == 8.0
    assert len(s["histogram"]["counts"]) == 20 and sum(s["histogram"]["counts"]) == 5
    assert s["sampled"] is False
    n = cols["n"]
    assert (n["count"], n["min"], n["max"], n["mean"]) == (8, 1.0, 21.0, 54 / 8)
    assert n["std"] == pytest.approx(float(np.std([1, 1, 2, 3, 5, 8, 13, 21])), rel=1e-12)
    flag = cols["flag"]
    assert (flag["kind"], flag["count"], flag["nulls"], flag["mean"]) == ("numeric", 7, 1, 4 / 7)
    assert cols[C.IMAGE_EMBEDDING]["type"] == "float[2]"
    assert cols[C.IMAGE_EMBEDDING]["kind"] == "embedding"
    assert cols["tags"] == {
        "type": "list<element: string>",
        "kind": "other",
        "count": 8,
        "nulls": 0,
    }
    d = r["derived"]
    assert list(d) == [
        "text.words",
        "text.chars",
        "image_embedding.norm",
        "image.aspect",
        "image.min_side",
    ]
    assert d["text.words"]["type"] == "derived" and d["text.words"]["kind"] == "numeric"
    assert (d["text.words"]["count"], d["text.words"]["nulls"]) == (7, 1)
    assert d["text.words"]["mean"] == pytest.approx((2 + 2 + 3 + 2 + 1 + 3 + 4) / 7)
    assert (d["text.chars"]["min"], d["text.chars"]["max"]) == (1, 11)
    norms = [5, 1, 10, 1, 0, 13, 10, 2]
    assert d["image_embedding.norm"]["mean"] == pytest.approx(np.mean(norms))
    assert (d["image_embedding.norm"]["min"], d["image_embedding.norm"]["max"]) == (0, 13)
    aspect = d["image.aspect"]  # height 0 and a null height: no aspect
    assert (aspect["count"], aspect["nulls"]) == (6, 2)
    assert (aspect["min"], aspect["max"]) == (0.0, 4.0)
    assert aspect["mean"] == pytest.approx((2 + 2 + 1 + 4 + 0 + 0.5) / 6)
    side = d["image.min_side"]
    assert (side["count"], side["nulls"], side["min"], side["max"]) == (7, 1, 0, 300)


def test_chosen_columns_media_sizes_and_cuts(small):
    r = profile(small, columns=(C.IMAGE, "n", "n"), cuts=(("n", 5.0), ("image.bytes", 3.0)))
    assert list(r["columns"]) == [C.IMAGE, "n"]
    assert r["columns"][C.IMAGE] == {"type": "media", "kind": "media", "count": 8, "nulls": 0}
    size = r["derived"]["image.bytes"]
    assert (size["min"], size["max"], size["mean"]) == (0, 7, 3.5)
    assert r["columns"]["n"]["cut"] == {"value": 5.0, "kept": 4, "dropped": 4, "kept_fraction": 0.5}
    assert size["cut"] == {"value": 3.0, "kept": 5, "dropped": 3, "kept_fraction": 0.625}
    # a cut on a derived measure reads its source column
    r = profile(small, columns=("n",), cuts=(("text.words", 3.0),))
    assert list(r["columns"]) == ["n", C.TEXT]
    assert r["derived"]["text.words"]["cut"] == {
        "value": 3.0,
        "kept": 3,
        "dropped": 4,
        "kept_fraction": round(3 / 7, 4),
    }
    r = profile(small, columns=("score",), cuts=(("score", 100.0),))
    assert r["columns"]["score"]["cut"] == {
        "value": 100.0,
        "kept": 1,
        "dropped": 5,
        "kept_fraction": 0.1667,
    }  # +inf is above any cut; NaN and null are not counted
    with pytest.raises(UsageError) as e:
        profile(small, cuts=((C.TEXT, 1.0),))
    assert str(e.value) == "--cut text: not a numeric column or measure of the input"


def test_cut_of_a_column_without_values_has_no_share(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"v": pa.array([None, None], pa.float64())}), path)
    r = profile(path, cuts=(("v", 1.0),))
    assert r["columns"]["v"]["cut"] == {
        "value": 1.0,
        "kept": 0,
        "dropped": 0,
        "kept_fraction": None,
    }
    assert r["columns"]["v"] == {
        "type": "double",
        "kind": "numeric",
        "count": 0,
        "nulls": 2,
        "non_finite": 0,
        "cut": r["columns"]["v"]["cut"],
    }
    assert S.cut_line("v", r["columns"]["v"]["cut"]) == "cut v >= 1: keeps 0, drops 0"


def test_render_is_an_aligned_table_then_cuts_then_top_values(small):
    r = profile(small, columns=("n", C.TEXT, C.ID), cuts=(("n", 5.0),), top=2)
    text = S.render(r, width=6)
    lines = text.splitlines()
    assert lines[0] == "rows: 8" and lines[1] == ""
    head = lines[2]
    # the widest cell of a column sets its width (text.words, derived, 1.333)
    assert head == "column      type     count  nulls  min  p05  p50  p95   max  mean   histogram"
    row = next(x for x in lines if x.startswith("n "))
    assert row.split()[:10] == ["n", "int64", "8", "0", "1", "1", "4", "18.2", "21", "6.75"]
    assert row.endswith("  " + S.sparkline(r["columns"]["n"]["histogram"]["counts"]))
    assert S.sparkline(r["columns"]["n"]["histogram"]["counts"]) == "█▄▄ ▄  ▄    ▄      ▄"
    assert next(x for x in lines if x.startswith("id ")).split() == ["id", "string", "8", "0"]
    assert "cut n >= 5: keeps 4 (50.0%), drops 4" in lines
    i = lines.index("top text:")
    assert lines[i - 1] == "" and lines[i + 1 : i + 3] == [
        "         3  'a cat'",
        "         2  'the d…'",
    ]
    assert not any(x.startswith("top id") for x in lines)


def test_render_says_when_every_value_occurs_once_and_when_counts_are_short(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"tag": ["a", "b", "c"], "k": ["x", "x", "y"]}), path)
    text = S.render(profile(path, capacity=1))
    assert "top tag" not in text  # capacity 1: no value stands out
    assert text.endswith("\n\ntop k (counts may be short by up to 1):\n         1  'x'")
    text = S.render(profile(path))
    assert "\ntop tag: every value occurs once" in text
    assert "top k:\n         2  'x'\n         1  'y'" in text


def test_sparkline_scales_to_the_peak():
    assert S.sparkline([]) == "" and S.sparkline([0, 0]) == ""
    assert S.sparkline([0, 1, 2, 4, 8]) == " ▁▂▄█"
    assert S.sparkline([3, 3]) == "██"
    assert S.sparkline([1, 100]) == "▁█"


def test_small_helpers():
    assert S._fmt(None) == "" and S._fmt(0.123456) == "0.1235" and S._fmt(7) == "7"
    assert S._fmt(1234567.0) == "1.235e+06"
    assert S._kind(pa.decimal128(5, 2)) == "numeric"
    assert S._kind(pa.large_string()) == "string"
    assert S._kind(pa.dictionary(pa.int32(), pa.string())) == "string"
    assert S._kind(pa.dictionary(pa.int32(), pa.int64())) == "other"
    assert S._kind(pa.list_(pa.float32(), 3)) == "embedding"
    assert S._kind(pa.list_(pa.int8(), 3)) == "other"
    assert S._kind(pa.list_(pa.float32())) == "other"
    assert S._kind(C.MEDIA_TYPE) == "media"
    assert S._short_type(pa.list_(pa.float16(), 512)) == "halffloat[512]"
    assert S._short_type(pa.int8()) == "int8"
    c = {"value": 0.25, "kept": 3, "dropped": 1, "kept_fraction": 0.75}
    assert S.cut_line("clip_score", c) == "cut clip_score >= 0.25: keeps 3 (75.0%), drops 1"
    schema = pa.schema([("a", pa.int8()), ("image", C.MEDIA_TYPE), ("b", pa.string())])
    assert S.wanted_columns(schema, None) == ["a", "b"]
    assert S.wanted_columns(schema, ("b", "image", "b")) == ["b", "image"]
    with pytest.raises(UsageError, match=r"^-c/--columns: unknown column zz"):
        S.wanted_columns(schema, ("zz",))


def test_numeric_merges_batches_exactly_and_keeps_a_bounded_uniform_sample():
    num = S.Numeric(4, np.random.default_rng(0))
    empty = num.report(5)
    assert empty == {"count": 0, "nulls": 0, "non_finite": 0}
    num.update(pa.array([None, float("nan")], pa.float64()))
    assert (num.count, num.nulls, num.non_finite) == (0, 1, 1)
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0]
    for part in (values[:2], values[2:3], values[3:9], values[9:]):
        num.update(pa.array(part))
    assert len(num.sample) <= 8 and len(num.sample) == len(num.prio)
    rep = num.report(2)
    assert rep["count"] == 11 and rep["min"] == 1.0 and rep["max"] == 9.0
    assert rep["mean"] == pytest.approx(np.mean(values), rel=1e-12)
    assert rep["std"] == pytest.approx(np.std(values), rel=1e-12)
    assert rep["sampled"] is True and len(num.sample) == 4
    assert set(num.sample) <= set(values)
    assert rep["histogram"]["edges"] == [1.0, 5.0, 9.0]
    assert sum(rep["histogram"]["counts"]) in (10, 11, 12)  # 4 values scaled up to 11 rows
    exact = S.Numeric(100, np.random.default_rng(0))
    exact.update(pa.array(values))
    hist = exact.report(2)["histogram"]
    assert hist["counts"] == [6, 5]  # [1, 5) and [5, 9]


def test_top_values_keep_the_heavy_hitters_within_capacity():
    top = S.TopValues(2)
    top.update(pa.array(["a", "b", "a", "c", None]))
    assert top.table.num_rows <= 2
    top.update(pa.array(["a", "a", "d"]))
    assert top.report(5)[0][0] == "a"
    assert top.error >= 1
    exact = S.TopValues(10)
    exact.update(pa.array(["b", "a", "b", None]))
    exact.update(pa.array(["c", "a", "b"], pa.large_string()))
    assert exact.report(2) == [["b", 3], ["a", 2]]
    assert exact.report(9) == [["b", 3], ["a", 2], ["c", 1]] and exact.error == 0
    bounded = S.TopValues(2)
    bounded.update(pa.array(["x"] * 5 + ["y"] * 3 + ["z"] * 2 + ["w"]))
    assert bounded.report(5) == [["x", 3], ["y", 1]] and bounded.error == 2


def test_derived_measures_edge_cases(tmp_path):
    path = tmp_path / "d.parquet"
    emb = pa.array([[3.0, 4.0], None, [0.0, 2.0]], pa.list_(pa.float32(), 2))
    table = pa.table(
        {
            C.WIDTH: pa.array([7, 30, 5], pa.int32()),
            C.HEIGHT: pa.array([1, 10, 50], pa.int32()),
            C.IMAGE_EMBEDDING: emb,
        }
    )
    pq.write_table(table, path)
    d = profile(path)["derived"]
    norm = d["image_embedding.norm"]
    assert (norm["count"], norm["nulls"], norm["non_finite"]) == (2, 1, 0)
    assert (norm["min"], norm["max"]) == (2.0, 5.0)
    aspect = d["image.aspect"]  # a height of 1 is a height
    assert (aspect["count"], aspect["min"], aspect["max"]) == (3, 0.1, 7.0)
    side = d["image.min_side"]
    assert (side["min"], side["max"], side["mean"]) == (1, 10, 16 / 3)
    only_width = tmp_path / "w.parquet"
    pq.write_table(pa.table({C.WIDTH: pa.array([1, 2], pa.int32())}), only_width)
    assert list(profile(only_width)["derived"]) == []


def test_reruns_agree_when_quantiles_come_from_a_sample(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"v": np.arange(200, dtype=np.float64)}), path)
    first = profile(path, batch_size=16, sample_size=5)
    again = profile(path, batch_size=16, sample_size=5)
    assert first["columns"]["v"]["sampled"] is True
    assert first["columns"]["v"]["quantiles"] == again["columns"]["v"]["quantiles"]
    assert first["columns"]["v"]["histogram"] == again["columns"]["v"]["histogram"]


def test_render_lines_exactly(small):
    r = profile(small, columns=(C.ID, C.TEXT), top=2, cuts=(("text.words", 3.0),))
    assert r["columns"][C.TEXT]["top"] == [["a cat", 3], ["the dog, ok", 2]]
    lines = S.render(r, width=5).splitlines()
    assert not [x for x in lines if x != x.rstrip()]
    assert next(x for x in lines if x.startswith("id ")) == "id          string   8      0"
    cut = lines.index("cut text.words >= 3: keeps 3 (42.9%), drops 4")
    assert lines[cut - 1] == ""
    top = lines.index("top text:")
    assert lines[top + 1 :] == ["         3  'a cat'", "         2  'the …'"]
    path = small.parent / "once.parquet"
    pq.write_table(pa.table({"tag": ["a", "b"]}), path)
    lines = S.render(profile(path)).splitlines()
    assert lines[0] == "rows: 2"
    assert lines[-2:] == ["", "top tag: every value occurs once"]


def test_top_values_cut_is_the_count_just_below_the_capacity():
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = rng.integers(1, 50, int(rng.integers(20, 300)))
        capacity = int(rng.integers(1, len(counts) - 1))
        values = np.repeat([f"v{i}" for i in range(len(counts))], counts)
        top = S.TopValues(capacity)
        top.update(pa.array(values))
        cut = int(np.sort(counts)[::-1][capacity])
        want = {f"v{i}": int(n - cut) for i, n in enumerate(counts) if n > cut}
        got = dict(zip(top.table["value"].to_pylist(), top.table["n"].to_pylist(), strict=True))
        assert (got, top.error) == (want, cut)


def test_numeric_sample_edges():
    exact = S.Numeric(3, np.random.default_rng(0))
    exact.update(pa.array([3.0, 1.0, 2.0]))
    assert len(exact.prio) == len(exact.sample) == 3  # one priority per sampled value
    rep = exact.report(3)
    assert rep["sampled"] is False and rep["quantiles"]["p50"] == 2.0
    assert rep["histogram"]["counts"] == [1, 1, 1]
    big = S.Numeric(2, np.random.default_rng(0))
    big.update(pa.array(np.arange(10.0)))
    counts = big.report(2)["histogram"]["counts"]
    assert all(type(c) is int for c in counts) and sum(counts) == 10


def test_render_shortens_long_values_to_the_width(tmp_path):
    path = tmp_path / "long.parquet"
    pq.write_table(pa.table({"tag": ["x" * 40, "x" * 40, "y" * 41, "y" * 41]}), path)
    lines = S.render(profile(path)).splitlines()
    assert lines[-2:] == [f"         2  {'x' * 40!r}", f"         2  {'y' * 39 + '…'!r}"]
