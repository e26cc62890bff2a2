"""Perceptual duplicates: pHash (imagehash) within a Hamming radius, by multi-index hashing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import DataContractError, require_module
from mmtools.media import DEFAULT_MAX_PIXELS, MediaError, cells, decode_image, read
from mmtools.step import POSITION
from mmtools.steps.dedup.groups import (
    BucketGrouped,
    components,
    edge_labels,
    equal_key_pairs,
    mix64,
    same_key_edges,
    with_bucket,
)

BITS = 64
KEY, ERROR = "_key_phash", "_key_phash_error"
MIRROR = "_key_phash_mirror"  # the pHash of the image mirrored left to right (--phash-flip)
_SEP = "\x1f"  # between reason and detail in ERROR


def image_phash(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """imagehash's pHash of the decoded image, as an unsigned 64-bit integer."""
    imagehash = require_module("imagehash", "dedup")
    bits = imagehash.phash(decode_image(data, max_pixels)).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _as_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def image_phashes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The pHash of the decoded image and of its mirror image (flipped left to right)."""
    imagehash = require_module("imagehash", "dedup")
    from PIL import ImageOps

    image = decode_image(data, max_pixels)
    return (
        _as_int(imagehash.phash(image).hash),
        _as_int(imagehash.phash(ImageOps.mirror(image)).hash),
    )


def popcount(v: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(v)
    return np.unpackbits(v.view(np.uint8)).reshape(len(v), BITS).sum(axis=1)


def chunk_masks(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of the max_distance + 1 bit chunks the hash is split into."""
    parts = min(max_distance + 1, BITS)
    widths = [BITS // parts + (i < BITS % parts) for i in range(parts)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, (1 << w) - 1))
        shift += w
    return out


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) of `hashes` within `max_distance` bits, without all-pairs work.

    Split into max_distance + 1 chunks, two hashes that close agree on at least one chunk
    (pigeonhole), so candidates are pairs sharing a chunk value, each checked by popcount.
    """
    hashes = hashes.astype(np.uint64)
    found_i, found_j = [], []
    for shift, mask in chunk_masks(max_distance):
        chunk = (hashes >> np.uint64(shift)) & np.uint64(mask)
        for a, b in equal_key_pairs(chunk):
            close = popcount(hashes[a] ^ hashes[b]) <= max_distance
            a, b = a[close], b[close]
            found_i.append(np.minimum(a, b))
            found_j.append(np.maximum(a, b))
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    pairs = np.unique(np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1), axis=0)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


CROSS_PARTS = 4  # chunks of 16 bits for pairs between a run's hashes and an index's
_SLAB = 1024  # a run's hashes probed at a time


def _masks(width: int, radius: int) -> np.ndarray:
    """Every `width`-bit value with at most `radius` bits set."""
    from itertools import combinations

    out = [0]
    for k in range(1, radius + 1):
        out += [sum(1 << b for b in bits) for bits in combinations(range(width), k)]
    return np.array(out, np.int64)


def cross_pairs(new: np.ndarray, old: np.ndarray, max_distance: int):
    """All pairs (i into `new`, j into `old`) of hashes within `max_distance` bits, without
    pairing `old` with itself. The hash is split in 4 chunks of 16 bits; two hashes that
    close are within max_distance // 4 bits on one chunk (pigeonhole), so each new chunk
    value probes a table of the old chunk values at every pattern of that many bits. The
    probes do not grow with len(old); the candidates grow with len(old) / 2**16. (Chunks of
    21-22 bits make fewer candidates but many more probes: slower up to 600k old hashes.)"""
    parts = CROSS_PARTS
    widths = [BITS // parts + (i < BITS % parts) for i in range(parts)]
    found, shift = [], 0
    for width in widths:
        masks = _masks(width, max_distance // parts)
        low, at = np.uint64((1 << width) - 1), np.uint64(shift)
        shift += width
        oc = ((old >> at) & low).astype(np.int64)
        # Chunk values of 16 bits or fewer sort by radix, in linear time.
        order = np.argsort(oc.astype(np.uint16) if width <= 16 else oc, kind="stable")
        # Where each chunk value starts among the sorted old rows, and how many have it: a
        # probe is two lookups, not a search.
        have = np.bincount(oc, minlength=1 << width)
        first = np.cumsum(have) - have
        nc = ((new >> at) & low).astype(np.int64)
        for start in range(0, len(new), _SLAB):
            part = nc[start : start + _SLAB]
            probes = (part[:, None] ^ masks[None, :]).ravel()
            count = have[probes]
            hit = np.flatnonzero(count)
            if not len(hit):
                continue
            lo, count = first[probes[hit]], count[hit]
            who = np.repeat(start + hit // len(masks), count)
            within = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
            j = order[np.repeat(lo, count) + within]
            close = popcount(new[who] ^ old[j]) <= max_distance
            found.append(who[close] * len(old) + j[close])
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    pairs = np.unique(np.concatenate(found))
    return pairs // len(old), pairs % len(old)


def chunk_edges(h: np.ndarray, value: np.ndarray, pos: np.ndarray, max_distance: int):
    """Edges (pos, pos) among rows hashed `h` whose chunk of one index is `value`: equal
    hashes to their first row, distinct hashes sharing a chunk value within the radius."""
    uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    same_i, same_j = same_key_edges(inverse, pos)
    found_i, found_j = [same_i], [same_j]
    for a, b in equal_key_pairs(value[first]):
        close = popcount(uniq[a] ^ uniq[b]) <= max_distance
        found_i.append(pos[first[a[close]]])
        found_j.append(pos[first[b[close]]])
    return np.concatenate(found_i), np.concatenate(found_j)


class PHash(BucketGrouped):
    """Images whose pHashes differ in at most `max_distance` bits are duplicates.

    With `flip`, each image also has the pHash of its mirror image, and both are indexed as
    entries of their row: two rows are duplicates when any hash of one is within the radius
    of any hash of the other (so an image and its left-right flip match). A canonical
    min(hash, mirror) would not do: two images one bit apart may pick different sides.
    """

    name = "phash"
    light = False  # each key decodes an image

    def __init__(self, max_distance: int, max_pixels: int = DEFAULT_MAX_PIXELS, flip: bool = False):
        self.max_distance = max_distance
        self.max_pixels = max_pixels
        self.flip = flip
        self.hash_columns = (KEY, MIRROR) if flip else (KEY,)
        self.bucket_columns = self.hash_columns
        self.bucket_inputs = (*self.hash_columns, ERROR)
        self.failures: dict[int, tuple[str, str]] = {}
        self._hashes: list[np.ndarray] = []
        self._mirrors: list[np.ndarray] = []
        self.index_from: int | None = None  # where a dedup index's rows start (`Dedup`)

    def bind(self, schema: pa.Schema) -> list[str]:
        """Check the image column; return the columns pass 1 must read."""
        C.require(schema, [C.IMAGE], "dedup --method phash")
        if schema.field(C.IMAGE).type != C.MEDIA_TYPE:
            raise DataContractError(
                f"column image is {schema.field(C.IMAGE).type}, "
                "not the {bytes, path} media layout"
            )
        require_module("imagehash", "dedup")
        return [C.IMAGE]

    def keys(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        """The pHash of each image, and why an image could not be hashed (else null)."""
        images = cells(batch.column(C.IMAGE))
        out = np.zeros(len(images), dtype=np.uint64)
        mirror = np.zeros(len(images), dtype=np.uint64)
        errors: list[str | None] = [None] * len(images)
        for i, value in enumerate(images):
            try:
                if self.flip:
                    out[i], mirror[i] = image_phashes(read(value, "image"), self.max_pixels)
                else:
                    out[i] = image_phash(read(value, "image"), self.max_pixels)
            except MediaError as e:
                errors[i] = f"{e.reason}{_SEP}{e.detail}"
        found = {KEY: pa.array(out, pa.uint64()), ERROR: pa.array(errors, pa.string())}
        if self.flip:
            found[MIRROR] = pa.array(mirror, pa.uint64())
        return found

    def scan(self, keys: pa.RecordBatch, offset: int) -> None:
        """Keep the hashes; images that could not be hashed become failures."""
        errors = keys.column(ERROR)
        for i in np.flatnonzero(errors.is_valid().to_numpy(zero_copy_only=False)):
            reason, _, detail = errors[int(i)].as_py().partition(_SEP)
            self.failures[offset + int(i)] = (reason, detail)
        if KEY in keys.schema.names:  # absent when a groupby on buckets groups them
            self._hashes.append(keys.column(KEY).to_numpy(zero_copy_only=False))
            if self.flip:
                self._mirrors.append(keys.column(MIRROR).to_numpy(zero_copy_only=False))

    def fanout(self) -> int:
        """Each hash once per chunk."""
        return len(chunk_masks(self.max_distance))

    def bucket_rows(self, keys: pa.Table, buckets: int) -> pa.Table:
        """Each hash of a row once per chunk (the pigeonhole of `near_pairs`), as (chunk,
        chunk value, position, hash), bucketed by chunk and value."""
        ok = keys[ERROR].is_null().to_numpy(zero_copy_only=False)
        pos = keys[POSITION].to_numpy(zero_copy_only=False)[ok]
        h = np.concatenate(
            [
                keys[c].to_numpy(zero_copy_only=False)[ok].astype(np.uint64)
                for c in self.hash_columns
            ]
        )
        pos = np.tile(pos, len(self.hash_columns))
        parts = []
        for c, (shift, mask) in enumerate(chunk_masks(self.max_distance)):
            value = (h >> np.uint64(shift)) & np.uint64(mask)
            rows = pa.table(
                {"chunk": np.full(len(h), c, np.int32), "value": value, POSITION: pos, "hash": h}
            )
            parts.append(with_bucket(rows, value ^ mix64(np.full(len(h), c, np.uint64)), buckets))
        return pa.concat_tables(parts)

    def bucket_edges(self, bucket: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """For a groupby on buckets: the edges among the rows of a bucket, chunk by chunk."""
        chunk, value = bucket["chunk"].to_numpy(), bucket["value"].to_numpy()
        h, pos = bucket["hash"].to_numpy(), bucket[POSITION].to_numpy()
        found = []
        for c in np.unique(chunk):
            at = chunk == c
            found.append(chunk_edges(h[at], value[at], pos[at], self.max_distance))
        i = np.concatenate([f[0] for f in found]) if found else np.empty(0, np.int64)
        j = np.concatenate([f[1] for f in found]) if found else np.empty(0, np.int64)
        other = i != j  # a row's own hash and mirror meeting link nothing
        return i[other], j[other]

    def labels(self, active: np.ndarray) -> np.ndarray:
        """Group label per active row: components of the within-radius graph."""
        if (preset := self.preset(active)) is not None:
            return preset
        self._hashes = [np.concatenate(self._hashes)] if self._hashes else []
        self._mirrors = [np.concatenate(self._mirrors)] if self._mirrors else []
        if self.index_from is not None and self.max_distance < 4 * CROSS_PARTS:
            return self._labels_with_index(active)
        return self._components(active)

    def _components(self, active: np.ndarray) -> np.ndarray:
        n = len(active)
        entries = [h[0][active] for h in (self._hashes, self._mirrors) if h]
        hashes = np.concatenate(entries) if entries else np.empty(0, np.uint64)
        uniq, inverse = np.unique(hashes, return_inverse=True)
        inverse = inverse.ravel()
        # Equal hashes meet in one node of the index; a row's hash and mirror are linked.
        i, j = near_pairs(uniq, self.max_distance)
        if len(entries) == 2:
            i, j = np.r_[i, inverse[:n]], np.r_[j, inverse[n:]]
        labels = components(len(uniq), i, j)[inverse[:n]]
        alone = np.bincount(labels, minlength=len(uniq))[labels] == 1 if n else labels < 0
        return np.where(alone, -1, labels)

    def _labels_with_index(self, active: np.ndarray) -> np.ndarray:
        """Labels when the rows from `index_from` on are a dedup index's: this run's rows are
        grouped as without one, then linked to the index rows within the radius (`cross_pairs`);
        index rows are not paired with each other (an earlier run kept them apart)."""
        new, old = active[active < self.index_from], active[active >= self.index_from]
        own = self._components(new)
        grouped = np.flatnonzero(own >= 0)
        i, j = same_key_edges(own[grouped], grouped)
        found = [h[0] for h in (self._hashes, self._mirrors) if h]
        a, b = [], []
        for x in found:  # any hash of a new row against any hash of an index row
            for y in found:
                p, q = cross_pairs(x[new], y[old], self.max_distance)
                a.append(p)
                b.append(len(new) + q)
        edges = [(i, j), (np.concatenate(a), np.concatenate(b))]
        labels = edge_labels(len(new) + len(old), edges)
        out = np.empty(len(active), np.int64)
        out[active < self.index_from] = labels[: len(new)]
        out[active >= self.index_from] = labels[len(new) :]
        return out

    def values(self, dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """The Hamming distance (bits) between each dropped row's pHash and its kept row's
        (with `flip`: the least over their hashes and mirrors)."""
        if self._hashes:
            found = [h[0] for h in (self._hashes, self._mirrors) if h]
            a, b = [f[dropped] for f in found], [f[kept] for f in found]
        elif self.member_keys(KEY, dropped) is not None:
            a, b = [
                [self.member_keys(c, at).to_numpy(zero_copy_only=False) for c in self.hash_columns]
                for at in (dropped, kept)
            ]
        else:
            return np.full(len(dropped), np.nan)
        near = np.full(len(dropped), BITS, np.int64)
        for x in a:
            for y in b:
                near = np.minimum(near, popcount(x.astype(np.uint64) ^ y.astype(np.uint64)))
        return near.astype(np.float64)

    def member_columns(self) -> tuple[str, ...]:
        """The hashes, when distances are wanted."""
        return self.hash_columns if self.values_wanted else ()

    def release(self) -> None:
        """Drop the hashes."""
        self._hashes, self._mirrors, self._groups, self._members = [], [], None, None
