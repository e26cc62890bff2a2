"""Semantic duplicates (SemDeDup): k-means on normalised embeddings, then cosine within clusters.

The k-means model is fitted on a sample of rows chosen by a hash of each row's input
position, then assigns every row; so one process over all rows (the local engine) and
workers each over their own batches (Ray) find the same clusters, and a groupby on the
cluster finds the same close pairs as `duplicate_labels`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import DataContractError, require_module
from mmtools.step import POSITION
from mmtools.steps.dedup.groups import (
    BucketGrouped,
    edge_labels,
    mix64,
    spanning_edges,
    with_bucket,
)
from mmtools.steps.dedup.index import GEN

CLUSTER_ROWS = 1000  # default average cluster size: within-cluster work is n * CLUSTER_ROWS
FLAT_MAX = 64  # above this many clusters, k-means runs as a tree to stay near-linear
SAMPLE_PER_CLUSTER = 64  # k-means trains on about this many sampled rows per cluster
BLOCK = 512  # rows per similarity block; blocks below the diagonal are skipped
ASSIGN_BYTES = 4 << 20  # float64 bytes of rows (or of their similarities) assigned at a time
UNIT_ROWS = 1 << 13  # rows normalised at a time
ERROR = "_key_semantic_error"  # why a row has no usable embedding (else null)
CLUSTER = "cluster"
INDEX_CLUSTER = "_key_semantic_cluster"  # a dedup index row's cluster under its model
INDEX_UNIT = "_key_semantic_unit"  # a dedup index row's unit embedding, `quantised`
INDEX_SCALE = "_key_semantic_scale"  # and the scale of its int8 values
REFIT = 2  # a dedup index's model is fitted again once the rows have grown this many times


def default_clusters(n: int) -> int:
    """Number of clusters when none is given: about CLUSTER_ROWS rows each."""
    return max(1, round(n / CLUSTER_ROWS))


def _faiss():
    # OpenMP threads that spin while waiting slow faiss down many times over when the
    # cores are shared; this must be set before faiss loads the OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return require_module("faiss", "dedup")


def unit_rows(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `raw` (any float type) as float32 unit vectors, zero where the norm is zero or
    not finite; and the norms. Row by row, so any batching gives the same values."""
    x = np.empty(raw.shape, dtype=np.float32)
    norm = np.empty(len(raw))
    for r0 in range(0, len(raw), UNIT_ROWS):  # a slab at a time: float64 copies stay small
        wide = raw[r0 : r0 + UNIT_ROWS].astype(np.float64)
        n = norm[r0 : r0 + UNIT_ROWS] = np.sqrt(np.square(wide).sum(axis=1))
        ok = (n > 0) & np.isfinite(n)
        wide /= np.where(ok, n, 1.0)[:, None]
        wide[~ok] = 0.0
        x[r0 : r0 + UNIT_ROWS] = wide
    return x, norm


def quantised(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows `x` as int8 rows (the largest value of each at +-127) and a float32 scale
    per row that makes q * scale a unit row again: how a dedup index stores them, in a
    quarter of float32's bytes and cast back several times faster than float16. A cosine
    with such a row moves by 3e-4 (one standard deviation) at 256 dimensions, 2.5e-3 at
    most in a million pairs; more with fewer dimensions, less with more."""
    top = np.abs(x).max(axis=1, initial=0.0)
    q = np.rint(x * (127 / np.where(top > 0, top, 1.0))[:, None]).astype(np.int8)
    norm = np.sqrt(np.square(q, dtype=np.float64).sum(axis=1))
    return q, (1 / np.where(norm > 0, norm, 1.0)).astype(np.float32)


class StoredRows:
    """Embeddings as stored, in the chunks they were read in (a dedup index's generations,
    memory-mapped: nothing is copied until rows are asked for), read back as float32 unit
    rows. A chunk is `quantised` int8 rows with their `scales` (None: raw floats, as an
    index written before quantisation holds them, normalised when read). Rows of an index
    were usable when kept (never zero)."""

    def __init__(self, chunks: list[np.ndarray], dim: int, scales: list | None = None):
        self.chunks, self.dim = chunks, dim
        self.scales = scales if scales is not None else [None] * len(chunks)
        self.starts = np.cumsum([0] + [len(c) for c in chunks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def unit(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` as float32 unit vectors."""
        x = np.empty((len(rows), self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        ranked = rows[order]
        ascending = bool(np.all(order[1:] > order[:-1]))  # rows in order: slices, not scatter
        bounds = np.searchsorted(ranked, self.starts)
        raw = False
        for c, (a, b) in enumerate(itertools.pairwise(bounds)):
            if a >= b:
                continue
            at, scale = ranked[a:b] - self.starts[c], self.scales[c]
            found = self.chunks[c].take(at, axis=0)
            into = x[a:b] if ascending else np.empty((b - a, self.dim), np.float32)
            if scale is None:
                into[:], raw = found, True
            else:
                np.multiply(found, scale.take(at)[:, None], out=into)
            if not ascending:
                x[order[a:b]] = into
        for r0 in range(0, len(rows) if raw else 0, UNIT_ROWS):
            slab = x[r0 : r0 + UNIT_ROWS]
            slab /= np.sqrt(np.einsum("ij,ij->i", slab, slab))[:, None]
        return x


def fresh_pairs(
    x_new: np.ndarray, c_new: np.ndarray, old: Callable, c_old: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Edges above `threshold` cosine within a cluster, each with a new row on one side:
    indices into `x_new`, and len(x_new) + k for the old row k. Old rows are sorted by their
    clusters `c_old`, and `old(b0, b1)` gives the unit rows b0..b1, so only the clusters of
    new rows are read, one at a time. A block dense with edges is reduced to a spanning
    forest, as in `close_pairs`."""
    n = len(x_new)
    order = np.argsort(c_new, kind="stable")
    xs, cs = x_new[order], c_new[order]
    starts = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]]) if n else np.empty(0, np.int64)
    ends = np.r_[starts[1:], n]
    lo, hi = np.searchsorted(c_old, cs[starts], "left"), np.searchsorted(c_old, cs[starts], "right")
    out_i, out_j = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for a0, a1, b0, b1 in zip(starts, ends, lo, hi, strict=True):
        i, j = close_pairs(xs[a0:a1], threshold)  # new with new
        out_i.append(order[a0 + i])
        out_j.append(order[a0 + j])
        for c0 in range(b0, b1, 4 * BLOCK):  # new with old
            c1 = min(b1, c0 + 4 * BLOCK)
            x_old = old(c0, c1)
            for r0 in range(a0, a1, BLOCK):
                r1 = min(a1, r0 + BLOCK)
                hit = np.flatnonzero(xs[r0:r1] @ x_old.T > threshold)
                i, j = np.divmod(hit, c1 - c0)
                j += r1 - r0  # nodes: the block's new rows, then its old rows
                if len(i) > 2 * BLOCK:
                    i, j = spanning_edges(i, j, (r1 - r0) + (c1 - c0))
                for side, node in ((out_i, i), (out_j, j)):
                    new = node < r1 - r0
                    side.append(np.where(new, order[r0 + np.minimum(node, r1 - r0 - 1)], 0))
                    side[-1][~new] = n + c0 + node[~new] - (r1 - r0)
    return np.concatenate(out_i), np.concatenate(out_j)


def embedding_rows(arr: pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The values of an embedding column's valid rows as stored (float16 stays, no copy where
    Arrow's buffer allows) and the validity of each row (None when none is null)."""
    raw = arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    valid = arr.is_valid().to_numpy(zero_copy_only=False) if arr.null_count else None
    return raw, valid


def problems(arr: pa.Array, dim: int) -> list[str | None]:
    """Why each row's embedding cannot be used (null, zero or not finite); None if it can."""
    raw, valid = embedding_rows(arr, dim)
    norm = np.full(len(arr), np.nan)
    norm[slice(None) if valid is None else valid] = unit_rows(raw)[1]
    out: list[str | None] = [None] * len(arr)
    for i in np.flatnonzero(~(norm > 0) | ~np.isfinite(norm)):  # NaN norms fail both tests
        if valid is not None and not valid[i]:
            out[i] = "no embedding"
        else:
            out[i] = "zero norm" if norm[i] == 0 else "NaN or infinite values"
    return out


def sampled(positions: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Whether each input position is in k-means' training sample: a hash of the position
    and the seed falls below `rate`, whoever looks and in whatever batches."""
    if rate >= 1.0:
        return np.ones(len(positions), dtype=bool)
    salt = mix64(np.array([seed], np.uint64))
    return mix64(positions.astype(np.uint64) ^ salt) < np.uint64(int(rate * 2.0**64))


def sample_rate(n: int, k: int) -> float:
    """Share of `n` rows k-means trains on for `k` clusters."""
    return SAMPLE_PER_CLUSTER * k / max(1, n)


def _centroids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids of the rows of `x` (k of them, fewer for fewer rows)."""
    if k <= 1 or len(x) <= 1:
        return x[:1] if len(x) else np.zeros((1, x.shape[1]), dtype=np.float32)
    k = min(k, len(x))
    km = _faiss().Kmeans(
        x.shape[1],
        k,
        niter=10,
        seed=seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=SAMPLE_PER_CLUSTER,
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.copy()


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's most similar centroid, in float64 so that batches agree."""
    c = centroids.astype(np.float64).T
    out = np.empty(len(x), dtype=np.int64)
    step = max(1, ASSIGN_BYTES // (8 * max(1, x.shape[1], len(centroids))))
    wide = np.empty((min(step, len(x)), x.shape[1]))  # reused: no fresh memory per slab
    for r0 in range(0, len(x), step):
        slab = wide[: len(x[r0 : r0 + step])]
        slab[:] = x[r0 : r0 + step]
        out[r0 : r0 + step] = (slab @ c).argmax(1)
    return out


def _share(k: int, sizes: np.ndarray) -> np.ndarray:
    """Split k clusters over groups in proportion to their sizes (at least one each)."""
    share = np.maximum(1, np.floor(k * sizes / max(1, sizes.sum()))).astype(np.int64)
    return np.maximum(1, np.minimum(share, sizes))


@dataclass
class KMeans:
    """A fitted k-means model: centroids and, beyond FLAT_MAX clusters, a model under each
    (a tree, so fitting and assigning grow with n * sqrt(k) instead of n * k)."""

    centroids: np.ndarray
    children: list[KMeans] | None
    clusters: int

    @classmethod
    def fit(cls, x: np.ndarray, k: int, seed: int) -> KMeans:
        """Fit about `k` clusters to the unit rows `x` (at most one per row)."""
        k = max(1, min(k, len(x)))
        if k <= FLAT_MAX:
            centroids = _centroids(x, k, seed)
            return cls(centroids, None, len(centroids))
        top = _centroids(x, min(FLAT_MAX, math.ceil(math.sqrt(k))), seed)
        near = _nearest(x, top)
        sizes = np.bincount(near, minlength=len(top))
        children = [
            cls.fit(x[near == c] if sizes[c] else top[c : c + 1], int(sub_k), seed + 1 + c)
            for c, sub_k in enumerate(_share(k, sizes))
        ]
        return cls(top, children, sum(child.clusters for child in children))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The model as named arrays (for a dedup index's model file): each node's centroids
        and its number of children, in preorder."""
        out: dict[str, np.ndarray] = {}
        children: list[int] = []

        def walk(node: KMeans) -> None:
            out[f"centroids_{len(children)}"] = node.centroids
            children.append(len(node.children or []))
            for child in node.children or []:
                walk(child)

        walk(self)
        return {**out, "children": np.array(children, np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> KMeans:
        """The model `to_arrays` wrote."""
        counts = iter(enumerate(arrays["children"].tolist()))

        def build() -> KMeans:
            at, n = next(counts)
            centroids = np.asarray(arrays[f"centroids_{at}"], np.float32)
            if not n:
                return cls(centroids, None, len(centroids))
            children = [build() for _ in range(n)]
            return cls(centroids, children, sum(c.clusters for c in children))

        return build()

    def assign(self, x: np.ndarray) -> np.ndarray:
        """The cluster (0 .. clusters - 1) of each row of `x`."""
        near = _nearest(x, self.centroids)
        if self.children is None:
            return near
        out = np.empty(len(x), dtype=np.int64)
        base = 0
        for c, child in enumerate(self.children):
            idx = np.flatnonzero(near == c)
            if len(idx):
                out[idx] = base + child.assign(x[idx])
            base += child.clusters
        return out


def fitted(x: np.ndarray, k: int, seed: int, positions: np.ndarray | None = None) -> KMeans:
    """A k-means model of the unit rows of `x` (input positions `positions`, default 0..n-1),
    fitted on the rows `sampled` picks."""
    positions = np.arange(len(x)) if positions is None else positions
    k = max(1, min(k, len(x)))
    return KMeans.fit(x[sampled(positions, sample_rate(len(x), k), seed)], k, seed)


def cluster(x: np.ndarray, k: int, seed: int, positions: np.ndarray | None = None) -> np.ndarray:
    """k-means cluster of each unit row of `x`: the `fitted` model assigns them all."""
    return fitted(x, k, seed, positions).assign(x)


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
    """Component label per row of the graph `cos > 1 - eps` within each cluster; -1 if none.
    (Against a dedup index, `fresh_pairs` pairs only a run's own rows with the rest.)"""
    order = np.argsort(clusters, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(clusters))] if len(clusters) else np.zeros(1, int)
    edges = []
    for c in range(len(bounds) - 1):
        idx = order[bounds[c] : bounds[c + 1]]
        if len(idx) < 2:
            continue
        i, j = close_pairs(np.ascontiguousarray(x[idx]), 1.0 - eps)
        edges.append((idx[i], idx[j]))
    return edge_labels(len(x), edges)


class Semantic(BucketGrouped):
    """Embeddings closer than cosine 1 - eps, within one k-means cluster, are duplicates."""

    name = "semantic"
    modelled = True
    for_index = False  # set by `Dedup` with an index: cluster by the index's model

    def __init__(self, column: str, eps: float, clusters: int | None, seed: int):
        self.column, self.eps, self.clusters, self.seed = column, eps, clusters, seed
        self.bucket_columns, self.bucket_inputs = (column,), (column, ERROR)
        self.model: KMeans | None = None
        self.index_from: int | None = None  # where a dedup index's rows start (`Dedup`)
        self._x: np.ndarray | None = None
        self.failures: dict[int, tuple[str, str]] = {}
        self._rows: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._n = 0
        # A dedup index's rows: embeddings as stored, generation, cluster under its model.
        self._old: list[tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]] = []
        self._model_used: KMeans | None = None  # the model this run's index keys are under
        self._x_new: np.ndarray | None = None  # this run's unit rows, with an index
        self._stored_rows: StoredRows | None = None  # the index's rows, with an index

    def bind(self, schema: pa.Schema) -> list[str]:
        """Check the embedding column; return the columns pass 1 must read."""
        if self.column != C.IMAGE_EMBEDDING:  # named with --column
            C.require_named(schema, [self.column], "--column")
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
        """The embeddings, as stored, and why a row's cannot be used (else null)."""
        arr = batch.column(self.column)
        return {self.column: arr, ERROR: pa.array(problems(arr, self.dim), pa.string())}

    def scan(self, keys: pa.RecordBatch, offset: int) -> None:
        """Keep the embeddings as stored; rows that cannot be used become failures."""
        if GEN in keys.schema.names:  # a dedup index's rows (each was kept, so usable)
            found = keys.column(INDEX_CLUSTER) if INDEX_CLUSTER in keys.schema.names else None
            stored = np.full(keys.num_rows, -1, np.int64)
            if found is not None:
                stored = found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            gens = keys.column(GEN).to_numpy(zero_copy_only=False)
            self._old.append((*self._index_rows(keys), gens, stored))
            self._n = offset + keys.num_rows
            return
        for i, detail in enumerate(keys.column(ERROR).to_pylist()):
            if detail is not None:
                self.failures[offset + i] = ("invalid_embedding", f"{self.column}: {detail}")
        if self.column in keys.schema.names:  # absent when a groupby on buckets groups them
            self._rows.append(embedding_rows(keys.column(self.column), self.dim))
        self._n = offset + keys.num_rows

    def _index_rows(self, keys: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray | None]:
        """A batch of index rows' embeddings as stored (a batch is one generation's):
        `quantised` int8 rows and their scales, or the raw floats (scales None) of a
        generation that holds the embedding column itself (written before quantisation)."""
        unit = keys.column(INDEX_UNIT) if INDEX_UNIT in keys.schema.names else None
        if unit is None or unit.null_count:
            return embedding_rows(keys.column(self.column), self.dim)[0], None
        return embedding_rows(unit, self.dim)[0], keys.column(INDEX_SCALE).to_numpy()

    def _unit_rows(self) -> np.ndarray:
        """All embeddings as float32 unit rows in one array (failed rows are zero); each
        batch as stored is let go once converted, so the two forms are never both whole."""
        parts, self._rows = self._rows, []
        total = sum(len(raw) if valid is None else len(valid) for raw, valid in parts)
        x = np.zeros((total, self.dim), dtype=np.float32)
        start = 0
        for i, (raw, valid) in enumerate(parts):
            parts[i] = None
            rows = len(raw) if valid is None else len(valid)
            x[start : start + rows][slice(None) if valid is None else valid] = unit_rows(raw)[0]
            start += rows
        return x

    def labels(self, active: np.ndarray) -> np.ndarray:
        """Group label per active row: components of the close-pair graph in each cluster."""
        if (preset := self.preset(active)) is not None:
            return preset
        if self.for_index:
            return self._labels_with_index(active)
        x = self._unit_rows()
        self._x = x if self.values_wanted else None
        if len(active) < len(x):
            x = np.ascontiguousarray(x[active])
        k = self.clusters or default_clusters(len(x))
        return duplicate_labels(x, cluster(x, k, self.seed, active), self.eps)

    def _labels_with_index(self, active: np.ndarray) -> np.ndarray:
        """Labels when the rows from `index_from` on are a dedup index's: this run's rows are
        assigned to clusters by the index's model and paired with each other and with the
        index rows of their clusters, whose clusters the index keeps. The model is fitted
        (to every row, as without an index) when the index has none or has grown REFIT times
        since its fit; the run then stages it, with the new cluster of every index row."""
        start = self._n if self.index_from is None else self.index_from
        x_new = self._unit_rows()
        stored_rows, gens, stored = self._old_keys()
        new, old = active[active < start], active[active >= start]
        model, fitted_rows = self._index_model(gens, stored)
        missing = stored[old - start] < 0
        refit = model is None or len(active) > REFIT * fitted_rows or 2 * missing.sum() > len(old)
        if refit:
            x = np.concatenate([x_new[new], stored_rows.unit(old - start)])
            model = fitted(x, self.clusters or default_clusters(len(x)), self.seed, active)
            found = model.assign(x)
            c_new, c_old = found[: len(new)], found[len(new) :]
            self.fitted_model = {
                **model.to_arrays(),
                "rows": np.array(len(active)),
                "gens": gens[old - start].astype(np.int32),
                "clusters": c_old.astype(np.int32),
            }
        else:
            c_new, c_old = model.assign(x_new[new]), stored[old - start]
            if missing.any():
                c_old[missing] = model.assign(stored_rows.unit(old[missing] - start))
        self._model_used = model
        self._x_new, self._stored_rows, self._start = x_new, stored_rows, start
        # Only the index rows of the clusters this run's rows are in are read, by cluster.
        present = np.zeros(model.clusters, bool)
        present[c_new] = True
        near = np.flatnonzero(present[c_old])
        by = c_old[near]  # sorted by cluster: a radix sort where 16 bits hold the clusters
        near = near[
            np.argsort(by.astype(np.int16) if model.clusters < 2**15 else by, kind="stable")
        ]
        rows = old[near] - start

        def read(b0: int, b1: int) -> np.ndarray:
            return stored_rows.unit(rows[b0:b1])

        i, j = fresh_pairs(x_new[new], c_new, read, c_old[near], 1 - self.eps)
        old_at = j >= len(new)
        j[old_at] = len(new) + near[j[old_at] - len(new)]
        return edge_labels(len(active), [(i, j)])

    def _old_keys(self) -> tuple[StoredRows, np.ndarray, np.ndarray]:
        """The index rows' embeddings as stored, generations and stored clusters."""
        parts, self._old = self._old, []
        rows = StoredRows([p[0] for p in parts], self.dim, [p[1] for p in parts])
        if not parts:
            return rows, np.zeros(0, np.int32), np.zeros(0, np.int64)
        return rows, np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])

    def _index_model(self, gens: np.ndarray, stored: np.ndarray) -> tuple[KMeans | None, int]:
        """The index's model and the rows it was fitted on; `stored` then holds each index
        row's cluster under it (from the model's file for the generations before it), -1
        where none is known."""
        found = self.index_model
        if found is None or "children" not in found.arrays:
            stored[:] = -1
            return None, 0
        before = found.arrays["gens"]
        for gen in np.unique(gens):
            at = gens == gen
            if gen in found.own:
                continue
            side = found.arrays["clusters"][before == gen]
            stored[at] = side if len(side) == at.sum() else -1
        return KMeans.from_arrays(found.arrays), int(found.arrays["rows"])

    def index_columns(self, keys: pa.Table) -> dict[str, pa.Array | None]:
        """Each kept row's unit embedding, `quantised` (instead of the embedding as stored),
        and its cluster under the model the index keeps after this run."""
        model, self._model_used = self._model_used, None
        if not keys.num_rows:
            return {}
        x = unit_rows(embedding_rows(keys.column(self.column).combine_chunks(), self.dim)[0])[0]
        q, scale = quantised(x)
        out = {
            INDEX_UNIT: pa.FixedSizeListArray.from_arrays(pa.array(q.ravel()), self.dim),
            INDEX_SCALE: pa.array(scale),
            self.column: None,
            ERROR: None,
        }
        if model is not None:
            out[INDEX_CLUSTER] = pa.array(model.assign(x), pa.int32())
        return out

    def _k(self, n: int) -> int:
        return max(1, min(self.clusters or default_clusters(n), n))

    def sample_rate(self) -> float:
        """Share of the usable rows the k-means model is fitted on (as `cluster` samples)."""
        n = self._n - len(self.failures)
        return sample_rate(n, self._k(n))

    def sample_rows(self, keys: pa.Table, rate: float) -> pa.Table:
        """The `sampled` usable rows of `keys` as (position, unit embedding)."""
        return self.unit_table(keys, rate)

    def fit(self, sample: pa.Table | None) -> None:
        """Fit the k-means model on the sampled rows (in input order, as `cluster` does); the
        groupby on buckets then assigns each row to its cluster (`bucket_rows`)."""
        if sample is None or not sample.num_rows:
            x = np.zeros((0, self.dim), np.float32)
        else:
            x = _matrix(sample.sort_by(POSITION))
        self.model = KMeans.fit(x, self._k(self._n - len(self.failures)), self.seed)

    def unit_table(self, keys: pa.Table, rate: float = 1.0) -> pa.Table:
        """The usable rows of `keys` (the `sampled` ones at `rate` < 1) as (position, unit
        embedding), with their cluster once the model is fitted."""
        keys = keys.filter(keys[ERROR].is_null())
        pos = keys[POSITION].to_numpy()
        keep = sampled(pos, rate, self.seed)
        arr = keys[self.column].combine_chunks().filter(pa.array(keep))
        x = unit_rows(embedding_rows(arr, self.dim)[0])[0]
        out = {
            POSITION: pa.array(pos[keep], pa.int64()),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), self.dim),
        }
        if self.model is not None:
            out[CLUSTER] = pa.array(self.model.assign(x), pa.int64())
        return pa.table(out)

    def bucket_rows(self, keys: pa.Table, buckets: int) -> pa.Table:
        """For a groupby on buckets: the usable rows with their cluster, bucketed by it."""
        rows = self.unit_table(keys)
        return with_bucket(rows, rows[CLUSTER].to_numpy().astype(np.uint64), buckets)

    def bucket_edges(self, bucket: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """For a groupby on buckets: the close pairs within each cluster of a bucket, its rows
        in input order (as `duplicate_labels` orders them)."""
        bucket = bucket.sort_by([(CLUSTER, "ascending"), (POSITION, "ascending")])
        x, pos = _matrix(bucket), bucket[POSITION].to_numpy()
        clusters = bucket[CLUSTER].to_numpy()
        bounds = np.flatnonzero(np.r_[True, clusters[1:] != clusters[:-1], True])
        found_i, found_j = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for a, b in itertools.pairwise(bounds):
            i, j = close_pairs(x[a:b], 1.0 - self.eps)
            found_i.append(pos[a:b][i])
            found_j.append(pos[a:b][j])
        return np.concatenate(found_i), np.concatenate(found_j)

    def values(self, dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """The cosine similarity of each dropped row's embedding to its kept row's."""
        if self._x is not None:
            a, b = self._x[dropped], self._x[kept]
        elif self._x_new is not None:
            a, b = self._unit_at(dropped), self._unit_at(kept)
        elif (found := self.member_keys(self.column, dropped)) is not None:
            a = unit_rows(embedding_rows(found, self.dim)[0])[0]
            b = unit_rows(embedding_rows(self.member_keys(self.column, kept), self.dim)[0])[0]
        else:
            return np.full(len(dropped), np.nan)
        return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))

    def _unit_at(self, positions: np.ndarray) -> np.ndarray:
        """The unit embeddings at `positions`, this run's rows or a dedup index's."""
        out = np.zeros((len(positions), self.dim), np.float32)
        mine = positions < self._start
        out[mine] = self._x_new[positions[mine]]
        out[~mine] = self._stored_rows.unit(positions[~mine] - self._start)
        return out

    def member_columns(self) -> tuple[str, ...]:
        """The embeddings, when similarities are wanted."""
        return (self.column,) if self.values_wanted else ()

    def release(self) -> None:
        """Drop the embeddings and the model."""
        self._rows, self._groups, self.model = [], None, None
        self._x = self._members = self._x_new = self._stored_rows = None


def _matrix(table: pa.Table) -> np.ndarray:
    """The unit rows of a `unit_table` as one float32 array."""
    values = table["x"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(table.num_rows, -1), dtype=np.float32)
