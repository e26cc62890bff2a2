"""`mmtools index`: exact and compressed indexes, the plan, resume after SIGKILL, --append."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import KILL_AFTER_FIRST_COMMIT, mmtools

from mmtools import columns as C
from mmtools.io.index import IndexReader, unit_vectors

SHAPES = {"model": "mmtools-shapes", "pretrained": "bundled", "normalized": True}


def clustered(n: int, dim: int, seed: int, clusters: int = 40, rank: int = 8) -> np.ndarray:
    """Unit vectors around `clusters` centres, each spread in a low-dimensional subspace (as
    real embeddings are), so that nearest neighbours mean something."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    basis = rng.standard_normal((clusters, rank, dim)) * 0.35
    which = rng.integers(0, clusters, n)
    coef = rng.standard_normal((n, rank))
    x = centres[which] + np.einsum("nr,nrd->nd", coef, basis[which])
    x += 0.02 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(
    path: Path, x: np.ndarray, shards: int = 2, prefix: str = "r", model: dict | None = SHAPES
) -> Path:
    """A dataset of ids, captions and a float16 image_embedding column (with model metadata)."""
    n, dim = x.shape
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), dim)
    table = pa.table(
        {
            C.ID: [f"{prefix}{i:05d}" for i in range(n)],
            C.TEXT: [f"caption of {prefix}{i:05d}" for i in range(n)],
            C.IMAGE_EMBEDDING: emb,
        }
    )
    info = {C.IMAGE_EMBEDDING: {**model, "dim": dim}} if model else {}
    table = table.replace_schema_metadata(C.with_metadata(table.schema, info).metadata)
    path.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for k in range(shards):
        part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
        pq.write_table(part, path / f"part-{k:05d}.parquet", row_group_size=300)
    return path


def stored(path: Path) -> tuple[list[str], np.ndarray]:
    """The ids and the vectors as the index stores them: float16 read back, normalised."""
    table = pa.concat_tables(pq.read_table(p) for p in sorted(path.glob("part-*.parquet")))
    vecs, ok = unit_vectors(table.column(C.IMAGE_EMBEDDING))
    assert ok.all()
    return table.column(C.ID).to_pylist(), vecs


def brute_force(data: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries @ data.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, top, axis=1), top


def test_exact_search_equals_a_brute_force_top_k(tmp_path):
    ds = write_embeddings(tmp_path / "ds", clustered(3000, 48, seed=1))
    proc = mmtools("index", ds, "-o", tmp_path / "idx")
    assert "3000 indexed" in proc.stderr.decode() and "exact" in proc.stderr.decode()
    ids, data = stored(ds)
    queries = clustered(50, 48, seed=2)
    want_sims, want = brute_force(data, queries, 20)
    reader = IndexReader(str(tmp_path / "idx"))
    assert reader.kind == "flat" and reader.model["model"] == "mmtools-shapes"
    sims, labels = reader.search(queries, 20)
    found = reader.ids().column(C.ID).to_numpy(zero_copy_only=False)[labels]
    assert (found == np.array(ids)[want]).all()
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    # The command prints the same hits for a row of the index.
    out = mmtools("search", tmp_path / "idx", "--id", ids[7], "-k", "5", "--json").stdout
    hits = json.loads(out)["hits"]
    _, top = brute_force(data, data[7:8], 5)
    assert [h["id"] for h in hits] == [ids[i] for i in top[0]]
    assert hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert hits[1]["caption"] == f"caption of {ids[top[0][1]]}"


def test_compressed_index_recall_against_exact(tmp_path):
    x = clustered(20_000, 64, seed=3)
    ds = write_embeddings(tmp_path / "ds", x, shards=3)
    mmtools("index", ds, "-o", tmp_path / "idx", "--exact-below", "1000", "-q")
    reader = IndexReader(str(tmp_path / "idx"))
    plan = reader.manifest["plan"]
    assert (plan["kind"], plan["nlist"], plan["code"]) == ("ivf", 256, "SQfp16")
    assert reader.manifest["nprobe"] < 256  # it does not scan every list
    ids, data = stored(ds)
    rng = np.random.default_rng(4)
    queries = data[rng.choice(len(data), 200, replace=False)] + 0.05 * rng.standard_normal(
        (200, 64)
    ).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, want = brute_force(data, queries, 10)
    _, labels = reader.search(queries, 10)
    found = reader.ids().column(C.ID).to_numpy(zero_copy_only=False)[labels]
    truth = np.array(ids)[want]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95, recall
    # One list per probe finds fewer: the chosen nprobe is doing the work.
    _, one = reader.search(queries, 10, nprobe=1)
    found_one = reader.ids().column(C.ID).to_numpy(zero_copy_only=False)[one]
    assert (
        np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found_one, truth, strict=True)]) < recall
    )


def test_the_plan_follows_rows_and_memory():
    from mmtools.errors import UsageError
    from mmtools.sizes import parse_size
    from mmtools.tools.index.plan import choose

    assert parse_size("4GB") == 4 << 30 and parse_size("512MiB") == 512 << 20
    small = choose(50_000, 512, 4 << 30, 100_000)
    assert (small.kind, small.factory()) == ("flat", "Flat")
    big = choose(1_000_000, 512, 4 << 30, 100_000)
    assert big.factory() == "IVF2048,SQfp16" and big.train_rows == 64 * 2048
    assert choose(1_000_000, 512, 1 << 30, 100_000).factory() == "IVF2048,PQ256"
    assert choose(1_000_000, 512, parse_size("1.5G"), 100_000).factory() == "IVF2048,SQ8"
    with pytest.raises(UsageError, match="too small for 100000000 vectors"):
        choose(100_000_000, 512, 1 << 30, 100_000)


def test_append_equals_a_rebuild_and_another_model_is_refused(tmp_path):
    a = write_embeddings(tmp_path / "a", clustered(1200, 32, seed=5), prefix="a")
    b = write_embeddings(tmp_path / "b", clustered(800, 32, seed=6), prefix="b")
    mmtools("index", a, "-o", tmp_path / "idx", "-q")
    proc = mmtools("index", b, "-o", tmp_path / "idx", "--append")
    assert "800 appended" in proc.stderr.decode() and "2000 vectors" in proc.stderr.decode()
    mmtools("index", a, b, "-o", tmp_path / "rebuilt", "-q")
    appended, rebuilt = IndexReader(str(tmp_path / "idx")), IndexReader(str(tmp_path / "rebuilt"))
    assert appended.ids().column(C.ID).equals(rebuilt.ids().column(C.ID))
    queries = clustered(40, 32, seed=7)
    s1, l1 = appended.search(queries, 15)
    s2, l2 = rebuilt.search(queries, 15)
    assert (l1 == l2).all() and np.array_equal(s1, s2)
    assert [p.name for p in sorted((tmp_path / "idx").iterdir())] == [
        "_index.json",
        "ids",
        "index-00001.faiss",
    ]
    again = mmtools("index", b, "-o", tmp_path / "idx", "--append")
    assert "already complete" in again.stderr.decode()
    other = write_embeddings(
        tmp_path / "c",
        clustered(10, 32, seed=8),
        model={"model": "ViT-B-32", "pretrained": "openai"},
    )
    refused = mmtools("index", other, "-o", tmp_path / "idx", "--append", check=False)
    assert refused.returncode == 6
    assert refused.stderr.decode().count("\n") == 1
    assert "holds embeddings of mmtools-shapes (bundled)" in refused.stderr.decode()
    assert "ViT-B-32 (openai)" in refused.stderr.decode()


def test_append_to_a_compressed_index_keeps_every_vector_with_its_id(tmp_path):
    both = clustered(3000, 32, seed=12)
    a = write_embeddings(tmp_path / "a", both[:2000], prefix="a")
    b = write_embeddings(tmp_path / "b", both[2000:], prefix="b")
    mmtools("index", a, "-o", tmp_path / "idx", "--exact-below", "100", "-q")
    mmtools("index", b, "-o", tmp_path / "idx", "--append", "-q")
    reader = IndexReader(str(tmp_path / "idx"))
    assert reader.kind == "ivf" and reader.rows == 3000
    ids = reader.ids().column(C.ID).to_pylist()
    assert ids == [f"a{i:05d}" for i in range(2000)] + [f"b{i:05d}" for i in range(1000)]
    # Scanning every list, each row's nearest vector is its own: codes and ids line up.
    _, data = stored(a)
    _, more = stored(b)
    vecs = np.concatenate([data, more])
    sims, labels = reader.search(vecs, 1, nprobe=reader.manifest["plan"]["nlist"])
    assert (labels[:, 0] == np.arange(3000)).all() and sims.min() > 0.999


@pytest.mark.parametrize("exact_below", ["100000", "100"])
def test_a_killed_build_resumes_and_equals_an_uninterrupted_one(tmp_path, exact_below):
    ds = write_embeddings(tmp_path / "ds", clustered(3000, 32, seed=9), shards=2)
    args = [str(ds), "-o", str(tmp_path / "idx"), "--part-rows", "500"]
    args += ["--exact-below", exact_below, "-q"]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_FIRST_COMMIT, "index", *args], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert sorted(p.name for p in (tmp_path / "idx" / "_progress").iterdir()) == ["00000.json"]
    assert not (tmp_path / "idx" / "_index.json").exists()
    resumed = mmtools("index", *args[:-1])
    assert "resumed after 500 rows" in resumed.stderr.decode()
    mmtools(
        "index", ds, "-o", tmp_path / "whole", "--part-rows", "500", "--exact-below", exact_below
    )
    one, other = IndexReader(str(tmp_path / "idx")), IndexReader(str(tmp_path / "whole"))
    assert one.manifest["plan"] == other.manifest["plan"]
    assert one.ids().equals(other.ids())
    queries = clustered(60, 32, seed=10)
    s1, l1 = one.search(queries, 10)
    s2, l2 = other.search(queries, 10)
    assert (l1 == l2).all() and np.array_equal(s1, s2)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole").iterdir()
    )


def test_reruns_drift_and_bad_rows(tmp_path):
    x = clustered(100, 16, seed=11)
    x[3] = np.nan
    ds = write_embeddings(tmp_path / "ds", x, shards=1)
    first = mmtools("index", ds, "-o", tmp_path / "idx")
    assert "99 indexed, 1 skipped (bad_embedding 1)" in first.stderr.decode()
    assert "already complete" in mmtools("index", ds, "-o", tmp_path / "idx").stderr.decode()
    drift = mmtools("index", ds, "-o", tmp_path / "idx", "--exact-below", "10", check=False)
    assert drift.returncode == 6 and "options differ: exact_below" in drift.stderr.decode()
    mmtools("index", ds, "-o", tmp_path / "idx", "--exact-below", "10", "--overwrite", "-q")
    assert IndexReader(str(tmp_path / "idx")).kind == "ivf"
    assert IndexReader(str(tmp_path / "idx")).label("r00003") is None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    foreign = mmtools("index", ds, "-o", tmp_path / "other", check=False)
    assert foreign.returncode == 2 and "holds no mmtools index" in foreign.stderr.decode()


KILL_BEFORE_THE_MANIFEST = """
import os, signal, sys
real = os.replace
def replace(src, dst, *a, **k):
    if os.fspath(dst).endswith("/_index.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *a, **k)
os.replace = replace
sys.argv = ["mmtools", *sys.argv[1:]]
from mmtools.cli import main
main()
"""


def _hits(index: Path, row_id: str, k: int = 3) -> list[tuple[str, float]]:
    out = mmtools("search", index, "--id", row_id, "-k", k, "--json").stdout
    return [(h["id"], h["similarity"]) for h in json.loads(out)["hits"]]


def test_an_append_killed_before_its_commit_leaves_the_old_index_answering(tmp_path):
    """Killed with every new file written but the manifest, the index still answers with the
    old rows only, although each appended row is a near copy of an old one."""
    x = clustered(1200, 32, seed=5)
    a = write_embeddings(tmp_path / "a", x, prefix="a")
    twins = x[:800] + 0.01 * np.random.default_rng(6).standard_normal((800, 32))
    b = write_embeddings(tmp_path / "b", twins.astype(np.float32), prefix="b")
    idx = tmp_path / "idx"
    mmtools("index", a, "-o", idx, "-q")
    manifest = (idx / "_index.json").read_bytes()
    before = [_hits(idx, f"a{i:05d}") for i in (7, 300)]
    queries = clustered(40, 32, seed=7)
    old_sims, old_labels = IndexReader(str(idx)).search(queries, 10)

    args = ["index", str(b), "-o", str(idx), "--append", "-q"]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_THE_MANIFEST, *args], capture_output=True, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert (idx / ".tmp-_index.json").exists() and (idx / "_run.json").exists()
    assert (idx / "_index.json").read_bytes() == manifest
    assert [_hits(idx, f"a{i:05d}") for i in (7, 300)] == before
    reader = IndexReader(str(idx))
    assert reader.rows == 1200
    assert reader.ids().column(C.ID).to_pylist() == [f"a{i:05d}" for i in range(1200)]
    sims, labels = reader.search(queries, 10)
    assert (labels == old_labels).all() and np.array_equal(sims, old_sims)

    mmtools(*args)
    assert [h[0] for h in _hits(idx, "a00007", 2)] == ["a00007", "b00007"]
    assert IndexReader(str(idx)).rows == 2000


def test_append_of_embeddings_of_another_size_is_refused_in_one_line(tmp_path):
    a = write_embeddings(tmp_path / "a", clustered(300, 32, seed=5), prefix="a")
    small = write_embeddings(tmp_path / "c", clustered(10, 16, seed=8), prefix="c")
    idx = tmp_path / "idx"
    mmtools("index", a, "-o", idx, "-q")
    manifest = (idx / "_index.json").read_bytes()
    refused = mmtools("index", small, "-o", idx, "--append", check=False)
    assert refused.returncode == 6
    assert refused.stderr.decode() == (
        f"mmtools index: error: {idx} indexes image_embedding (32 dimensions); the input's "
        "image_embedding has 16: build a separate index\n"
    )
    assert (idx / "_index.json").read_bytes() == manifest
    assert sorted(p.name for p in idx.iterdir()) == ["_index.json", "ids", "index-00000.faiss"]
