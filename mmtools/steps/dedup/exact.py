"""Exact duplicates: equal content hash of the media bytes and/or equal normalised caption."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C
from mmtools.errors import DataContractError, UsageError
from mmtools.step import POSITION
from mmtools.steps.dedup.groups import BucketGrouped, same_key_edges, with_bucket

FIELDS = {C.IMAGE: C.IMAGE_SHA256, C.AUDIO: C.AUDIO_SHA256, C.TEXT: None}
_SEP = "\x1f"
KEY = "_key_exact"
DIGEST = "_key_exact_digest"  # in a dedup index: an 8-byte blake2b of the key, in its place


def digests(keys: pa.Array) -> np.ndarray:
    """An 8-byte blake2b of each key (nulls: 0), as uint64: what a dedup index keeps."""
    data = pc.cast(keys, pa.binary()).to_pylist()
    out = b"".join(
        bytes(8) if k is None else hashlib.blake2b(k, digest_size=8).digest() for k in data
    )
    return np.frombuffer(out, np.uint64)


def normalize_text(text: pa.Array) -> pa.Array:
    """Caption key: NFKC, lower case, punctuation and spacing folded; empty becomes null."""
    text = pc.utf8_lower(pc.utf8_normalize(text.cast(pa.string()), "NFKC"))
    text = pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"[^\p{L}\p{N}]+", " "))
    return pc.if_else(pc.equal(text, ""), None, text)


def check_text(schema: pa.Schema, method: str) -> None:
    """Raise a data-contract error unless the text column holds strings."""
    t = schema.field(C.TEXT).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
        raise DataContractError(f"dedup --method {method} needs a string text column, not {t}")


def parse_fields(spec: str, schema: pa.Schema) -> list[str]:
    """`auto`, or `+`-joined fields among image, audio, text, checked against `schema`."""
    if spec == "auto":
        fields = [f for f in (C.IMAGE, C.AUDIO) if f in schema.names or FIELDS[f] in schema.names]
        fields = fields or [C.TEXT]
    else:
        fields = [f.strip() for f in spec.split("+")]
        if bad := [f for f in fields if f not in FIELDS]:
            raise UsageError(f"--exact-key takes image, audio, text or a + of them, not {bad[0]!r}")
    if C.TEXT in fields and C.TEXT in schema.names:
        check_text(schema, "exact")
    for f in fields:
        if f not in schema.names and FIELDS[f] not in schema.names:
            raise DataContractError(
                f"dedup --method exact needs column {f}; the input has {', '.join(schema.names)}"
            )
    return fields


class Exact(BucketGrouped):
    """Rows with equal keys are duplicates."""

    name = "exact"
    bucket_columns = bucket_inputs = (KEY,)

    def __init__(self, spec: str):
        self.spec = spec
        self.fields: list[str] = []
        self.failures: dict[int, tuple[str, str]] = {}
        self._keys: list[pa.Array] = []
        self._stored: list[np.ndarray] = []  # key digests of a dedup index's rows, scanned last
        self.index_from: int | None = None  # where those rows start (`Dedup`)

    def bind(self, schema: pa.Schema) -> list[str]:
        """Resolve the key fields; return the columns pass 1 must read."""
        self.fields = parse_fields(self.spec, schema)
        self._columns = [FIELDS[f] if FIELDS[f] in schema.names else f for f in self.fields]
        for field, column in zip(self.fields, self._columns, strict=True):
            if column == field and field != C.TEXT and schema.field(field).type != C.MEDIA_TYPE:
                raise DataContractError(
                    f"column {field} is {schema.field(field).type}, "
                    "not the {bytes, path} media layout"
                )
        return self._columns

    def keys(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        """One string key per row (null: no key); media bytes are hashed here."""
        parts = [self._part(batch.column(col), col) for col in self._columns]
        key = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, _SEP)
        return {KEY: key}

    def scan(self, keys: pa.RecordBatch, offset: int) -> None:
        """Keep the keys (absent when a groupby on buckets groups them: `set_groups`), or the
        digests of a dedup index's rows."""
        if DIGEST in keys.schema.names:
            self._stored.append(keys.column(DIGEST).to_numpy(zero_copy_only=False))
        elif KEY in keys.schema.names:
            self._keys.append(keys.column(KEY))

    def bucket_rows(self, keys: pa.Table, buckets: int) -> pa.Table:
        """For a groupby on buckets: the rows with a key, bucketed by a hash (blake2b) of it."""
        keys = keys.filter(keys[KEY].is_valid())
        data = pc.cast(keys[KEY], pa.binary()).to_pylist()
        digests = b"".join(hashlib.blake2b(k, digest_size=8).digest() for k in data)
        return with_bucket(keys, np.frombuffer(digests, np.uint64), buckets)

    def bucket_edges(self, bucket: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """For a groupby on buckets: each row of a bucket linked to the first row with its key."""
        codes = bucket[KEY].combine_chunks().dictionary_encode().indices.to_numpy()
        return same_key_edges(codes, bucket[POSITION].to_numpy())

    @staticmethod
    def _part(array: pa.Array, column: str) -> pa.Array:
        if column == C.TEXT:
            return normalize_text(array)
        if column in (C.IMAGE, C.AUDIO):
            data = array.field("bytes").to_pylist()  # one hash per row: bytes must be visited
            return pa.array(
                [None if d is None else hashlib.sha256(d).hexdigest() for d in data], pa.string()
            )
        return array

    def labels(self, active: np.ndarray) -> np.ndarray:
        """Group label per active row: equal keys, equal label; -1 for no key."""
        if (preset := self.preset(active)) is not None:
            return preset
        keys = pa.chunked_array(self._keys, pa.string()).cast(pa.large_string())
        if self._stored:
            return self._labels_with_index(keys, active)
        codes = keys.take(active).combine_chunks().dictionary_encode().indices
        return pc.fill_null(codes, -1).to_numpy().astype(np.int64)

    def _labels_with_index(self, keys: pa.ChunkedArray, active: np.ndarray) -> np.ndarray:
        """Labels when the rows from `index_from` on are a dedup index's, kept as digests:
        this run's rows group by key as without one; a group whose key's digest an index
        row has takes that row in (index rows never group with each other)."""
        stored = np.concatenate(self._stored)
        new, old = active[active < self.index_from], active[active >= self.index_from]
        encoded = keys.take(new).combine_chunks().dictionary_encode()
        codes = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int64)
        seen = digests(encoded.dictionary)
        order = np.argsort(seen, kind="stable")
        at = np.searchsorted(seen[order], stored[old - self.index_from])
        at = np.minimum(at, max(len(seen) - 1, 0))
        hit = (seen[order][at] == stored[old - self.index_from]) if len(seen) else at < 0
        old_codes = np.where(hit, order[at] if len(seen) else -1, -1)
        out = np.empty(len(active), np.int64)
        out[active < self.index_from] = codes
        out[active >= self.index_from] = old_codes
        count = np.bincount(out[out >= 0], minlength=max(len(seen), 1))  # no key: still 1
        return np.where((out >= 0) & (count[np.maximum(out, 0)] > 1), out, -1)

    def index_columns(self, keys: pa.Table) -> dict[str, pa.Array | None]:
        """An index keeps each kept row's key as its 8-byte digest, not the key."""
        found = keys.column(KEY).combine_chunks()
        return {DIGEST: pa.array(digests(found), pa.uint64()), KEY: None}

    def release(self) -> None:
        """Drop the keys."""
        self._keys, self._stored, self._groups = [], [], None
