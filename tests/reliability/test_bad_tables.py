"""Bad tables: schema drift between shards, corrupt Parquet, NaN and infinite embeddings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, mmtools
from forked import cli
from harness import one_line, tiny_clip

from mmtools import columns as C
from mmtools.errors import EXIT_DATA


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("model"))


def _table(start: int, n: int) -> pa.Table:
    ids = [f"r{i:03d}" for i in range(start, start + n)]
    return pa.table(
        {
            C.ID: ids,
            C.IMAGE: C.media_array([image_bytes(i) for i in range(start, start + n)], [None] * n),
            C.TEXT: [f"a photo of thing {i}" for i in range(start, start + n)],
            C.WIDTH: pa.array([48] * n, pa.int32()),
        }
    )


DRIFTS = {
    "missing": lambda t: t.drop_columns([C.WIDTH]),
    "extra": lambda t: t.append_column("note", pa.array(["x"] * t.num_rows)),
    "type": lambda t: t.set_column(3, C.WIDTH, t.column(C.WIDTH).cast(pa.string())),
}
MESSAGES = {"missing": "missing width", "extra": "extra note", "type": "width is string"}


def _commands(model) -> dict[str, list]:
    return {
        "filter": ["filter", "--where", "width > 0", "-q"],
        "embed": ["embed", "--model", model, "--pretrained", "none", "--device", "cpu", "-q"],
        "dedup": ["dedup", "-m", "exact", "-q"],
        "mixup": ["mixup", "--lam", "0.5", "-q"],
    }


@pytest.mark.parametrize(
    ("drift", "command"),
    [("missing", "filter"), ("extra", "dedup"), ("type", "embed"), ("type", "mixup")],
)
def test_schema_drift_between_shards_is_one_clear_line(drift, command, model, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(_table(0, 5), d / "part-0.parquet")
    pq.write_table(DRIFTS[drift](_table(5, 5)), d / "part-1.parquet")
    args = _commands(model)[command]
    code, err = cli(args[0], d, *args[1:], "-o", tmp_path / "out")
    assert code == EXIT_DATA
    assert err.startswith(f"mmtools {command}: error: schema drift: ") and one_line(err)
    assert MESSAGES[drift] in err and "part-1.parquet" in err
    assert not (tmp_path / "out" / "_manifest.json").exists()


def _corrupt(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "footer":
        data[-12:-4] = b"\x00" * 8
    elif how == "cut":
        del data[len(data) // 2 :]
    else:  # a column chunk in the middle of the file; the footer stays valid
        data[4:400] = b"\xff" * 396
    path.write_bytes(bytes(data))


def _corrupt_dataset(root, how: str):
    d = root / "in"
    d.mkdir()
    for k in range(3):
        pq.write_table(_table(10 * k, 10), d / f"part-{k}.parquet", compression="snappy")
    _corrupt(d / "part-1.parquet", how)
    return d


@pytest.mark.parametrize(
    ("how", "command"),
    [("footer", "filter"), ("cut", "dedup"), ("footer", "embed"), ("page", "filter")],
)
def test_a_corrupt_shard_is_a_clear_error_and_no_manifest(how, command, model, tmp_path):
    d, out = _corrupt_dataset(tmp_path, how), tmp_path / "out"
    args = _commands(model)[command]
    code, err = cli(args[0], d, *args[1:], "-o", out, "--shard-rows", 5)
    assert code == EXIT_DATA, err
    assert err.startswith(f"mmtools {command}: error: ") and "Traceback" not in err
    assert "part-1.parquet" in err
    assert not (out / "_manifest.json").exists() and not list(out.rglob(".tmp-*"))


def test_a_corrupt_page_error_is_one_line(model, tmp_path):
    d = _corrupt_dataset(tmp_path, "page")
    proc = mmtools("filter", d, "--where", "width > 0", "-q", "-o", tmp_path / "o", check=False)
    assert proc.returncode == EXIT_DATA and one_line(proc.stderr.decode())


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _embedding(values: np.ndarray, nulls=()) -> pa.Array:
    n, dim = values.shape
    mask = pa.array([i in nulls for i in range(n)])
    flat = pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, type=C.embedding_type(dim, "float32"), mask=mask)


BAD_ROWS = {"e01": "nan", "e02": "inf", "e03": "zero", "e04": "null"}


@pytest.fixture
def unusable(tmp_path):
    """40 rows with image and text embeddings and a clip_score; e01..e04 are unusable."""
    n, dim = 40, 8
    img, txt = _vectors(n, dim, 0), _vectors(n, dim, 1)
    img[1, 3], img[2, 0], img[3] = np.nan, np.inf, 0.0
    score = (img * txt).sum(axis=1)
    score[1], score[2], score[3] = np.nan, np.inf, -np.inf
    table = pa.table(
        {
            C.ID: [f"e{i:02d}" for i in range(n)],
            C.TEXT: [f"caption {i}" for i in range(n)],
            C.IMAGE_EMBEDDING: _embedding(img, nulls={4}),
            C.TEXT_EMBEDDING: _embedding(txt),
            C.CLIP_SCORE: pa.array(
                [None if i == 4 else float(s) for i, s in enumerate(score)], pa.float32()
            ),
        }
    )
    pq.write_table(table, tmp_path / "emb.parquet")
    return tmp_path / "emb.parquet"


@pytest.mark.parametrize(
    "args",
    [
        ["dedup", "-m", "semantic", "--clusters", "2", "--eps", "0.01"],
        ["mixup", "--mode", "embedding", "--lam", "0.5"],
        ["score"],
    ],
    ids=["dedup-semantic", "mixup-embedding", "score"],
)
def test_nan_inf_zero_and_null_embeddings_are_rejected_not_used(args, unusable, tmp_path):
    out = tmp_path / "out"
    mmtools(args[0], unusable, *args[1:], "-o", out)
    manifest = json.loads((out / "_manifest.json").read_text())
    files = sorted((out / "_rejects").glob("*.parquet"))
    rejected = pa.concat_tables([pq.read_table(f) for f in files]).column(C.ID).to_pylist()
    table = pa.concat_tables([pq.read_table(out / s["name"]) for s in manifest["shards"]])
    assert not set(BAD_ROWS) & set(table.column(C.ID).to_pylist())
    if args[0] == "mixup":  # a row never chosen as a parent is counted as a mixup source
        parents = {p for ps in table.column(C.MIXUP_PARENTS).to_pylist() for p in ps or ()}
        assert not set(BAD_ROWS) & parents
    else:
        assert set(BAD_ROWS) <= set(rejected)
    for column in (C.IMAGE_EMBEDDING, C.CLIP_SCORE):
        if column in table.column_names:
            values = table.column(column).combine_chunks()
            flat = values.flatten() if column == C.IMAGE_EMBEDDING else values
            assert np.isfinite(flat.drop_null().to_numpy(zero_copy_only=False)).all()
    in_rows = 40 + manifest["generated"]
    assert manifest["rows"] + len(rejected) + sum(manifest["dropped"].values()) == in_rows


def test_top_fraction_never_prefers_a_non_finite_score(unusable, tmp_path):
    out = tmp_path / "out"
    mmtools("filter", unusable, "--top-fraction", "0.5", "--by", C.CLIP_SCORE, "-o", out)
    manifest = json.loads((out / "_manifest.json").read_text())
    table = pa.concat_tables([pq.read_table(out / s["name"]) for s in manifest["shards"]])
    kept = table.column(C.CLIP_SCORE).to_numpy(zero_copy_only=False)
    assert len(kept) == 20 and np.isfinite(kept).all()
