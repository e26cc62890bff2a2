"""Near-duplicate captions: MinHash LSH (datasketch) over word shingles, checked by Jaccard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C
from mmtools.dedup.exact import check_text, normalize_text
from mmtools.dedup.groups import RayGrouped, edge_components, edge_labels, equal_key_pairs
from mmtools.errors import require_module
from mmtools.step import POSITION

_SLAB = 1 << 20  # candidate pairs checked at a time
_MARGIN = 0.15  # signature estimates this far below the threshold still get an exact check
LSH_WEIGHTS = (0.1, 0.9)  # (false positive, false negative) weights of the band choice


def shingles(text: str, size: int) -> set[str]:
    """Word `size`-shingles of a normalised caption (the whole caption if it is shorter)."""
    words = text.split()
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[k : k + size]) for k in range(len(words) - size + 1)}


def jaccard(a: set, b: set) -> float:
    """Jaccard similarity of two sets."""
    return len(a & b) / len(a | b)


def bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch's choice of (bands, rows per band) for `threshold`, weighted for recall."""
    datasketch = require_module("datasketch", "dedup")
    # Every candidate is checked afterwards, so a missed pair costs more than a false one.
    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


def signatures(sets: list[set[str]], num_perm: int, seed: int) -> np.ndarray:
    """MinHash signature of each shingle set, (len(sets), num_perm) uint32."""
    datasketch = require_module("datasketch", "dedup")
    out = np.empty((len(sets), num_perm), dtype=np.uint32)
    for start in range(0, len(sets), 4096):
        part = [[s.encode() for s in shingle_set] for shingle_set in sets[start : start + 4096]]
        hashed = datasketch.MinHash.bulk(part, num_perm=num_perm, seed=seed)
        out[start : start + len(part)] = np.stack([m.hashvalues for m in hashed])
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


def similar_pairs(sets: list[set[str]], threshold: float, num_perm: int, seed: int):
    """Pairs (i < j) of `sets` with Jaccard >= threshold, found through MinHash LSH."""
    sig = signatures(sets, num_perm, seed)
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


def band_rows(texts: pa.Array, pos: np.ndarray, m: MinHashText) -> pa.Table:
    """For Ray: each captioned row once per LSH band, as (band, band code, position, caption,
    signature); rows that share a band code are the candidates `candidate_pairs` finds."""
    ok = texts.is_valid().to_numpy(zero_copy_only=False)
    kept = [t for t, v in zip(texts.to_pylist(), ok, strict=True) if v]
    sig = signatures([shingles(t, m.shingle) for t in kept], m.num_perm, m.seed)
    b, r = bands(m.threshold, m.num_perm)
    pos, raw = pos[ok], [s.tobytes() for s in sig]
    parts = [
        pa.table(
            {
                "band": np.full(len(kept), k, np.int32),
                "code": [sig[x, k * r : (k + 1) * r].tobytes() for x in range(len(kept))],
                "pos": pos,
                "text": pa.array(kept, pa.string()),
                "sig": pa.array(raw, pa.binary()),
            }
        )
        for k in range(b)
    ]
    return pa.concat_tables(parts)


def band_edges(group: pa.Table, m: MinHashText) -> tuple[np.ndarray, np.ndarray]:
    """Edges (pos, pos) of one band bucket: equal captions to their first row (in band 0,
    where every copy meets), distinct captions whose signatures and shingles agree."""
    texts, pos = group["text"].to_pylist(), group["pos"].to_numpy()
    uniq, first, inverse = np.unique(np.array(texts, dtype=object), True, True)
    rep = pos[first]
    found_i, found_j = [], []
    if group["band"][0].as_py() == 0:
        same = np.flatnonzero(np.arange(len(pos)) != first[inverse])
        found_i.append(rep[inverse[same]])
        found_j.append(pos[same])
    sig = np.frombuffer(b"".join(group["sig"].to_pylist()), np.uint32).reshape(len(pos), -1)
    sig, sets = sig[first], [shingles(t, m.shingle) for t in uniq]
    for a in range(len(uniq) - 1):
        estimate = (sig[a + 1 :] == sig[a]).mean(axis=1)
        near = a + 1 + np.flatnonzero(estimate >= m.threshold - _MARGIN)
        near = [c for c in near if jaccard(sets[a], sets[c]) >= m.threshold]
        found_i.append(np.full(len(near), rep[a]))
        found_j.append(rep[np.array(near, np.int64)])
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(found_i).astype(np.int64), np.concatenate(found_j).astype(np.int64)


class MinHashText(RayGrouped):
    """Captions with word-shingle Jaccard similarity >= threshold are duplicates."""

    name = "minhash"
    ray_columns = (KEY,)

    def __init__(self, threshold: float, num_perm: int, shingle: int, seed: int):
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        self.failures: dict[int, tuple[str, str]] = {}
        self._texts: list[pa.Array] = []

    def bind(self, schema: pa.Schema) -> list[str]:
        """Check the text column; return the columns pass 1 must read."""
        C.require(schema, [C.TEXT], "dedup --method minhash")
        check_text(schema, "minhash")
        require_module("datasketch", "dedup")
        return [C.TEXT]

    def keys(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        """The normalised caption of each row."""
        return {KEY: normalize_text(batch.column(C.TEXT))}

    def scan(self, keys: pa.RecordBatch, offset: int) -> None:
        """Keep the normalised captions (absent when Ray's groupby groups them)."""
        if KEY in keys.schema.names:
            self._texts.append(keys.column(KEY))

    def ray_groups(self, keys) -> tuple[np.ndarray, np.ndarray]:
        """Ray Data's groupby on each LSH band's code (the candidates of `candidate_pairs`),
        each bucket checked as `similar_pairs` checks; their components are the groups."""

        def to_bands(table: pa.Table) -> pa.Table:
            return band_rows(table[KEY].combine_chunks(), table[POSITION].to_numpy(), self)

        def to_edges(group: pa.Table) -> pa.Table:
            i, j = band_edges(group, self)
            return pa.table({"i": pa.array(i, pa.int64()), "j": pa.array(j, pa.int64())})

        edges = (
            keys.select_columns([KEY, POSITION])
            .map_batches(to_bands, batch_format="pyarrow")
            .groupby(["band", "code"])
            .map_groups(to_edges, batch_format="pyarrow")
        )
        return edge_components(edges)

    def labels(self, active: np.ndarray) -> np.ndarray:
        """Group label per active row; identical normalised captions share a label."""
        if (preset := self.preset(active)) is not None:
            return preset
        texts = pa.chunked_array(self._texts, pa.string()).cast(pa.large_string())
        encoded = texts.take(active).combine_chunks().dictionary_encode()
        codes = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int64)
        sets = [shingles(t, self.shingle) for t in encoded.dictionary.to_pylist()]
        if not sets:
            return codes
        i, j = similar_pairs(sets, self.threshold, self.num_perm, self.seed)
        per_text = edge_labels(len(sets), [(i, j)])
        count = np.bincount(codes[codes >= 0], minlength=len(sets))
        per_text = np.where(
            (per_text < 0) & (count > 1), len(sets) + np.arange(len(sets)), per_text
        )
        return np.where(codes >= 0, per_text[np.maximum(codes, 0)], -1)

    def release(self) -> None:
        """Drop the captions."""
        self._texts, self._groups = [], None
