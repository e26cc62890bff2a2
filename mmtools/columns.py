"""Column names and types of an mmtools dataset: the one place that spells them."""

from __future__ import annotations

import json

import pyarrow as pa

ID = "id"
IMAGE = "image"
AUDIO = "audio"
TEXT = "text"

# Media metadata added by ingest.
WIDTH = "width"
HEIGHT = "height"
IMAGE_FORMAT = "image_format"
IMAGE_NBYTES = "image_nbytes"
IMAGE_SHA256 = "image_sha256"
AUDIO_FORMAT = "audio_format"
AUDIO_NBYTES = "audio_nbytes"
AUDIO_SHA256 = "audio_sha256"
SAMPLE_RATE = "sample_rate"
CHANNELS = "channels"
DURATION = "duration"
SOURCE = "source"
# The source image's size, kept when ingest resizes or re-encodes (img2dataset's names).
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
# Set where a caption file was not UTF-8 and was read with a fallback encoding (e.g. cp1252).
TEXT_ENCODING = "text_encoding"

# Model outputs.
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
AUDIO_EMBEDDING = "audio_embedding"
CLIP_SCORE = "clip_score"
AUDIO_TEXT_SCORE = "audio_text_score"
# A search hit's cosine similarity to the query (`mmtools search -o`).
SIMILARITY = "similarity"

# Provenance.
TEXT_ORIGINAL = "text_original"
TEXT_SYNTHETIC = "text_synthetic"
CAPTION_SOURCE = "caption_source"
MIXUP_PARENTS = "mixup_parents"
MIXUP_LAMBDA = "mixup_lambda"
MIXUP_MODE = "mixup_mode"
DUP_CLUSTER = "dup_cluster"
IS_DUPLICATE = "is_duplicate"
# With dedup --mark, for a duplicate: the method that found it, the id of the row kept in its
# place and how close the two are (DUP_VALUE: as the ledger's `value`); null for other rows.
DUP_METHOD = "dup_method"
DUP_KEPT_ID = "dup_kept_id"
DUP_VALUE = "dup_value"

# Reject rows, written to `_rejects/`.
REJECT_STEP = "step"
REJECT_REASON = "reason"
REJECT_DETAIL = "detail"
REJECT_SOURCE = "source"  # the URL, file path or tar::key the row came from; null if unknown

# Drop ledger rows, written to `_dropped/`: a row a step dropped by a named rule (id, step and
# source as in reject rows), the value that decided (a score, a distance, a similarity; null
# where a rule has none) and, for a duplicate, the id of the row kept instead.
DROP_RULE = "rule"
DROP_VALUE = "value"
DROP_KEPT_ID = "kept_id"

EMBEDDINGS = {"image": IMAGE_EMBEDDING, "text": TEXT_EMBEDDING, "audio": AUDIO_EMBEDDING}
MEDIA = (IMAGE, AUDIO)

MEDIA_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
REJECT_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field(REJECT_STEP, pa.string()),
        pa.field(REJECT_REASON, pa.string()),
        pa.field(REJECT_DETAIL, pa.string()),
        pa.field(REJECT_SOURCE, pa.string()),
    ]
)
LEDGER_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field(REJECT_STEP, pa.string()),
        pa.field(DROP_RULE, pa.string()),
        pa.field(DROP_VALUE, pa.float64()),
        pa.field(DROP_KEPT_ID, pa.string()),
        pa.field(REJECT_SOURCE, pa.string()),
    ]
)
# A listing column that `ingest` keeps under a name of its own is renamed with this prefix.
LISTING_PREFIX = "listing_"

# Parquet key-value metadata key holding per-column provenance (model, parameters).
MMTOOLS_META = b"mmtools"
_HF_META = b"huggingface"


def embedding_type(dim: int, dtype: str = "float16") -> pa.DataType:
    """Arrow type of an embedding column of `dim` values."""
    value = {"float16": pa.float16(), "float32": pa.float32()}[dtype]
    return pa.list_(pa.field("item", value), dim)


def media_array(data: list[bytes | None], paths: list[str | None]) -> pa.StructArray:
    """Build an image/audio column in the Hugging Face `{bytes, path}` layout."""
    return pa.StructArray.from_arrays(
        [pa.array(data, pa.binary()), pa.array(paths, pa.string())], fields=list(MEDIA_TYPE)
    )


def hf_features(schema: pa.Schema) -> dict:
    """Hugging Face `datasets` features for the media columns of `schema`."""
    kinds = {IMAGE: "Image", AUDIO: "Audio"}
    return {
        f.name: {"_type": kinds[f.name]} for f in schema if f.name in kinds and f.type == MEDIA_TYPE
    }


def column_info(schema: pa.Schema) -> dict:
    """The mmtools per-column provenance stored in the schema metadata."""
    raw = (schema.metadata or {}).get(MMTOOLS_META)
    return json.loads(raw) if raw else {}


def with_metadata(schema: pa.Schema, info: dict | None = None) -> pa.Schema:
    """Return `schema` with HF features and mmtools column provenance (merged with `info`)."""
    meta = dict(schema.metadata or {})
    merged = {**column_info(schema), **(info or {})}
    merged = {k: v for k, v in merged.items() if k in schema.names}
    if merged:
        meta[MMTOOLS_META] = json.dumps(merged, sort_keys=True).encode()
    else:
        meta.pop(MMTOOLS_META, None)
    features = hf_features(schema)
    if features:
        meta[_HF_META] = json.dumps({"info": {"features": features}}).encode()
    else:
        meta.pop(_HF_META, None)
    return schema.with_metadata(meta)


def upgrade_rejects(table: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """Reject rows in the current REJECT_SCHEMA; rows written before it had no source get null."""
    if table.schema.equals(REJECT_SCHEMA, check_metadata=False):
        return table
    cols = [
        table.column(f.name).cast(f.type)
        if f.name in table.schema.names
        else pa.nulls(table.num_rows, f.type)
        for f in REJECT_SCHEMA
    ]
    if isinstance(table, pa.RecordBatch):
        return pa.RecordBatch.from_arrays(cols, schema=REJECT_SCHEMA)
    return pa.Table.from_arrays(cols, schema=REJECT_SCHEMA)


def own_names() -> set[str]:
    """Every data column name this module spells (reject and ledger columns aside)."""
    reject = {REJECT_STEP, REJECT_REASON, REJECT_DETAIL, DROP_RULE, DROP_VALUE, DROP_KEPT_ID}
    names = {v for k, v in globals().items() if k.isupper() and isinstance(v, str)}
    return names - reject - {LISTING_PREFIX}


def require_named(schema: pa.Schema, columns: list[str] | tuple[str, ...], option: str) -> None:
    """Raise a usage error (exit 2) when a column the user named in `option` is not in the
    input: the command line is wrong, not the data."""
    from mmtools.errors import UsageError

    missing = [c for c in columns if c not in schema.names]
    if missing:
        has = ", ".join(schema.names)
        raise UsageError(f"{option}: unknown column {', '.join(missing)}; the input has {has}")


def require(schema: pa.Schema, columns: list[str] | tuple[str, ...], step: str) -> None:
    """Raise a data-contract error (exit 3) naming the columns a step needs that the input
    lacks, if any (a column the user named: `require_named`)."""
    from mmtools.errors import DataContractError

    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataContractError(
            f"{step} needs column(s) {', '.join(missing)}; the input has {', '.join(schema.names)}"
        )


# Caption language code (e.g. "en"), where a language-identification step has added it.
LANGUAGE = "language"
