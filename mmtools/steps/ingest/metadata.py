"""Columns from what a sample carries besides its media and caption: a WebDataset sample's
`.json` and `.npy` members, a folder sample's `.json` sidecar, an mmtools export's record of
its columns' types.

An mmtools export (`mmtools export`, with `_export.json` beside its files) is read back as
the dataset it came from: ids from its `id` field, the columns ingest writes itself measured
anew, every other column with its exported type.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa

from mmtools import columns as C
from mmtools.io.layout import EXPORT_MANIFEST
from mmtools.io.manifest import schema_from_text

# Columns ingest writes itself; a listing's column of one of these names is kept as
# listing_<name> (LAION's `width` is the original image's, not the one ingest measures).
INGESTED = frozenset(
    {
        C.ID,
        C.IMAGE,
        C.AUDIO,
        C.TEXT,
        C.SOURCE,
        C.TEXT_ENCODING,
        C.WIDTH,
        C.HEIGHT,
        C.IMAGE_FORMAT,
        C.IMAGE_NBYTES,
        C.IMAGE_SHA256,
        C.ORIGINAL_WIDTH,
        C.ORIGINAL_HEIGHT,
        C.SAMPLE_RATE,
        C.CHANNELS,
        C.DURATION,
        C.AUDIO_FORMAT,
        C.AUDIO_NBYTES,
        C.AUDIO_SHA256,
    }
)
CAPTION_FIELDS = ("caption", C.TEXT)  # a sample .json's caption, when it has no .txt


def export_schema(directory: str) -> pa.Schema | None:
    """The schema of the dataset that the mmtools export in `directory` came from (with its
    columns' provenance), or None when `directory` holds no export."""
    try:
        with open(os.path.join(directory, EXPORT_MANIFEST)) as f:
            manifest = json.load(f)
        return schema_from_text(manifest["arrow_schema"])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None


def restored(listing: pa.Table, names: dict[str, str], schema: pa.Schema | None) -> pa.Table:
    """`listing` with the provenance (model, checkpoint, ...) that the export's `schema`
    recorded for the restored columns (`names`: exported name -> output name)."""
    info = C.column_info(schema) if schema is not None else {}
    kept = {out: info[name] for name, out in names.items() if name in info}
    if not kept:
        return listing
    meta = {C.MMTOOLS_META: json.dumps(kept, sort_keys=True).encode()}
    return listing.replace_schema_metadata(meta)


def merged_provenance(tables: list[pa.Table]) -> dict[bytes, bytes]:
    """The restored columns' provenance of several listings, as one schema metadata."""
    info: dict = {}
    for t in tables:
        info.update(C.column_info(t.schema))
    return {C.MMTOOLS_META: json.dumps(info, sort_keys=True).encode()} if info else {}


def sample_columns(samples: list[dict | None], skip: set[str]) -> dict[str, pa.Array]:
    """One column per field of the samples' metadata (null where a sample lacks it), in the
    order fields first appear; `skip`: fields that are not columns."""
    names = dict.fromkeys(k for s in samples if s for k in s if k not in skip)
    return {n: to_array([s.get(n) if s else None for s in samples]) for n in names}


def to_array(values: list) -> pa.Array:
    """JSON values (or numpy arrays from .npy members) as an Arrow array; values of mixed
    shapes are kept as their JSON text."""
    import numpy as np

    if any(isinstance(v, np.ndarray) for v in values):
        return _vectors(values)
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        arr = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    return arr.cast(pa.string()) if pa.types.is_null(arr.type) else arr


def _vectors(values: list) -> pa.Array:
    """.npy arrays as a fixed-size list of their dtype (a variable list if lengths differ)."""
    import numpy as np

    arrays = [None if v is None else np.ravel(v) for v in values]
    lengths = {len(a) for a in arrays if a is not None}
    dtype = next(a.dtype for a in arrays if a is not None)
    inner = pa.from_numpy_dtype(dtype)
    flat = pa.array([a.tolist() if a is not None else None for a in arrays], pa.list_(inner))
    if len(lengths) == 1:
        return flat.cast(pa.list_(inner, lengths.pop()))
    return flat


def conform(name: str, arr: pa.Array, schema: pa.Schema | None) -> pa.Array:
    """A restored column with the type an export's `schema` gives it; an embedding column that
    arrived as a JSON list of numbers becomes a fixed-size list of float32."""
    wanted = schema.field(name).type if schema is not None and name in schema.names else None
    listed = pa.types.is_list(arr.type) and _numeric(arr.type.value_type)
    if wanted is None and name in C.EMBEDDINGS.values() and listed:
        lengths = {n for n in arr.value_lengths().to_pylist() if n is not None}
        if len(lengths) == 1:
            wanted = pa.list_(pa.float32(), lengths.pop())
    if wanted is None or wanted == arr.type:
        return arr
    try:
        return arr.cast(wanted)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return arr


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)
