"""What each dedup method (exact, phash, minhash, semantic) implements for `Dedup`."""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np
import pyarrow as pa

from mmtools.step import Bucketed


class DedupMethod(Bucketed, Protocol):
    """One way of finding duplicate groups, run by `Dedup` between its passes.

    `bind` checks the input schema and names the columns pass 1 reads; `keys` turns a batch
    of them into small keys (hashes, captions, embeddings) wherever the batch is; `scan`
    keeps the keys in input order; `labels` groups the rows still kept by the previous
    methods; `release` drops the keys. Rows whose keys cannot be made are `failures`
    (position -> (reason, detail)), rejected by `Dedup`. A method also offers its groups
    to a groupby on buckets (`Bucketed`), as `BucketGrouped` does by default.
    """

    name: ClassVar[str]
    failures: dict[int, tuple[str, str]]
    light: ClassVar[bool]  # its keys come from column values, not decoded media (`Step.light`)

    def bind(self, schema: pa.Schema) -> list[str]:
        """Check the input schema; return the columns pass 1 must read."""
        ...

    def keys(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        """The key columns of `batch` (a pure function of it)."""
        ...

    def scan(self, keys: pa.RecordBatch, offset: int) -> None:
        """Keep the keys of the rows starting at input position `offset`."""
        ...

    def labels(self, active: np.ndarray) -> np.ndarray:
        """Group label per `active` row (input positions); -1 for a row in no group."""
        ...

    def release(self) -> None:
        """Drop the keys (and any groups set by `set_groups`)."""
        ...
