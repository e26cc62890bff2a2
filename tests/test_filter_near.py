"""`filter --near`: keep rows near a reference dataset or index, exactly as a brute-force
computation says; the DataComp-style image-based filter recipe."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import manifest_summary, mmtools, read_dataset, reject_reasons
from test_index import SHAPES, clustered, stored, write_embeddings
from test_recipes_filter import run_recipe

from mmtools import columns as C
from mmtools.io.dataset import read_dropped
from mmtools.io.index import IndexReader


@pytest.fixture(scope="module")
def pool_and_reference(tmp_path_factory):
    """A pool of 1500 rows (two of them with unusable embeddings) and a reference of 300."""
    root = tmp_path_factory.mktemp("near")
    both = clustered(1800, 32, seed=21, clusters=30)
    x, y = both[:1500].copy(), both[1500:]
    x[10] = 0.0  # a zero vector: a reject row
    pool = write_embeddings(root / "pool", x, shards=3, prefix="p")
    table = pq.read_table(pool / "part-00000.parquet")
    emb = table.column(C.IMAGE_EMBEDDING).combine_chunks()
    nulled = pa.array([*emb.to_pylist()[:11], None, *emb.to_pylist()[12:]], emb.type)
    table = table.set_column(2, C.IMAGE_EMBEDDING, nulled)
    pq.write_table(table, pool / "part-00000.parquet")  # row p00011: a null embedding
    ref = write_embeddings(root / "ref", y, prefix="q")
    return root, pool, ref


def nearest(pool, ref) -> tuple[list[str], np.ndarray]:
    """Each usable pool row's id and the cosine to its nearest reference row, by brute force."""
    table = read_dataset(pool)
    ids = table.column(C.ID).to_pylist()
    from mmtools.io.index import unit_vectors

    vecs, ok = unit_vectors(table.column(C.IMAGE_EMBEDDING))
    _, refs = stored(ref)
    best = (vecs @ refs.T).max(axis=1)
    return [i for i, k in zip(ids, ok, strict=True) if k], best[ok]


def a_threshold(best: np.ndarray, q: float) -> float:
    """A threshold near quantile `q` of `best`, halfway between two values (no ties at it)."""
    values = np.unique(best)
    i = int(q * len(values))
    return float((values[i] + values[i + 1]) / 2)


def test_near_a_dataset_equals_brute_force(pool_and_reference, tmp_path):
    _, pool, ref = pool_and_reference
    ids, best = nearest(pool, ref)
    x = a_threshold(best, 0.4)
    mmtools("filter", pool, "--near", ref, "--min-sim", x, "-o", tmp_path / "kept")
    kept = read_dataset(tmp_path / "kept").column(C.ID).to_pylist()
    assert kept == [i for i, b in zip(ids, best, strict=True) if b >= x]
    summary = manifest_summary(tmp_path / "kept")
    assert summary["dropped"] == {"near": int((best < x).sum())}
    # The drop ledger names each dropped row with its cosine to the nearest reference row.
    ledger = read_dropped(str(tmp_path / "kept"))
    far = {i: b for i, b in zip(ids, best, strict=True) if b < x}
    assert ledger.column("id").to_pylist() == list(far)
    assert set(ledger.column("rule").to_pylist()) == {"near"}
    np.testing.assert_allclose(ledger.column("value").to_numpy(), list(far.values()), atol=1e-5)
    assert reject_reasons(tmp_path / "kept") == {
        "p00010": "bad_embedding",
        "p00011": "no_embedding",
    }
    # --invert writes exactly the others: the two outputs partition the usable rows.
    mmtools("filter", pool, "--near", ref, "--min-sim", x, "--invert", "-o", tmp_path / "far")
    far = read_dataset(tmp_path / "far").column(C.ID).to_pylist()
    assert far == [i for i, b in zip(ids, best, strict=True) if b < x]
    assert manifest_summary(tmp_path / "far")["dropped"] == {"inverted": len(kept)}


def test_near_an_index_and_other_rules(pool_and_reference, tmp_path):
    _, pool, ref = pool_and_reference
    ids, best = nearest(pool, ref)
    x = a_threshold(best, 0.6)
    mmtools("index", ref, "-o", tmp_path / "ref-idx", "-q")
    args = ["--near", tmp_path / "ref-idx", "--min-sim", x, "--where", "id < 'p01000'"]
    proc = mmtools("filter", pool, *args, "-o", tmp_path / "kept", "--json")
    kept = read_dataset(tmp_path / "kept").column(C.ID).to_pylist()
    assert kept == [i for i, b in zip(ids, best, strict=True) if b >= x and i < "p01000"]
    dropped = json.loads(proc.stderr.decode().strip().splitlines()[-1])["dropped"]
    near = sum(1 for i, b in zip(ids, best, strict=True) if b < x and i < "p01000")
    assert dropped == {"where": 500, "near": near}
    both = mmtools("filter", pool, *args, "--invert", "-o", tmp_path / "x", check=False)
    assert both.returncode == 2 and "two filter commands" in both.stderr.decode()


def two_embeddings(path, image: np.ndarray, text: np.ndarray, prefix: str):
    """A dataset with an image_embedding and a text_embedding of the same size and model."""
    dim = image.shape[1]
    table = pa.table(
        {
            C.ID: [f"{prefix}{i:04d}" for i in range(len(image))],
            **{
                name: pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), dim)
                for name, x in ((C.IMAGE_EMBEDDING, image), (C.TEXT_EMBEDDING, text))
            },
        }
    )
    info = {name: {**SHAPES, "dim": dim} for name in (C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING)}
    path.mkdir()
    pq.write_table(
        table.replace_schema_metadata(C.with_metadata(table.schema, info).metadata),
        path / "part-00000.parquet",
    )
    return path


def brute_nearest(pool, ref, column: str) -> np.ndarray:
    """Each pool row's cosine to its nearest reference row in `column`, in float64."""

    def unit(path):
        col = read_dataset(path).column(column).combine_chunks()
        x = col.values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), -1)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return (unit(pool) @ unit(ref).T).max(axis=1)


def test_near_column_compares_the_named_embedding(tmp_path):
    image = clustered(600, 32, seed=5, clusters=20)
    text = clustered(600, 32, seed=6, clusters=20)
    pool = two_embeddings(tmp_path / "pool", image[:500], text[:500], "p")
    ref = two_embeddings(tmp_path / "ref", image[500:], text[500:], "q")
    best = brute_nearest(pool, ref, C.TEXT_EMBEDDING)
    x = a_threshold(best, 0.5)
    ids = read_dataset(pool).column(C.ID).to_pylist()
    want = [i for i, b in zip(ids, best, strict=True) if b >= x]
    by_image = brute_nearest(pool, ref, C.IMAGE_EMBEDDING) >= x
    assert want != [i for i, k in zip(ids, by_image, strict=True) if k]
    args = ["--near", ref, "--min-sim", x, "--near-column", C.TEXT_EMBEDDING, "-q"]
    mmtools("filter", pool, *args, "-o", tmp_path / "kept")
    assert read_dataset(tmp_path / "kept").column(C.ID).to_pylist() == want
    ledger = read_dropped(str(tmp_path / "kept"))
    assert ledger.column("id").to_pylist() == [i for i, b in zip(ids, best, strict=True) if b < x]
    np.testing.assert_allclose(ledger.column("value").to_numpy(), best[best < x], atol=1e-5)


def test_a_reference_of_another_model_is_refused(pool_and_reference, tmp_path):
    _, pool, _ = pool_and_reference
    other = write_embeddings(
        tmp_path / "other",
        clustered(20, 32, seed=1),
        model={"model": "ViT-B-32", "pretrained": "openai"},
    )
    proc = mmtools(
        "filter", pool, "--near", other, "--min-sim", "0.5", "-o", tmp_path / "o", check=False
    )
    assert proc.returncode == 3
    assert (
        "image_embedding was made by mmtools-shapes (bundled) but the --near reference by "
        "ViT-B-32 (openai)" in proc.stderr.decode()
    )
    missing = mmtools("filter", pool, "--near", other, "-o", tmp_path / "o", check=False)
    assert missing.returncode == 2 and "--min-sim" in missing.stderr.decode()


def test_kmeans_centroids_and_the_datacomp_recipe(pool_and_reference, tmp_path):
    _, pool, ref = pool_and_reference
    proc = run_recipe(
        "datacomp_image_filter.sh", pool, ref, tmp_path / "out", K="12", MIN_SIM="0.8"
    )
    assert proc.returncode == 0, proc.stderr.decode()
    centroids = IndexReader(str(tmp_path / "out.centroids"))
    assert centroids.kind == "centroids" and centroids.rows == 12
    assert centroids.model["model"] == "mmtools-shapes"
    assert sum(centroids.manifest["kmeans"]["sizes"]) == 300
    centres = np.stack([centroids.vector(i) for i in range(12)])
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1.0, atol=1e-5)
    table = read_dataset(pool)
    from mmtools.io.index import unit_vectors

    vecs, ok = unit_vectors(table.column(C.IMAGE_EMBEDDING))
    best = (vecs @ centres.T).max(axis=1)
    want = [
        i
        for i, k, b in zip(table.column(C.ID).to_pylist(), ok, best, strict=True)
        if k and b >= 0.8
    ]
    assert read_dataset(tmp_path / "out").column(C.ID).to_pylist() == want
    assert 0 < len(want) < 1498
