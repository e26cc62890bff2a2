"""Who is mixed with whom, and with what weight: decided once, over the sorted ids.

The plan depends only on the set of (id, pairing key) rows and the seed, never on the
input order, the shard layout or the batch size: ids are sorted first, and three
independent random streams (spawned from the seed) pick the first parents, their
partners and the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtools.errors import DataContractError, UsageError, require_module

PAIRINGS = ("random", "nearest", "same")


@dataclass
class Plan:
    """The pairs to mix: first parent (weight `lam`), second parent, weight and new id."""

    first: pa.Array
    second: pa.Array
    lam: np.ndarray
    new_id: pa.Array

    def __len__(self) -> int:
        return len(self.first)


def parse_pairing(spec: str) -> tuple[str, str | None]:
    """'random', 'nearest', 'nearest:COLUMN' or 'same:COLUMN' -> (kind, column)."""
    kind, _, column = spec.partition(":")
    if kind not in PAIRINGS or (kind == "same" and not column) or (kind == "random" and column):
        raise UsageError(
            f"--pairing must be random, nearest, nearest:COLUMN or same:COLUMN, not {spec!r}"
        )
    return kind, column or None


def plan_pairs(
    ids: pa.Array,
    key: pa.Array | None,
    kind: str,
    fraction: float,
    alpha: float,
    lam: float | None,
    seed: int,
) -> Plan:
    """Choose `round(fraction * eligible)` first parents, a partner for each, and λ."""
    order = pc.sort_indices(ids)
    ids = ids.take(order)
    _check_ids(ids)
    key = key.take(order) if key is not None else None
    pick, partner, draw = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    eligible, choose = _pairing(kind, key, len(ids), partner)
    n = len(eligible)
    m = int(np.floor(fraction * n + 0.5)) if n >= 2 else 0
    first = np.sort(pick.permutation(n)[:m])
    second = choose(first)
    if lam is None:
        lams = draw.beta(alpha, alpha, m).astype(np.float32)
    else:
        lams = np.full(m, lam, np.float32)
    a, b = ids.take(eligible[first]), ids.take(eligible[second])
    return Plan(a, b, lams, _new_ids(a, b, ids))


def _check_ids(ids: pa.Array) -> None:
    if ids.null_count:
        raise DataContractError(f"{ids.null_count} row(s) have no id; mixup pairs rows by id")
    if len(ids) > 1:
        same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
        if pc.any(same).as_py():
            dup = ids[int(pc.index(same, True).as_py())].as_py()
            raise DataContractError(f"id {dup!r} occurs more than once; mixup pairs rows by id")


def _pairing(kind: str, key, n_rows: int, rng):
    """Rows (sorted positions) that can be paired, and a function choosing their partners.

    Both the chosen first parents and the partners are positions in the eligible rows.
    """
    if kind == "random":
        return np.arange(n_rows), lambda first: _other(first, n_rows, rng)
    if kind == "same":
        return _same_group(key, rng)
    return _nearest(key)


def _other(position: np.ndarray, size, rng) -> np.ndarray:
    """A uniform pick among the `size - 1` other members of a group, by position in it."""
    r = rng.integers(0, np.asarray(size) - 1, size=len(position))
    return r + (r >= position)


def _same_group(key: pa.Array, rng):
    valid = np.flatnonzero(~np.asarray(key.is_null(), bool))
    table = pa.table({"g": key.take(valid), "i": np.arange(len(valid))})
    try:
        order = np.asarray(pc.sort_indices(table, [("g", "ascending"), ("i", "ascending")]))
    except pa.ArrowNotImplementedError:
        raise UsageError(f"cannot group rows by a column of type {key.type}") from None
    groups = table.column("g").take(order)
    change = pc.not_equal(groups.slice(1), groups.slice(0, max(len(groups) - 1, 0)))
    starts = np.flatnonzero(np.concatenate([[True], np.asarray(change, bool)]))[: len(groups)]
    sizes = np.diff(np.append(starts, len(groups)))
    # A row alone in its group has no partner: keep groups of two or more.
    grouped = order[np.repeat(sizes >= 2, sizes)]  # positions in `valid`, group by group
    sizes = sizes[sizes >= 2]
    start_of = np.repeat(np.cumsum(sizes) - sizes, sizes)
    size_of = np.repeat(sizes, sizes)
    eligible = np.sort(grouped)
    where = np.empty(len(grouped), np.int64)  # eligible position -> grouped position
    where[np.searchsorted(eligible, grouped)] = np.arange(len(grouped))

    def choose(first: np.ndarray) -> np.ndarray:
        g = where[first]
        pick = start_of[g] + _other(g - start_of[g], size_of[g], rng)
        return np.searchsorted(eligible, grouped[pick])

    return valid[eligible], choose


def _nearest(key: pa.Array):
    faiss = require_module("faiss", "dedup")
    x, valid = embedding_matrix(key)
    x = np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)

    def choose(first: np.ndarray) -> np.ndarray:
        if not len(first):
            return first
        _, hits = index.search(x[first], 2)
        # Usually the row itself comes first; with exact duplicates it may come second.
        return np.where(hits[:, 0] == first, hits[:, 1], hits[:, 0])

    return valid, choose


def embedding_matrix(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a fixed-size-list column that are usable (non-null, finite, non-zero), and where."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    valid = np.flatnonzero(~np.asarray(arr.is_null(), bool))
    sub = arr.take(valid)
    x = np.asarray(sub.flatten(), np.float32).reshape(len(valid), arr.type.list_size)
    good = np.isfinite(x).all(axis=1) & (np.abs(x).sum(axis=1) > 0)
    return x[good], valid[good]


def _new_ids(a: pa.Array, b: pa.Array, existing: pa.Array) -> pa.Array:
    """`mixup:<first>+<second>`, with `#2`, `#3`... where that id is already taken."""
    new = pc.binary_join_element_wise("mixup:", a, "+", b, "")
    clash = pc.is_in(new, value_set=existing)
    if not pc.any(clash).as_py():
        return new
    taken = set(existing.to_pylist()) | set(new.to_pylist())
    out = new.to_pylist()
    for i in np.flatnonzero(np.asarray(clash, bool)):
        k = 2
        while f"{out[i]}#{k}" in taken:
            k += 1
        out[i] = f"{out[i]}#{k}"
        taken.add(out[i])
    return pa.array(out, pa.string())
