"""A few rows of a dataset by position, reading only the Parquet row groups that hold them."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmtools.errors import DataContractError
from mmtools.io.fs import locate


def take_rows(path: str, rows: Sequence[int], columns: list[str] | None = None) -> pa.Table:
    """The rows at positions `rows` of one Parquet file, in the order given."""
    fs, inner = locate(path)
    try:
        pf = pq.ParquetFile(inner, filesystem=fs)
        starts = [0]
        for i in range(pf.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(i).num_rows)
        if any(r < 0 or r >= starts[-1] for r in rows):
            raise DataContractError(f"{path} has {starts[-1]} rows; asked for row {max(rows)}")
        groups = sorted({bisect.bisect_right(starts, r) - 1 for r in rows})
        table = pf.read_row_groups(groups, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DataContractError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    # Where each wanted row lands in the concatenation of the groups read.
    offset, base = {}, 0
    for g in groups:
        offset[g] = base
        base += starts[g + 1] - starts[g]

    def local(r: int) -> int:
        g = bisect.bisect_right(starts, r) - 1
        return offset[g] + r - starts[g]

    return table.take(pa.array([local(r) for r in rows], pa.int64())).replace_schema_metadata(None)


def take_positions(source, positions: Sequence[int], columns: list[str] | None = None) -> pa.Table:
    """The rows at input positions `positions` of a `Source` (across its files, or from its
    stream, which is spooled first), in the order given."""
    if columns is not None:
        columns = [c for c in source.schema.names if c in columns]
    schema = (
        source.schema if columns is None else pa.schema([source.schema.field(c) for c in columns])
    )
    schema = schema.remove_metadata()
    if not len(positions):
        return schema.empty_table()
    if source.shards is None:
        return _scan(source, positions, columns, schema)
    bounds = np.cumsum([0] + [s.rows for s in source.shards])
    pos = np.asarray(positions, dtype=np.int64)
    shard = np.searchsorted(bounds, pos, side="right") - 1
    pieces, order = [], []
    for k in np.unique(shard):
        at = np.flatnonzero(shard == k)
        pieces.append(take_rows(source.shards[k].path, (pos[at] - bounds[k]).tolist(), columns))
        order.append(at)
    table = pa.concat_tables(pieces)
    inverse = np.empty(len(pos), dtype=np.int64)
    inverse[np.concatenate(order)] = np.arange(len(pos))
    return table.take(pa.array(inverse))


def _scan(source, positions: Sequence[int], columns, schema: pa.Schema) -> pa.Table:
    """A stream has no random access: spool it, then pick the rows in one pass."""
    source.spool()
    wanted = np.asarray(positions, dtype=np.int64)
    order = np.argsort(wanted, kind="stable")
    found, start, i = [], 0, 0
    for batch in source.batches(columns=columns, batch_size=8192):
        end = start + batch.num_rows
        j = i
        while j < len(order) and wanted[order[j]] < end:
            j += 1
        if j > i:
            found.append(batch.take(pa.array(wanted[order[i:j]] - start)))
        i, start = j, end
        if i == len(order):
            break
    table = pa.Table.from_batches(found, schema) if found else schema.empty_table()
    if table.num_rows != len(wanted):
        raise DataContractError(f"the input has fewer rows than position {int(wanted.max())}")
    inverse = np.empty(len(wanted), dtype=np.int64)
    inverse[order] = np.arange(len(wanted))
    return table.take(pa.array(inverse))


def schema_of(path: str) -> pa.Schema:
    """The schema of one Parquet file (its footer only)."""
    fs, inner = locate(path)
    try:
        return pq.read_schema(inner, filesystem=fs)
    except (pa.ArrowException, OSError) as e:
        raise DataContractError(f"cannot read {path}: {' '.join(str(e).split())}") from None
