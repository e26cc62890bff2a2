"""Near-duplicate captions: MinHash LSH over word shingles (datasketch's signatures and band
choice, in numpy), checked by Jaccard."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.step import POSITION
from mmtools.steps.dedup.exact import check_text, normalize_text
from mmtools.steps.dedup.groups import (
    BucketGrouped,
    components,
    edge_labels,
    equal_key_pairs,
    mix64,
    same_key_edges,
    with_bucket,
)

_SLAB = 1 << 20  # candidate pairs checked at a time
_MARGIN = 0.15  # signature estimates this far below the threshold still get an exact check
# (false positive, false negative) weights of the band choice: every candidate is checked
# afterwards, so a missed pair costs more than a false one.
LSH_WEIGHTS = (0.1, 0.9)
_HASHED = 1 << 14  # shingles hashed and permuted at a time


def shingles(text: str, size: int) -> set[str]:
    """Word `size`-shingles of a normalised caption (the whole caption if it is shorter)."""
    words = text.split()
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[k : k + size]) for k in range(len(words) - size + 1)}


def jaccard(a: set, b: set) -> float:
    """Jaccard similarity of two sets."""
    return len(a & b) / len(a | b)


@functools.cache
def bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for `threshold`: datasketch's MinHashLSH choice, the split of
    `num_perm` that minimises the weighted chance of false positives and false negatives,
    weighted for recall (`LSH_WEIGHTS`).

    Both chances are integrals of polynomials of degree at most `num_perm`, which Gauss-Legendre
    quadrature with num_perm // 2 + 1 nodes integrates exactly."""
    if num_perm >= 2:
        b, r = np.array(
            [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], float
        ).T.reshape(2, -1, 1)
        x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 1)
        below = threshold * (x + 1) / 2  # nodes on [0, threshold] and [threshold, 1]
        above = threshold + (1 - threshold) * (x + 1) / 2
        false_pos = (1 - (1 - below**r) ** b) @ w * threshold / 2
        false_neg = (1 - above**r) ** b @ w * (1 - threshold) / 2
        best = int(np.argmin(LSH_WEIGHTS[0] * false_pos + LSH_WEIGHTS[1] * false_neg))
        if b[best, 0] >= 2:  # argmin: the first of equal errors, as datasketch takes
            return int(b[best, 0]), int(r[best, 0])
    raise UsageError(
        f"dedup --threshold {threshold:g} with --num-perm {num_perm} leaves MinHash LSH "
        "fewer than two bands; lower --threshold or raise --num-perm (identical captions: "
        "-m exact --exact-key text)"
    )


@functools.cache
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The affine maps h -> a * h + b (mod 2**32, `a` odd) of datasketch's MinHash (its
    default "affine32" scheme), drawn from the same seeded generator."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (wrapping arithmetic), datasketch's pre-mix."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signatures(sets: list[set[str]], num_perm: int, seed: int) -> np.ndarray:
    """MinHash signature of each shingle set, (len(sets), num_perm) uint32: the values of
    datasketch's `MinHash(num_perm, seed)` fed each shingle's UTF-8 bytes, so band codes kept
    in a dedup index do not change with the datasketch release installed (or without one)."""
    a, b = _permutations(num_perm, seed)
    out = np.full((len(sets), num_perm), np.iinfo(np.uint32).max, np.uint32)
    start = 0
    while start < len(sets):
        # Sets whose shingles number about _HASHED at a time: the (shingles, num_perm) block
        # of permuted hashes stays a few MiB.
        stop, count = start, 0
        while stop < len(sets) and (count == 0 or count + len(sets[stop]) <= _HASHED):
            count += len(sets[stop])
            stop += 1
        part = sets[start:stop]
        sizes = np.fromiter(map(len, part), np.int64, len(part))
        digests = b"".join(
            hashlib.sha1(s.encode()).digest()[:4] for shingle_set in part for s in shingle_set
        )
        hashed = _fmix32(np.frombuffer(digests, "<u4").astype(np.uint32))
        permuted = hashed[:, None] * a + b
        filled = sizes > 0
        starts = (np.cumsum(sizes) - sizes)[filled]
        if len(starts):
            out[start:stop][filled] = np.minimum.reduceat(permuted, starts, axis=0)
        start = stop
    return out


def candidate_pairs(sig: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) that collide in at least one LSH band, as datasketch's MinHashLSH finds."""
    b, r = bands(threshold, sig.shape[1])
    found = []
    for band in range(b):
        part = np.ascontiguousarray(sig[:, band * r : (band + 1) * r])
        _, codes = np.unique(part.view(f"V{part.itemsize * r}").ravel(), return_inverse=True)
        for i, j in equal_key_pairs(codes):
            found.append(np.minimum(i, j).astype(np.int64) * len(sig) + np.maximum(i, j))
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    pairs = np.unique(np.concatenate(found))
    return pairs // len(sig), pairs % len(sig)


def band_codes(sig: np.ndarray, threshold: float) -> np.ndarray:
    """The LSH band codes of each signature, (len(sig), bands) uint64: the band and its rows'
    values hashed together. Two rows share a code where `candidate_pairs` pairs them."""
    b, r = bands(threshold, sig.shape[1])
    out = np.empty((len(sig), b), np.uint64)
    for band in range(b):
        code = mix64(np.full(len(sig), band, np.uint64))
        for col in range(band * r, (band + 1) * r):
            code = mix64(code ^ sig[:, col].astype(np.uint64))
        out[:, band] = code
    return out


def similar_pairs(sets: list[set[str]], threshold: float, num_perm: int, seed: int, sig=None):
    """Pairs (i < j) of `sets` with Jaccard >= threshold, found through MinHash LSH (from
    their signatures `sig` when given)."""
    sig = signatures(sets, num_perm, seed) if sig is None else sig
    i, j = candidate_pairs(sig, threshold)
    keep_i, keep_j = [], []
    for s in range(0, len(i), _SLAB):
        a, b = i[s : s + _SLAB], j[s : s + _SLAB]
        estimate = (sig[a] == sig[b]).mean(axis=1)
        a, b = a[estimate >= threshold - _MARGIN], b[estimate >= threshold - _MARGIN]
        exact = np.array(
            [jaccard(sets[x], sets[y]) >= threshold for x, y in zip(a, b, strict=True)], bool
        )
        keep_i.append(a[exact] if len(a) else a)
        keep_j.append(b[exact] if len(b) else b)
    if not keep_i:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(keep_i), np.concatenate(keep_j)


KEY = "_key_minhash"
BANDS = "_key_minhash_bands"  # in a dedup index: the LSH band codes of each kept caption
_FILTER = 1 << 22  # bits of the bitmap `matches` rules stored codes out with


def matches(fresh: np.ndarray, stored: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (stored row, fresh row) sharing a band code, each once: (n, b) codes, and the
    (m, b) codes of the stored rows in chunks (an index's generations, memory-mapped: read
    where they lie, never copied whole), numbered across the chunks. The work grows with
    m log n; the stored rows are never sorted."""
    found = []
    for band in range(fresh.shape[1]):
        order = np.argsort(fresh[:, band], kind="stable")
        codes = fresh[order, band]
        # A bitmap of the fresh codes' low bits rules out nearly every stored row at one
        # lookup each; only the rest are searched for.
        bitmap = np.zeros(_FILTER, bool)
        bitmap[(codes & np.uint64(_FILTER - 1)).astype(np.int64)] = True
        base = 0
        for chunk in stored:
            low = (chunk[:, band] & np.uint64(_FILTER - 1)).astype(np.int64)
            maybe = np.flatnonzero(bitmap[low])
            lo = np.searchsorted(codes, chunk[maybe, band], "left")
            count = np.searchsorted(codes, chunk[maybe, band], "right") - lo
            if count.any():
                s = np.repeat(maybe + base, count)
                within = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
                found.append(s * len(fresh) + order[np.repeat(lo, count) + within])
            base += len(chunk)
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    pairs = np.unique(np.concatenate(found))
    return pairs // len(fresh), pairs % len(fresh)


class MinHashText(BucketGrouped):
    """Captions with word-shingle Jaccard similarity >= threshold are duplicates."""

    name = "minhash"
    bucket_columns = bucket_inputs = (KEY,)
    for_index = False  # set by `Dedup` with an index: keep the signatures for `index_columns`

    def __init__(self, threshold: float, num_perm: int, shingle: int, seed: int):
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        self.failures: dict[int, tuple[str, str]] = {}
        self._texts: list[pa.Array] = []
        self._stored: list[np.ndarray] = []  # band codes of a dedup index's rows, scanned last
        self.index_from: int | None = None  # where those rows start (`Dedup`)
        self._signed: tuple[pa.Array, np.ndarray] | None = None  # captions and their codes

    def bind(self, schema: pa.Schema) -> list[str]:
        """Check the text column; return the columns pass 1 must read."""
        C.require(schema, [C.TEXT], "dedup --method minhash")
        check_text(schema, "minhash")
        return [C.TEXT]

    def keys(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        """The normalised caption of each row."""
        return {KEY: normalize_text(batch.column(C.TEXT))}

    def scan(self, keys: pa.RecordBatch, offset: int) -> None:
        """Keep the normalised captions (absent when a groupby on buckets groups them), and
        the band codes that a dedup index's rows come with."""
        if KEY in keys.schema.names:
            self._texts.append(keys.column(KEY))
        if BANDS in keys.schema.names:
            codes = keys.column(BANDS)
            self._stored.append(codes.flatten().to_numpy().reshape(len(codes), -1))

    def fanout(self) -> int:
        """Each caption once per LSH band."""
        return bands(self.threshold, self.num_perm)[0]

    def bucket_rows(self, keys: pa.Table, buckets: int) -> pa.Table:
        """Each captioned row once per LSH band, as (band code, position, caption), bucketed
        by the code: rows sharing a code are the candidates of `candidate_pairs`."""
        texts = keys[KEY].combine_chunks().dictionary_encode()
        ok = texts.indices.is_valid().to_numpy(zero_copy_only=False)
        tid = texts.indices.to_numpy(zero_copy_only=False)[ok].astype(np.int64)
        sets = [shingles(t, self.shingle) for t in texts.dictionary.to_pylist()]
        sig = signatures(sets, self.num_perm, self.seed)  # each distinct caption once
        codes = band_codes(sig, self.threshold)[tid]
        pos, text = keys[POSITION].to_numpy(zero_copy_only=False)[ok], keys[KEY].filter(ok)
        parts = []
        for band in range(codes.shape[1]):
            rows = pa.table({"code": codes[:, band], POSITION: pos, "text": text})
            parts.append(with_bucket(rows, codes[:, band], buckets))
        return pa.concat_tables(parts)

    def bucket_edges(self, bucket: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Equal captions linked to their first row; distinct captions sharing a band code
        linked when their signatures and then their shingles agree."""
        text = bucket["text"].combine_chunks().dictionary_encode()
        tid, pos = text.indices.to_numpy().astype(np.int64), bucket[POSITION].to_numpy()
        row = np.unique(pos, return_index=True)[1]  # each row once, not once per band
        same_i, same_j = same_key_edges(tid[row], pos[row])
        rep = np.full(len(text.dictionary), np.iinfo(np.int64).max)
        np.minimum.at(rep, tid[row], pos[row])
        code = bucket["code"].to_numpy()
        order = np.lexsort((tid, code))
        code, tid = code[order], tid[order]
        once = np.r_[True, (code[1:] != code[:-1]) | (tid[1:] != tid[:-1])][: len(code)]
        code, tid = code[once], tid[once]  # each caption once per code
        found = [
            np.minimum(tid[a], tid[b]) * len(rep) + np.maximum(tid[a], tid[b])
            for a, b in equal_key_pairs(code)
        ]
        pairs = np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)
        a, b = pairs // max(1, len(rep)), pairs % max(1, len(rep))
        involved = np.unique(np.r_[a, b])
        sets = [shingles(text.dictionary[int(t)].as_py(), self.shingle) for t in involved]
        sig = signatures(sets, self.num_perm, self.seed)
        sa, sb = np.searchsorted(involved, a), np.searchsorted(involved, b)
        near = (sig[sa] == sig[sb]).mean(axis=1) >= self.threshold - _MARGIN
        similar = [
            jaccard(sets[x], sets[y]) >= self.threshold
            for x, y in zip(sa[near], sb[near], strict=True)
        ]
        similar = np.array(similar, bool)
        return np.r_[same_i, rep[a[near][similar]]], np.r_[same_j, rep[b[near][similar]]]

    def labels(self, active: np.ndarray) -> np.ndarray:
        """Group label per active row; identical normalised captions share a label."""
        if (preset := self.preset(active)) is not None:
            return preset
        texts = pa.chunked_array(self._texts, pa.string()).cast(pa.large_string())
        if self._stored:
            return self._labels_with_index(texts, active)
        encoded = texts.take(active).combine_chunks().dictionary_encode()
        codes = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int64)
        sets = [shingles(t, self.shingle) for t in encoded.dictionary.to_pylist()]
        if not sets:
            return codes
        sig = signatures(sets, self.num_perm, self.seed)
        if self.for_index:
            self._signed = (encoded.dictionary, sig)
        i, j = similar_pairs(sets, self.threshold, self.num_perm, self.seed, sig)
        per_text = edge_labels(len(sets), [(i, j)])
        count = np.bincount(codes[codes >= 0], minlength=len(sets))
        per_text = np.where(
            (per_text < 0) & (count > 1), len(sets) + np.arange(len(sets)), per_text
        )
        return np.where(codes >= 0, per_text[np.maximum(codes, 0)], -1)

    def _labels_with_index(self, texts: pa.ChunkedArray, active: np.ndarray) -> np.ndarray:
        """Labels when a dedup index's rows (from `index_from` on) come with band codes:
        this run's captions are signed and paired as without an index; each of them is then
        paired with the index rows sharing a band code, checked by Jaccard. Index rows are
        not paired with each other (an earlier run kept them apart)."""
        new, old = active[active < self.index_from], active[active >= self.index_from]
        encoded = texts.take(new).combine_chunks().dictionary_encode()
        tcode = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int64)
        words = encoded.dictionary.to_pylist()
        sets = [shingles(t, self.shingle) for t in words]
        sig = signatures(sets, self.num_perm, self.seed)
        self._signed = (encoded.dictionary, sig)
        i, j = similar_pairs(sets, self.threshold, self.num_perm, self.seed, sig)
        s, t = matches(band_codes(sig, self.threshold), self._stored)
        stored = sum(len(chunk) for chunk in self._stored)
        if len(old) < stored:  # s numbers every index row: number the active ones instead
            rank = np.full(stored, -1)
            rank[old - self.index_from] = np.arange(len(old))
            found = rank[s]
            s, t = found[found >= 0], t[found >= 0]
        old_text = texts.take(old[s]).to_pylist() if len(s) else []
        near = np.array(
            [
                jaccard(shingles(a, self.shingle), sets[b]) >= self.threshold
                for a, b in zip(old_text, t, strict=True)
            ],
            bool,
        )
        # Nodes: this run's rows, its distinct captions, then the index rows.
        rows, n_text = len(new), len(sets)
        has = np.flatnonzero(tcode >= 0)
        ei = [has, rows + i, rows + n_text + s[near] if len(s) else s]
        ej = [rows + tcode[has], rows + j, rows + t[near] if len(s) else t]
        total = rows + n_text + len(old)
        comp = components(total, np.concatenate(ei), np.concatenate(ej))
        is_row = np.ones(total, bool)
        is_row[rows : rows + n_text] = False
        size = np.bincount(comp[is_row], minlength=total)
        label = np.where(size[comp] > 1, comp, -1)
        out = np.empty(len(active), np.int64)
        out[active < self.index_from] = label[:rows]
        out[active >= self.index_from] = label[rows + n_text :]
        return out

    def index_columns(self, keys: pa.Table) -> dict[str, pa.Array]:
        """The band codes of the kept rows' captions (zeros where a row has none), from the
        signatures this run made, or made here (keys this run did not sign: a rebuild)."""
        captions = keys.column(KEY).combine_chunks().cast(pa.large_string())
        b = bands(self.threshold, self.num_perm)[0]
        codes = np.zeros((len(captions), b), np.uint64)
        signed, self._signed = self._signed, None
        if signed is None and captions.null_count < len(captions):
            dictionary = captions.dictionary_encode().dictionary
            sets = [shingles(t, self.shingle) for t in dictionary.to_pylist()]
            signed = (dictionary, signatures(sets, self.num_perm, self.seed))
        if signed is not None and len(captions):
            dictionary, sig = signed
            at = pc.index_in(captions, value_set=dictionary.cast(pa.large_string()))
            ok = at.is_valid().to_numpy(zero_copy_only=False)
            idx = at.to_numpy(zero_copy_only=False)[ok].astype(np.int64)
            codes[ok] = band_codes(sig[idx], self.threshold)
        flat = pa.array(codes.ravel(), pa.uint64())
        return {BANDS: pa.FixedSizeListArray.from_arrays(flat, b)}

    def values(self, dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """The Jaccard similarity of each dropped row's caption shingles to its kept row's."""
        a, b = self._captions(dropped), self._captions(kept)
        if a is None:
            return np.full(len(dropped), np.nan)
        size = self.shingle
        return np.array(
            [
                1.0 if x == y else jaccard(shingles(x, size), shingles(y, size))
                for x, y in zip(a.to_pylist(), b.to_pylist(), strict=True)
            ],
            np.float64,
        )

    def _captions(self, positions: np.ndarray) -> pa.Array | None:
        if self._texts:
            texts = pa.chunked_array(self._texts, pa.string())
            return texts.take(pa.array(positions, pa.int64())).combine_chunks()
        return self.member_keys(KEY, positions)

    def member_columns(self) -> tuple[str, ...]:
        """The captions, when similarities are wanted."""
        return (KEY,) if self.values_wanted else ()

    def release(self) -> None:
        """Drop the captions (not the signatures a dedup index still wants: `index_columns`)."""
        self._texts, self._groups, self._members = [], None, None
        self._stored = []
