"""`TopFraction`: keep the best rows of the whole input by one numeric column, exactly."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.step import GlobalStep, Result


@dataclass
class TopFractionConfig:
    """Keep the `fraction` (or `k`) rows with the highest `by`; ties go to the smaller id."""

    by: str
    fraction: float | None = None
    k: int | None = None


def _keys(array) -> np.ndarray:
    """A numeric key column as float64; null, NaN and +-inf as NaN (they rank last)."""
    keys = pc.fill_null(array.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    return np.where(np.isfinite(keys), keys, np.nan)


KEY = "_key"  # pass 1's key column


class TopFraction(GlobalStep):
    """Keep the best rows of the whole input by one column, exactly, in two passes.

    Pass 1 holds only the key column (8 bytes a row) and the ids; between the passes the
    k-th best (key, id) pair becomes the cut, ordered by key descending, then id ascending.
    Pass 2 keeps a row when key > cut key, or key == cut key and id <= cut id, so it needs
    no state and a resumed run keeps exactly the same rows.
    """

    name = "top_fraction"
    light = True

    def __init__(self, config: TopFractionConfig):
        super().__init__(config)
        self.scan_columns = (C.ID, config.by)
        self.requires = (C.ID, config.by)
        self._keys: list[np.ndarray] = []
        self._ids: list[pa.Array] = []
        self._cut: tuple | None = None  # (key or None for the null keys, id), "all" or "none"

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The input schema; the key column must exist and be numeric."""
        by = self.config.by
        if by not in schema.names:
            raise UsageError(f"--by {by}: unknown column; the input has {', '.join(schema.names)}")
        kind = schema.field(by).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise UsageError(f"--by {by} must be a numeric column, not {kind}")
        C.require(schema, (C.ID,), self.name)
        return schema

    def wanted(self, n: int) -> int:
        """How many of `n` rows to keep: floor(fraction × n) or k."""
        if self.config.k is not None:
            return min(self.config.k, n)
        return int(Fraction(str(self.config.fraction)) * n)

    def keys(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The ids and the keys as float64, -inf where a key is null, NaN or infinite."""
        key = _keys(batch.column(self.config.by))
        ranked = np.where(np.isnan(key), -np.inf, key)
        return pa.record_batch([batch.column(C.ID), pa.array(ranked)], names=[C.ID, KEY])

    def scan(self, batch: pa.RecordBatch) -> None:
        """Pass 1: remember the keys and ids."""
        key = batch.column(KEY).to_numpy(zero_copy_only=False)
        self._keys.append(np.where(np.isneginf(key), np.nan, key))
        self._ids.append(batch.column(C.ID))

    def sort_order(self) -> list[tuple[str, str]]:
        """The best rows first: key descending, then id ascending (null keys are -inf)."""
        return [(KEY, "descending"), (C.ID, "ascending")]

    def set_cut(self, n: int, last: dict | None) -> None:
        """The cut from the k-th best (key, id) row of `n` (`last`, a row of `keys`), as a
        distributed sort finds it; no row when all or none are kept."""
        if last is None:
            self._cut = "none" if self.wanted(n) == 0 else "all"
        else:
            t = last[KEY]
            self._cut = (None if t == -np.inf else t, last[C.ID])

    def finish_scan(self) -> None:
        """Find the cut: the k-th best (key, id) pair."""
        keys = np.concatenate(self._keys) if self._keys else np.empty(0)
        ids = pa.chunked_array(self._ids, pa.string())
        self._keys, self._ids = [], []
        n, k = len(keys), self.wanted(len(keys))
        if k in (0, n):
            self._cut = "none" if k == 0 else "all"
            return
        valid = ~np.isnan(keys)
        n_valid = int(valid.sum())
        if k <= n_valid:
            t = float(np.partition(keys[valid], n_valid - k)[n_valid - k])
            tied, m = keys == t, k - int((keys > t).sum())
        else:
            t, tied, m = None, ~valid, k - n_valid
        tied_ids = ids.filter(pa.array(tied))
        self._cut = (t, tied_ids[pc.sort_indices(tied_ids)[m - 1].as_py()].as_py())

    def keep(self, batch: pa.RecordBatch) -> np.ndarray:
        """Pass 2: which rows of `batch` are among the best."""
        if self._cut is None:
            raise RuntimeError("TopFraction.keep() before finish_scan()")
        if isinstance(self._cut, str):
            return np.full(batch.num_rows, self._cut == "all")
        t, cut_id = self._cut
        key = _keys(batch.column(self.config.by))
        id_ok = pc.fill_null(pc.less_equal(batch.column(C.ID), cut_id), False).to_numpy(
            zero_copy_only=False
        )
        if t is None:
            return ~np.isnan(key) | id_ok
        return (key > t) | ((key == t) & id_ok)

    def measure(self, batch: pa.RecordBatch, ledger: bool) -> np.ndarray | None:
        """The key of each row of `batch` for the ledger (NaN: none); None without `ledger`."""
        return _keys(batch.column(self.config.by)) if ledger else None

    def process(self, batch: pa.RecordBatch) -> Result:
        """Keep the rows above the cut."""
        keep = self.keep(batch)
        drops = self.drop_rows(batch, ~keep, self.name, self.measure(batch, self.ledger))
        return Result(
            batch.filter(pa.array(keep)), dropped={self.name: int((~keep).sum())}, drops=drops
        )
