"""The LAION-threshold and DataComp top-30% recipes, run as the shell scripts they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_image_folder, mmtools, read_dataset

from mmtools import columns as C

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def run_recipe(name: str, *args, **env) -> subprocess.CompletedProcess:
    """Run a recipe with bash, with `mmtools` meaning this interpreter's mmtools."""
    full = {**os.environ, "MMTOOLS": f"{sys.executable} -m mmtools", **env}
    return subprocess.run(
        ["bash", str(RECIPES / name), *map(str, args)], capture_output=True, env=full, timeout=600
    )


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, pl.DataFrame]:
    """A scored candidate pool of 400 rows in 4 shards, with tied scores and bad captions."""
    rng = np.random.default_rng(3)
    n = 400
    table = pa.table(
        {
            C.ID: [f"u{i:04d}" for i in rng.permutation(n)],
            C.TEXT: [["a dog", "tiny", "a photo of a red car", ""][i % 4] for i in range(n)],
            C.WIDTH: pa.array(rng.integers(50, 800, n), pa.int32()),
            C.HEIGHT: pa.array(rng.integers(50, 800, n), pa.int32()),
            C.IMAGE_NBYTES: rng.integers(1000, 60000, n),
            C.CLIP_SCORE: pa.array(np.round(rng.normal(0.27, 0.04, n), 2), pa.float32()),
        }
    )
    root = tmp_path_factory.mktemp("pool") / "pool"
    root.mkdir()
    for i in range(4):
        pq.write_table(table.slice(i * 100, 100), root / f"shard-{i}.parquet")
    return root, pl.from_arrow(table)


def test_laion_threshold_recipe_keeps_exactly_the_laion_rules(pool, tmp_path):
    src, frame = pool
    proc = run_recipe("laion_threshold.sh", src, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr.decode()
    want = frame.filter(
        (pl.col(C.CLIP_SCORE) >= 0.28)
        & (pl.col(C.TEXT).str.len_chars() >= 5)
        & (pl.col(C.IMAGE_NBYTES) >= 5000)
    )
    assert read_dataset(tmp_path / "out").column(C.ID).to_pylist() == want[C.ID].to_list()
    dropped = json.loads((tmp_path / "out" / "_manifest.json").read_text())["dropped"]
    assert set(dropped) == {"clip_score", "min_chars", "min_bytes"}
    assert sum(dropped.values()) == frame.height - want.height


def test_datacomp_top30_recipe_keeps_the_exact_best_30_percent(pool, tmp_path):
    src, frame = pool
    proc = run_recipe("datacomp_top30.sh", src, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr.decode()
    best = frame.sort([C.CLIP_SCORE, C.ID], descending=[True, False]).head(120)
    got = read_dataset(tmp_path / "out").column(C.ID).to_pylist()
    assert len(got) == 120 and set(got) == set(best[C.ID].to_list())
    # Extra options reach mmtools filter: intersect with the DataComp basic rules.
    proc = run_recipe("datacomp_top30.sh", src, tmp_path / "both", "--preset", "datacomp-basic")
    assert proc.returncode == 0, proc.stderr.decode()
    basic = best.filter(
        (pl.col(C.TEXT).str.count_matches(r"\S+") > 2)
        & (pl.min_horizontal(C.WIDTH, C.HEIGHT) >= 200)
        & (pl.max_horizontal(C.WIDTH, C.HEIGHT) <= 3 * pl.min_horizontal(C.WIDTH, C.HEIGHT))
    )
    assert set(read_dataset(tmp_path / "both").column(C.ID).to_pylist()) == set(basic[C.ID])


def test_recipe_without_arguments_prints_usage():
    proc = run_recipe("datacomp_top30.sh")
    assert proc.returncode == 2 and b"usage:" in proc.stderr


def test_recipes_score_raw_images_with_the_shipped_model(tmp_path):
    from mmtools.models import shapes as shapes_model

    if not shapes_model.weights_path().is_file():
        pytest.skip("the mmtools-shapes weights are not built yet")
    make_image_folder(tmp_path / "imgs", 20)
    mmtools("ingest", tmp_path / "imgs", "-o", tmp_path / "ds", "-q")
    env = {"MODEL": "mmtools-shapes", "PRETRAINED": ""}
    proc = run_recipe("datacomp_top30.sh", tmp_path / "ds", tmp_path / "top", **env)
    assert proc.returncode == 0, proc.stderr.decode()
    top = read_dataset(tmp_path / "top")
    assert top.num_rows == 6 and C.CLIP_SCORE in top.column_names
