"""`mmtools stats`: exact counts and moments, bounded sketches, table, JSON and PNG plots."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MMTOOLS, mmtools

from mmtools import columns as C
from mmtools.tools.stats import Numeric, TopValues


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A Parquet file of 500 rows with scores (nulls, NaN), sizes, captions, embeddings."""
    rng = np.random.default_rng(1)
    n = 500
    score = rng.normal(0.25, 0.05, n).astype(np.float32)
    score[7] = np.nan
    emb = rng.standard_normal((n, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = pa.table(
        {
            C.ID: [f"r{i}" for i in range(n)],
            C.TEXT: [["a cat", "a small dog", "two red birds on a wire"][i % 3] for i in range(n)],
            C.WIDTH: pa.array(rng.integers(64, 1024, n), pa.int32()),
            C.HEIGHT: pa.array(rng.integers(64, 1024, n), pa.int32()),
            C.CLIP_SCORE: pa.array(score, mask=np.arange(n) % 50 == 0),
            C.IS_DUPLICATE: pa.array(np.arange(n) % 4 == 0),
            C.TEXT_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 4),
        }
    )
    path = tmp_path_factory.mktemp("stats") / "data.parquet"
    pq.write_table(table, path)
    return path, table


def test_json_report_is_exact_below_the_sample_size(profiled):
    path, table = profiled
    report = json.loads(mmtools("stats", path, "--json").stdout)
    assert report["rows"] == 500
    s = report["columns"][C.CLIP_SCORE]
    score = table.column(C.CLIP_SCORE).to_numpy(zero_copy_only=False)
    finite = score[np.isfinite(score)]
    assert (s["count"], s["nulls"], s["non_finite"]) == (finite.size, 10, 1)
    assert s["min"] == pytest.approx(finite.min()) and s["max"] == pytest.approx(finite.max())
    assert s["mean"] == pytest.approx(finite.astype(np.float64).mean(), rel=1e-9)
    assert s["std"] == pytest.approx(finite.astype(np.float64).std(), rel=1e-9)
    assert s["quantiles"]["p50"] == pytest.approx(np.quantile(finite.astype(np.float64), 0.5))
    assert s["quantiles"]["p05"] == pytest.approx(np.quantile(finite.astype(np.float64), 0.05))
    assert sum(s["histogram"]["counts"]) == finite.size and not s["sampled"]
    text = report["columns"][C.TEXT]
    assert text["top"][0] == ["a cat", 167] and text["top_error"] == 0
    assert "top" not in report["columns"][C.ID]  # unique keys: no top values
    assert report["columns"][C.IS_DUPLICATE]["mean"] == pytest.approx(0.25)
    d = report["derived"]
    assert (d["text.words"]["min"], d["text.words"]["max"]) == (2, 6)
    assert d["text.chars"]["max"] == len("two red birds on a wire")
    w, h = table.column(C.WIDTH).to_numpy(), table.column(C.HEIGHT).to_numpy()
    assert d["image.aspect"]["max"] == pytest.approx((w / h).max())
    assert d["image.min_side"]["min"] == np.minimum(w, h).min()
    assert d["text_embedding.norm"]["min"] == pytest.approx(1, abs=1e-5)


def test_table_report_is_readable(profiled):
    path, _ = profiled
    out = mmtools("stats", path).stdout.decode()
    lines = out.splitlines()
    assert lines[0] == "rows: 500"
    assert lines[2].split() == [
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
    row = next(line for line in lines if line.startswith("clip_score "))
    assert row.split()[1:4] == ["float", "489", "10"]
    assert "top text:" in out and "167  'a cat'" in out
    assert "top id: every value occurs once" not in out  # ids are not counted at all


def test_plots_are_decodable_pngs(profiled, tmp_path):
    from PIL import Image

    path, _ = profiled
    proc = mmtools("stats", path, "--plot", tmp_path / "plots", "-c", "clip_score,width,height")
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == [
        "clip_score.png",
        "height.png",
        "image.aspect.png",
        "image.min_side.png",
        "width.png",
    ]
    assert "wrote 5 plots" in proc.stderr.decode()
    for name in pngs:
        file = tmp_path / "plots" / name
        assert file.stat().st_size > 0
        with Image.open(file) as img:
            img.verify()
        with Image.open(file) as img:
            assert img.format == "PNG" and img.size == (600, 350)


def test_stats_reads_a_stream_on_stdin_and_media_on_request(dataset):
    produce = subprocess.Popen(
        [*MMTOOLS, "filter", dataset, "--where", "TRUE", "-q"], stdout=subprocess.PIPE
    )
    proc = subprocess.run(
        [*MMTOOLS, "stats", "-", "--json", "-c", "image,width"],
        stdin=produce.stdout,
        capture_output=True,
        timeout=120,
    )
    produce.stdout.close()
    assert produce.wait(timeout=60) == 0 and proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rows"] == 30 and report["columns"]["image"]["kind"] == "media"
    assert report["derived"]["image.bytes"]["min"] > 0
    assert set(report["columns"]) == {"image", "width"}


def test_unknown_column_and_missing_matplotlib_are_one_line_errors(profiled, tmp_path):
    path, _ = profiled
    proc = mmtools("stats", path, "-c", "nope", check=False)
    assert proc.returncode == 2  # the user named it: a usage error, as for filter --where
    err = proc.stderr.decode()
    assert err.startswith("mmtools stats: error: -c/--columns: unknown column nope;")
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    proc = mmtools(
        "stats",
        path,
        "--plot",
        tmp_path / "p",
        check=False,
        env={"PYTHONPATH": str(tmp_path / "site")},
    )
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode() == (
        "mmtools stats: error: this needs the optional package 'matplotlib'; install it with "
        "pip install 'mmtools[plot]'\n"
    )


def test_numeric_sketch_memory_is_bounded_and_quantiles_close():
    rng = np.random.default_rng(0)
    sketch = Numeric(2000, np.random.default_rng(5))
    values = rng.exponential(1.0, 300_000)
    for chunk in np.array_split(values, 150):
        sketch.update(pa.array(chunk))
        assert len(sketch.sample) <= 2 * 2000
    report = sketch.report(bins=10)
    assert report["count"] == values.size and report["sampled"]
    assert report["mean"] == pytest.approx(values.mean(), rel=1e-9)
    for name, q in (("p25", 0.25), ("p50", 0.5), ("p95", 0.95)):
        # A sample of 2000 places a quantile within about ±2.5% of rank.
        lo, hi = np.quantile(values, [q - 0.025, min(q + 0.025, 1)])
        assert lo <= report["quantiles"][name] <= hi, name
    assert sum(report["histogram"]["counts"]) == pytest.approx(values.size, rel=0.01)


def test_quantiles_of_sorted_and_trending_columns_come_from_the_whole_column(tmp_path):
    """Values in order (ascending, descending, a trend under noise): a sample biased to the
    first or last rows read would put every quantile near one end."""
    rng = np.random.default_rng(2)
    n = 200_000
    columns = {
        "ascending": np.sort(rng.uniform(0, 1, n)),
        "descending": np.linspace(1, 0, n),
        "trending": np.linspace(0, 10, n) + rng.normal(0, 1, n),
    }
    pq.write_table(pa.table(columns), tmp_path / "ordered.parquet", row_group_size=10_000)
    report = json.loads(
        mmtools("stats", tmp_path / "ordered.parquet", "--json", "--sample-size", "4000").stdout
    )
    for name, values in columns.items():
        s = report["columns"][name]
        assert s["sampled"] and s["count"] == n
        for key, q in (("p05", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95)):
            # A uniform sample of 4000 places a quantile within about ±2% of rank.
            lo, hi = np.quantile(values, [q - 0.02, q + 0.02])
            assert lo <= s["quantiles"][key] <= hi, (name, key)
    assert report["columns"]["ascending"]["quantiles"]["p50"] == pytest.approx(0.5, abs=0.02)


def test_top_values_counter_is_bounded_and_finds_the_heavy_hitters():
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(5000)])
    stream = words[np.minimum(rng.zipf(1.5, 200_000), 5000) - 1]
    top = TopValues(capacity=100)
    for chunk in np.array_split(stream, 40):
        top.update(pa.array(chunk))
        assert top.table.num_rows <= 100
    values, counts = np.unique(stream, return_counts=True)
    truth = dict(zip(values.tolist(), counts.tolist(), strict=True))
    found = top.report(5)
    assert [v for v, _ in found] == ["w0", "w1", "w2", "w3", "w4"]
    for value, n in found:  # lower bounds, short by at most the reported error
        assert n <= truth[value] <= n + top.error
