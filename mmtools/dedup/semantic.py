"""Semantic duplicates (SemDeDup): k-means on normalised embeddings, then cosine within clusters."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools.dedup.groups import edge_labels, spanning_edges
from mmtools.errors import DataContractError, require_module

CLUSTER_ROWS = 1000  # default average cluster size: within-cluster work is n * CLUSTER_ROWS
FLAT_MAX = 64  # above this many clusters, k-means runs as a tree to stay near-linear
BLOCK = 512  # rows per similarity block; blocks below the diagonal are skipped


def default_clusters(n: int) -> int:
    """Number of clusters when none is given: about CLUSTER_ROWS rows each."""
    return max(1, round(n / CLUSTER_ROWS))


def _faiss():
    # OpenMP threads that spin while waiting slow faiss down many times over when the
    # cores are shared; this must be set before faiss loads the OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return require_module("faiss", "dedup")


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    faiss = _faiss()
    if k <= 1 or len(x) <= 1:
        return np.zeros(len(x), dtype=np.int64)
    k = min(k, len(x))
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=10,
        seed=seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=64,
    )
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels.ravel().astype(np.int64)


def _share(k: int, sizes: np.ndarray) -> np.ndarray:
    """Split k clusters over groups in proportion to their sizes (at least one each)."""
    share = np.maximum(1, np.floor(k * sizes / max(1, sizes.sum()))).astype(np.int64)
    return np.minimum(np.where(sizes > 0, share, 0), sizes)


def cluster(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means cluster label of each row of `x` (unit rows, float32, C-contiguous).

    Up to FLAT_MAX clusters this is plain spherical k-means. Beyond, it is a tree: about
    sqrt(k) (at most FLAT_MAX) top clusters, each split again in proportion to its size,
    so the cost grows with n * sqrt(k) (n log k for huge k) instead of n * k.
    """
    k = max(1, min(k, len(x)))
    if k <= FLAT_MAX:
        return _kmeans(x, k, seed)
    top = _kmeans(x, min(FLAT_MAX, math.ceil(math.sqrt(k))), seed)
    sizes = np.bincount(top)
    order = np.argsort(top, kind="stable")
    bounds = np.r_[0, np.cumsum(sizes)]
    out = np.empty(len(x), dtype=np.int64)
    base = 0
    for c, sub_k in enumerate(_share(k, sizes)):
        idx = order[bounds[c] : bounds[c + 1]]
        if len(idx):
            out[idx] = base + cluster(np.ascontiguousarray(x[idx]), int(sub_k), seed + 1 + c)
        base += int(sub_k)
    return out


def close_pairs(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Edges among the rows of `x` whose cosine similarity exceeds `threshold`.

    Blocks of rows are compared by matrix products; a block dense with edges (a large set
    of near-copies) is reduced to a spanning forest, which has the same components.
    """
    n = len(x)
    out_i, out_j = [], []
    for r0 in range(0, n, BLOCK):
        r1 = min(n, r0 + BLOCK)
        for c0 in range(r0, n, BLOCK):
            c1 = min(n, c0 + BLOCK)
            hit = np.flatnonzero(x[r0:r1] @ x[c0:c1].T > threshold)
            i, j = np.divmod(hit, c1 - c0)
            if c0 == r0:
                i, j = i[j > i], j[j > i]
            if len(i) > 2 * BLOCK:
                i, j = spanning_edges(i, j + (r1 - r0), (r1 - r0) + (c1 - c0))
                i, j = _block_index(i, r0, r1, c0), _block_index(j, r0, r1, c0)
            else:
                i, j = i + r0, j + c0
            out_i.append(i)
            out_j.append(j)
    if not out_i:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)


def _block_index(node: np.ndarray, r0: int, r1: int, c0: int) -> np.ndarray:
    """Map block-local node numbers (rows first, then columns) back to row indices."""
    return np.where(node < r1 - r0, node + r0, node - (r1 - r0) + c0)


def duplicate_labels(x: np.ndarray, clusters: np.ndarray, eps: float) -> np.ndarray:
    """Component label per row of the graph `cos > 1 - eps` within each cluster; -1 if none."""
    order = np.argsort(clusters, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(clusters))] if len(clusters) else np.zeros(1, int)
    edges = []
    for c in range(len(bounds) - 1):
        idx = order[bounds[c] : bounds[c + 1]]
        if len(idx) > 1:
            i, j = close_pairs(np.ascontiguousarray(x[idx]), 1.0 - eps)
            edges.append((idx[i], idx[j]))
    return edge_labels(len(x), edges)


class Semantic:
    """Embeddings closer than cosine 1 - eps, within one k-means cluster, are duplicates."""

    name = "semantic"

    def __init__(self, column: str, eps: float, clusters: int | None, seed: int):
        self.column, self.eps, self.clusters, self.seed = column, eps, clusters, seed
        self.failures: dict[int, tuple[str, str]] = {}
        self._rows: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._norms: list[np.ndarray] = []

    def bind(self, schema: pa.Schema) -> list[str]:
        """Check the embedding column; return the columns pass 1 must read."""
        C.require(schema, [self.column], "dedup --method semantic")
        t = schema.field(self.column).type
        if not (pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)):
            raise DataContractError(
                f"column {self.column} is {t}, not an embedding "
                "(a fixed-size list of floats); pick one with --column"
            )
        _faiss()
        self.dim = t.list_size
        return [self.column]

    def keys(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        """The embeddings, as stored."""
        return {self.column: batch.column(self.column)}

    def scan(self, batch: pa.RecordBatch, offset: int) -> None:
        """Keep the embeddings as stored and their norms; null, NaN or zero ones are failures."""
        arr = batch.column(self.column)
        # The valid rows' values, without a copy where Arrow's buffer allows (float16 stays).
        raw = arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.dim)
        valid = arr.is_valid().to_numpy(zero_copy_only=False) if arr.null_count else None
        wide = raw.astype(np.float32)
        norm = np.zeros(len(arr), dtype=np.float32)
        norm[slice(None) if valid is None else valid] = np.sqrt(np.einsum("ij,ij->i", wide, wide))
        bad = ~(norm > 0) | ~np.isfinite(norm)  # NaN norms fail both tests
        for i in np.flatnonzero(bad):
            detail = "zero norm" if norm[i] == 0 else "NaN or infinite values"
            detail = detail if valid is None or valid[i] else "no embedding"
            self.failures[offset + int(i)] = ("invalid_embedding", f"{self.column}: {detail}")
        self._rows.append((raw, valid))
        self._norms.append(norm)

    def _unit_rows(self) -> np.ndarray:
        """All embeddings as float32 unit rows in one array (failed rows are zero)."""
        norm = np.concatenate(self._norms) if self._norms else np.zeros(0, np.float32)
        x = np.zeros((len(norm), self.dim), dtype=np.float32)
        start = 0
        for raw, valid in self._rows:
            rows = len(raw) if valid is None else len(valid)
            x[start : start + rows][slice(None) if valid is None else valid] = raw
            start += rows
        self._rows, self._norms = [], []
        ok = (norm > 0) & np.isfinite(norm)
        x[~ok] = 0.0
        x /= np.where(ok, norm, 1.0)[:, None]
        return x

    def labels(self, active: np.ndarray) -> np.ndarray:
        """Group label per active row: components of the close-pair graph in each cluster."""
        x = self._unit_rows()
        if len(active) < len(x):
            x = np.ascontiguousarray(x[active])
        k = self.clusters or default_clusters(len(x))
        return duplicate_labels(x, cluster(x, k, self.seed), self.eps)

    def release(self) -> None:
        """Drop the embeddings."""
        self._rows, self._norms = [], []
