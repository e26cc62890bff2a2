"""Grouping helpers shared by the dedup methods: equal-key pairs, components, the keep rule."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtools.errors import UsageError
from mmtools.step import BUCKET, POSITION

KEEP_MODES = ("first", "highest", "lowest")


def parse_keep(spec: str) -> tuple[str, str | None]:
    """`first`, `highest:COLUMN` or `lowest:COLUMN` -> (mode, column)."""
    mode, _, column = spec.partition(":")
    if mode == "first" and not column:
        return mode, None
    if mode in ("highest", "lowest") and column:
        return mode, column
    raise UsageError(f"--keep must be 'first', 'highest:COLUMN' or 'lowest:COLUMN', not {spec!r}")


def priority(ids: pa.ChunkedArray, values: pa.ChunkedArray | None, mode: str) -> np.ndarray:
    """Rank of every row under the keep rule (0 = kept first); ties by id, then position."""
    n = len(ids)
    position = np.arange(n, dtype=np.int64)
    if mode == "first":
        return position
    if pa.types.is_floating(values.type):
        values = pc.if_else(pc.is_nan(values), None, values)  # NaN ranks with the nulls, last
    order = "descending" if mode == "highest" else "ascending"
    value_rank = pc.rank(values, sort_keys=order, tiebreaker="dense").to_numpy()
    id_rank = pc.rank(ids, tiebreaker="dense").to_numpy()
    ranked = np.lexsort((position, id_rank, value_rank))
    prio = np.empty(n, dtype=np.int64)
    prio[ranked] = position
    return prio


def equal_key_pairs(keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield slabs (i, j) of all index pairs whose keys are equal, without comparing all pairs.

    Sorting puts equal keys in runs; slab g pairs each run member with the one g places on,
    so a slab holds at most len(keys) pairs however large a run is.
    """
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    start = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    length = np.diff(np.r_[start, len(sk)])
    start, length = start[length > 1], length[length > 1]
    gap = 1
    while len(start):
        count = length - gap
        within = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        first = np.repeat(start, count) + within
        yield order[first], order[first + gap]
        gap += 1
        start, length = start[length > gap], length[length > gap]


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label of each of `n` nodes given edges (i, j)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(i) == 0:
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def edge_labels(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Component labels of `n` nodes, -1 for a node without any edge."""
    i = np.concatenate([e[0] for e in edges]) if edges else np.empty(0, np.int64)
    j = np.concatenate([e[1] for e in edges]) if edges else np.empty(0, np.int64)
    labels = components(n, i, j)
    linked = np.zeros(n, dtype=bool)
    linked[i] = linked[j] = True
    return np.where(linked, labels, -1)


def spanning_edges(i: np.ndarray, j: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fewer edges with the same components: each linked node to its component's first node."""
    labels = components(n, i, j)
    nodes = np.unique(np.r_[i, j])
    first = np.full(n, n, dtype=np.int64)
    np.minimum.at(first, labels[nodes], nodes)
    root = first[labels[nodes]]
    return nodes[nodes != root], root[nodes != root]


class BucketGrouped:
    """Defaults of a method whose groups a groupby on buckets may find (`mmtools.step.Bucketed`)
    when it comes first: an engine that spreads pass 1 then hands the driver only the labels
    (`set_groups`).

    Key rows become bucket rows that carry a BUCKET, the same for all rows whose keys may
    make them duplicates (`bucket_rows`); the groupby brings each bucket to one call of
    `bucket_edges`, which finds its duplicate edges with the local method's vectorised code.
    """

    bucket_columns: tuple[str, ...] = ()  # key columns the driver then does not need
    light = True  # keys from column values (`Step.light`); False where media are decoded
    # With a dedup index: the model it keeps (set by `Dedup`), the one this run fitted for it
    # (staged with the run's keys), and whether the method's keys depend on one.
    index_model = None
    fitted_model: dict[str, np.ndarray] | None = None
    modelled = False
    bucket_inputs: tuple[str, ...] = ()  # columns `bucket_rows` reads
    _groups: np.ndarray | None = None

    def bucket_rows(self, keys: pa.Table, buckets: int) -> pa.Table:
        """Rows for the groupby, from key rows: each with its position and BUCKET."""
        raise NotImplementedError

    def bucket_edges(self, bucket: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """The duplicate edges (input positions) among the rows of one bucket."""
        raise NotImplementedError

    def fanout(self) -> int:
        """Rows `bucket_rows` makes per key row (hash chunks, LSH bands)."""
        return 1

    def index_columns(self, keys: pa.Table) -> dict[str, pa.Array | None]:
        """Columns a dedup index keeps beside (or, None, instead of) the key rows `keys` of
        the kept rows, so that later runs need not recompute them (MinHash's LSH band codes)
        or load more than they need (exact keys as digests); none by default."""
        return {}

    def sample_rate(self) -> float | None:
        """No model to fit before bucketing."""
        return None

    def sample_rows(self, keys: pa.Table, rate: float) -> pa.Table:
        """No model, no sample."""
        raise NotImplementedError

    def fit(self, sample: pa.Table | None) -> None:
        """No model to fit."""

    def set_groups(self, n: int, positions: np.ndarray, labels: np.ndarray) -> None:
        """The rows in groups of two or more, with their group labels; the rest: none (-1)."""
        self._groups = np.full(n, -1, dtype=np.int64)
        self._groups[positions] = labels

    def preset(self, active: np.ndarray) -> np.ndarray | None:
        """The labels of `active` rows set by `set_groups`, or None."""
        return None if self._groups is None else self._groups[active]

    # -- how close a duplicate is to the row kept instead (the ledger, --mark) ---------------

    values_wanted: bool = False  # set by `Dedup`: `values` will be asked for
    _members: pa.Table | None = None

    def values(self, dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """How close each dropped row is to the row kept instead (input positions): a
        distance or a similarity, as the method measures it; NaN where it measures none."""
        return np.full(len(dropped), np.nan)

    def member_columns(self) -> tuple[str, ...]:
        """Key columns `values` needs of the rows in groups, when a groupby on buckets found
        the groups (its keys then are not here): the engine hands them to `set_members`."""
        return ()

    def set_members(self, rows: pa.Table) -> None:
        """The `member_columns` of the rows in groups, each with its POSITION."""
        self._members = rows.sort_by(POSITION)

    def member_keys(self, column: str, positions: np.ndarray) -> pa.Array | None:
        """`column` of the rows in groups at `positions` (from `set_members`), or None."""
        if self._members is None:
            return None
        at = np.searchsorted(self._members[POSITION].to_numpy(), positions)
        return self._members[column].combine_chunks().take(pa.array(at, pa.int64()))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's mixing of uint64 values: well-spread hashes, the same on every machine."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def with_bucket(rows: pa.Table, key: np.ndarray, buckets: int) -> pa.Table:
    """`rows` with a BUCKET column: their uint64 `key` (equal keys, equal bucket) hashed."""
    bucket = (mix64(key) % np.uint64(buckets)).astype(np.int64)
    return rows.append_column(BUCKET, pa.array(bucket, pa.int64()))


def same_key_edges(codes: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges linking each row to the first row (by position) with the same code."""
    if len(codes) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = np.lexsort((pos, codes))
    run_start = np.r_[True, codes[order][1:] != codes[order][:-1]]
    head = order[np.maximum.accumulate(np.where(run_start, np.arange(len(order)), 0))]
    return pos[head[~run_start]], pos[order[~run_start]]


def position_components(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows (input positions) that edges (i, j) link and a component label for each."""
    nodes = np.unique(np.r_[i, j]).astype(np.int64)
    labels = components(len(nodes), np.searchsorted(nodes, i), np.searchsorted(nodes, j))
    return nodes, labels


@dataclass
class Grouping:
    """What the keep rule made of one method's groups."""

    drop: np.ndarray  # bool per row: a duplicate of a better row in its group
    members: np.ndarray  # rows in a group of two or more
    keepers: np.ndarray  # the row kept from each member's group
    groups: int  # number of groups of two or more
    keeper: np.ndarray  # per row: the row kept from its group (-1 for a row in none)


def keep_best(labels: np.ndarray, prio: np.ndarray) -> Grouping:
    """Within each group of equal label (>= 0), keep the row of lowest `prio`, drop the rest."""
    idx = np.flatnonzero(labels >= 0)
    order = idx[np.lexsort((prio[idx], labels[idx]))]
    lab = labels[order]
    start = np.r_[True, lab[1:] != lab[:-1]] if len(lab) else np.zeros(0, bool)
    run = np.cumsum(start) - 1
    size = np.bincount(run) if len(run) else np.zeros(0, np.int64)
    grouped = size[run] > 1 if len(run) else np.zeros(0, bool)
    drop = np.zeros(len(labels), dtype=bool)
    drop[order[~start]] = True
    keepers = order[start][run]
    keeper = np.full(len(labels), -1, dtype=np.int64)
    keeper[order] = keepers
    return Grouping(drop, order[grouped], keepers[grouped], int((size > 1).sum()), keeper)


def cluster_ids(n: int, members: np.ndarray, keepers: np.ndarray) -> np.ndarray:
    """Dense cluster id per row (-1 if in none), numbered by each cluster's first row."""
    labels = edge_labels(n, [(members, keepers)])
    out = np.full(n, -1, dtype=np.int64)
    linked = np.flatnonzero(labels >= 0)
    if len(linked):
        # `linked` is ascending, so np.unique's first index is each cluster's first row.
        uniq, first = np.unique(labels[linked], return_index=True)
        rank = np.empty(len(uniq), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
        out[linked] = rank[np.searchsorted(uniq, labels[linked])]
    return out
