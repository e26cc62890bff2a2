"""Embedding mode: which columns are mixed, how bad vectors are found, and the slerp itself."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import DataContractError, UsageError
from mmtools.steps.mixup.mix import slerp


def check_embedding(schema: pa.Schema, column: str) -> pa.DataType:
    """The type of an embedding column; a data-contract error if it is not one."""
    C.require(schema, [column], "mixup")
    t = schema.field(column).type
    if not (pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)):
        raise DataContractError(
            f"mixup: column {column} is {t}, not an embedding (a fixed-size list of floats)"
        )
    return t


def embedding_specs(schema: pa.Schema, columns: list[str]) -> list[tuple[str, str]]:
    """(first parent's column, partner's column) pairs; the result goes in the first.

    `COL` mixes a column with the same column of the partner; `A:B` mixes the first parent's
    A with the partner's B (cross-modal geodesic mixup). No columns: every embedding column.
    """
    if not columns:
        columns = [c for c in C.EMBEDDINGS.values() if c in schema.names]
        if not columns:
            known = ", ".join(C.EMBEDDINGS.values())
            raise DataContractError(
                f"mixup --mode embedding needs an embedding column ({known}) or --columns; "
                "run mmtools embed first"
            )
    else:
        C.require_named(schema, [c for s in columns for c in s.split(":") if c], "--columns")
    specs = []
    for spec in columns:
        a, _, b = spec.partition(":")
        specs.append((a, b or a))
    outs = [a for a, _ in specs]
    if len(set(outs)) < len(outs):
        raise UsageError(f"--columns writes a column twice: {','.join(columns)}")
    for a, b in specs:
        ta, tb = check_embedding(schema, a), check_embedding(schema, b)
        if ta.list_size != tb.list_size:
            raise DataContractError(
                f"mixup: cannot mix {a} ({ta.list_size} values) with {b} ({tb.list_size})"
            )
    return specs


def default_nearest(schema: pa.Schema, mode: str, specs: list[tuple[str, str]]) -> str:
    """The embedding column `--pairing nearest` searches when none is named."""
    if specs:
        return specs[0][0]
    column = C.AUDIO_EMBEDDING if mode == "audio-text" else C.IMAGE_EMBEDDING
    if column not in schema.names:
        raise DataContractError(
            f"--pairing nearest needs {column} (run mmtools embed first) or nearest:COLUMN"
        )
    return column


def matrix(arr) -> np.ndarray:
    """A fixed-size-list column without nulls as a (rows, dim) float64 array."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return np.asarray(arr.flatten(), np.float64).reshape(len(arr), arr.type.list_size)


def spec_columns(specs: list[tuple[str, str]]) -> list[str]:
    """Every column the specs read, in order, once."""
    return list(dict.fromkeys(c for spec in specs for c in spec))


def embedding_problems(rows, columns: list[str]) -> list[tuple[int, str, str]]:
    """(row, reason, detail) for rows with a null, NaN/inf or all-zero vector in `columns`."""
    found: dict[int, tuple[int, str, str]] = {}
    for column in columns:
        arr = rows.column(column)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        null = np.asarray(arr.is_null(), bool)
        for i in np.flatnonzero(null):
            found.setdefault(int(i), (int(i), "missing_embedding", f"{column} is null"))
        x = matrix(arr.filter(pa.array(~null))) if (~null).any() else np.zeros((0, 1))
        where = np.flatnonzero(~null)
        for i in where[~np.isfinite(x).all(axis=1)]:
            found.setdefault(int(i), (int(i), "nan_embedding", f"{column} holds NaN or inf"))
        for i in where[np.isfinite(x).all(axis=1) & ~np.any(x != 0, axis=1)]:
            found.setdefault(int(i), (int(i), "zero_norm_embedding", f"{column} is all zeros"))
    return sorted(found.values())


def mix_embeddings(firsts, partners, lam: np.ndarray, specs):
    """Slerp each spec's vectors: (pairs made, {column: mixed vectors}, failed first parents)."""
    failed = embedding_problems(firsts, spec_columns(specs))
    ok = np.setdiff1d(np.arange(firsts.num_rows), [f[0] for f in failed]).astype(np.int64)
    values = {}
    for a, b in specs:
        first = matrix(firsts.column(a).take(ok))
        second = matrix(partners.column(b).take(ok))
        mixed = slerp(first, second, lam[ok])
        t = firsts.schema.field(a).type
        flat = pa.array(mixed.astype(t.value_type.to_pandas_dtype()).ravel(), t.value_type)
        values[a] = pa.FixedSizeListArray.from_arrays(flat, t.list_size)
    return ok, values, failed
