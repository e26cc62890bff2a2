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

# Model outputs.
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
AUDIO_EMBEDDING = "audio_embedding"
CLIP_SCORE = "clip_score"
AUDIO_TEXT_SCORE = "audio_text_score"

# Provenance.
TEXT_ORIGINAL = "text_original"
TEXT_SYNTHETIC = "text_synthetic"
CAPTION_SOURCE = "caption_source"
MIXUP_PARENTS = "mixup_parents"
MIXUP_LAMBDA = "mixup_lambda"
MIXUP_MODE = "mixup_mode"
DUP_CLUSTER = "dup_cluster"
IS_DUPLICATE = "is_duplicate"

# Reject rows, written to `_rejects/`.
REJECT_STEP = "step"
REJECT_REASON = "reason"
REJECT_DETAIL = "detail"

EMBEDDINGS = {"image": IMAGE_EMBEDDING, "text": TEXT_EMBEDDING, "audio": AUDIO_EMBEDDING}
MEDIA = (IMAGE, AUDIO)

MEDIA_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
REJECT_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field(REJECT_STEP, pa.string()),
        pa.field(REJECT_REASON, pa.string()),
        pa.field(REJECT_DETAIL, pa.string()),
    ]
)

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


def require(schema: pa.Schema, columns: list[str] | tuple[str, ...], step: str) -> None:
    """Raise a data-contract error naming the missing columns, if any."""
    from mmtools.errors import DataContractError

    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataContractError(
            f"{step} needs column(s) {', '.join(missing)}; the input has {', '.join(schema.names)}"
        )


# Caption language code (e.g. "en"), where a language-identification step has added it.
LANGUAGE = "language"
