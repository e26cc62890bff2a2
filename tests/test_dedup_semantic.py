"""`mmtools dedup --method semantic`: brute-force agreement, noisy copies, keep rule, bad rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import mmtools, read_dataset, read_rejects
from test_dedup import (
    assert_ray_buckets_give_local_groups,
    found_groups,
    group_pairs,
    precision_recall,
    write_dataset,
)

from mmtools import columns as C
from mmtools.steps.dedup.semantic import FLAT_MAX, cluster, duplicate_labels


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted(n_groups: int, dim: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """Unit vectors: groups of noisy copies (cosine ~0.98), a related vector per group
    (cosine ~0.86, not a duplicate) and unrelated ones; rows shuffled; the true groups."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for g in range(n_groups):
        base = unit(rng.normal(size=dim))
        copies = rng.integers(0, 4)
        rows.append(base)
        rows += [
            unit(base + rng.normal(scale=0.15 / np.sqrt(dim), size=dim)) for _ in range(copies)
        ]
        rows.append(unit(base + rng.normal(scale=0.6 / np.sqrt(dim), size=dim)))
        labels += [g] * (copies + 1) + [-1]
    order = rng.permutation(len(rows))
    x = np.stack(rows)[order].astype(np.float32)
    labels = np.array(labels)[order]
    groups = [list(np.flatnonzero(labels == g)) for g in range(n_groups)]
    return x, [g for g in groups if len(g) > 1]


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    """Groups of two or more rows sharing a label >= 0."""
    out: dict[int, set[int]] = {}
    for i, lab in enumerate(labels):
        if lab >= 0:
            out.setdefault(int(lab), set()).add(i)
    return {frozenset(g) for g in out.values() if len(g) > 1}


def brute_force(x: np.ndarray, clusters: np.ndarray, eps: float) -> set[frozenset[int]]:
    """Components of all pairs with cosine > 1 - eps in the same cluster, by union-find."""
    parent = list(range(len(x)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    for i, j in zip(*np.nonzero(np.triu(sim > 1 - eps, k=1)), strict=True):
        if clusters[i] == clusters[j]:
            parent[find(int(i))] = find(int(j))
    roots = np.array([find(i) for i in range(len(x))])
    return partition(np.where(np.bincount(roots, minlength=len(x))[roots] > 1, roots, -1))


@pytest.mark.parametrize("k", [1, 8, FLAT_MAX + 40])
def test_semantic_equals_brute_force_within_each_cluster(k):
    x, _ = planted(700, 48, seed=k)
    # A large set of near-identical rows: a dense block, reduced to a spanning forest.
    blob = unit(x[0] + np.random.default_rng(0).normal(scale=1e-3, size=(300, 48)))
    x = np.concatenate([x, blob.astype(np.float32)])
    assigned = cluster(x, k, seed=0)
    assert len(np.unique(assigned)) <= k and len(np.unique(assigned)) >= min(k, 2 * k // 3)
    found = partition(duplicate_labels(x, assigned, eps=0.05))
    assert found == brute_force(x, assigned, eps=0.05)
    assert any(len(g) >= 300 for g in found)


def embedding_table(x: np.ndarray, dtype: str = "float16", **extra) -> pa.Table:
    """A dataset table with ids and an image_embedding column, plus `extra` columns."""
    values = pa.array(x.astype(dtype).ravel())
    emb = pa.FixedSizeListArray.from_arrays(values, x.shape[1])
    assert emb.type == C.embedding_type(x.shape[1], dtype)
    cols = {C.ID: [f"e{i:05d}" for i in range(len(x))], C.IMAGE_EMBEDDING: emb, **extra}
    return pa.table(cols)


def test_semantic_finds_noisy_copies_and_keeps_the_best_score(tmp_path):
    x, true_groups = planted(300, 64, seed=7)
    score = np.random.default_rng(1).random(len(x)).astype(np.float32)
    ds = write_dataset(tmp_path / "ds", embedding_table(x, clip_score=score), shards=3)
    out = tmp_path / "out"
    args = ["-m", "semantic", "--keep", "highest:clip_score", "--clusters", "4", "--mark"]
    proc = mmtools("dedup", ds, "-o", out, *args)
    marked = read_dataset(out)
    ids = marked[C.ID].to_pylist()
    true = group_pairs([[ids[i] for i in g] for g in true_groups])
    precision, recall = precision_recall(group_pairs(found_groups(marked)), true)
    assert precision >= 0.98 and recall >= 0.95, (precision, recall)
    assert "clusters: semantic" in proc.stderr.decode()
    scores = dict(zip(ids, marked[C.CLIP_SCORE].to_pylist(), strict=True))
    dup = dict(zip(ids, marked[C.IS_DUPLICATE].to_pylist(), strict=True))
    for group in found_groups(marked):
        best = max(group, key=lambda i: scores[i])
        assert not dup[best] and all(dup[i] for i in group if i != best)


def test_semantic_on_text_embeddings_rejects_bad_rows(tmp_path):
    x, true_groups = planted(40, 32, seed=3)
    x[5], x[9] = np.nan, 0.0
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 32)
    emb = pa.array([None if i == 12 else v for i, v in enumerate(emb.to_pylist())], emb.type)
    table = pa.table({C.ID: [f"t{i:03d}" for i in range(len(x))], C.TEXT_EMBEDDING: emb})
    ds = write_dataset(tmp_path / "ds", table)
    out = tmp_path / "out"
    mmtools("dedup", ds, "-o", out, "-m", "semantic", "--column", "text_embedding", "-q")
    rejects = read_rejects(out)
    assert sorted(rejects[C.ID].to_pylist()) == ["t005", "t009", "t012"]
    assert set(rejects[C.REJECT_REASON].to_pylist()) == {"invalid_embedding"}
    kept = set(read_dataset(out)[C.ID].to_pylist())
    bad = {5, 9, 12}
    for g in true_groups:
        good = [i for i in g if i not in bad]
        assert sum(f"t{i:03d}" in kept for i in good) == min(1, len(good))
    expected = (
        len(x) - 3 - sum(max(0, len([i for i in g if i not in bad]) - 1) for g in true_groups)
    )
    assert len(kept) == expected


def test_semantic_cluster_buckets_give_the_same_groups_as_the_local_search(monkeypatch):
    """The Ray path (a model fitted on the rows `sampled` picks, rows assigned per batch,
    buckets of clusters searched per cluster) makes the local groups; bad rows are left out."""
    from mmtools.steps.dedup import semantic
    from mmtools.steps.dedup.semantic import ERROR, KMeans, Semantic, problems, sample_rate

    monkeypatch.setattr(semantic, "SAMPLE_PER_CLUSTER", 8)
    x, _ = planted(400, 24, seed=11)
    x[5], x[8] = np.nan, 0.0
    n, k = len(x), 90  # a tree of k-means models fitted on part of the rows
    assert sample_rate(n, k) < 1
    table = embedding_table(x)
    bad = problems(table[C.IMAGE_EMBEDDING].combine_chunks(), 24)
    keys = table.append_column(ERROR, pa.array(bad, pa.string()))
    ok = np.flatnonzero(keys[ERROR].is_null().to_numpy(zero_copy_only=False))
    assert len(ok) == n - 2

    def make() -> Semantic:
        method = Semantic(C.IMAGE_EMBEDDING, 0.05, k, 0)
        method.bind(table.schema)
        unit = semantic.unit_rows(x[ok])[0]
        method.model = KMeans.fit(unit[semantic.sampled(ok, sample_rate(len(ok), k), 0)], k, 0)
        return method

    assert_ray_buckets_give_local_groups(make, keys, min_groups=50)
