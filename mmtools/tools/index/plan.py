"""Which index to build, chosen from the row count and the memory budget, and its `nprobe`.

Below `exact_below` rows, when the float32 vectors fit the budget, the index is flat: exact
inner product. Above, it is an inverted file (IVF): k-means cells trained on a sample, each
vector stored as a code in the list of its nearest centroid, a query scanning the `nprobe`
nearest lists. The code is the most faithful one whose index fits the budget, as autofaiss
picks the richest code the memory allows: half floats (2 bytes a dimension), 8-bit scalar
quantization (1 byte a dimension), then product quantization with as many sub-vectors as fit
(m bytes a vector). IVF rather than HNSW: IVF parts added one shard at a time to copies of
the same trained index merge into one, which is what makes the build streaming, resumable
and appendable; an HNSW graph does not merge.

The number of lists is about 2·sqrt(rows), a power of two, with at least 39 training rows a
list (faiss' minimum); the training sample holds up to 64 rows a list. After the build,
`nprobe` is the smallest power of two with which sample queries find `RECALL_TARGET` of the
ten neighbours that scanning every list finds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from mmtools.errors import UsageError
from mmtools.sizes import human_bytes

BASE_BYTES = 400 << 20  # the process before any vector: Python, pyarrow, numpy, faiss
LABEL_BYTES = 8  # an IVF list stores an int64 label beside each code
ROW_WORK_BYTES = 12  # per dimension of a part's row: read (float16), float32, normalised
MIN_PART, MAX_PART = 1024, 100_000
RECALL_TARGET = 0.97
CALIBRATION_WORK = 3e7  # query x row products spent finding nprobe (30 queries for 1M rows)


@dataclass(frozen=True)
class Plan:
    """What a build makes: `flat`, `ivf` (with `nlist` lists and a `code`) or `centroids`
    (`nlist` k-means centres); trained on `train_rows`, added `part_rows` at a time."""

    kind: str
    dim: int
    nlist: int = 0
    code: str = ""
    train_rows: int = 0
    part_rows: int = 10_000

    def factory(self) -> str:
        """The faiss index_factory string."""
        if self.kind != "ivf":
            return "Flat"
        quantizer = f"IVF{self.nlist}" if self.nlist <= 8192 else f"IVF{self.nlist}_HNSW32"
        return f"{quantizer},{self.code}"

    def index_bytes(self, rows: int) -> int:
        """Memory of the finished index holding `rows` vectors."""
        if self.kind != "ivf":
            return rows * self.dim * 4
        return rows * (code_bytes(self.code, self.dim) + LABEL_BYTES) + self.nlist * self.dim * 4

    def as_dict(self) -> dict:
        """JSON-ready, with the factory string."""
        return {**asdict(self), "factory": self.factory()}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """The plan recorded in a run file or manifest."""
        return cls(**{k: v for k, v in d.items() if k != "factory"})


def code_bytes(code: str, dim: int) -> int:
    """Bytes of one vector's code."""
    if code == "SQfp16":
        return 2 * dim
    if code == "SQ8":
        return dim
    return int(code.removeprefix("PQ"))


def codes(dim: int) -> list[str]:
    """Codes from the most faithful to the smallest: half floats, 8 bits, then PQ."""
    ms = [m for m in (dim // 2, dim // 4, 64, 48, 32, 24, 16, 8, 4) if m and dim % m == 0]
    return ["SQfp16", "SQ8", *[f"PQ{m}" for m in sorted(set(ms), reverse=True)]]


def lists_for(rows: int) -> int:
    """IVF lists for `rows` vectors: about 2·sqrt(rows), a power of two, 39 rows a list."""
    n = 2 ** round(math.log2(max(2 * math.sqrt(max(rows, 1)), 1)))
    while n > 1 and rows < 39 * n:
        n //= 2
    return n


def choose(
    rows: int, dim: int, budget: int, exact_below: int, part_rows: int | None = None
) -> Plan:
    """The index for `rows` vectors of `dim` within `budget` bytes of memory."""
    usable = budget - BASE_BYTES
    if usable <= 0:
        raise UsageError(f"--max-memory must be more than {human_bytes(BASE_BYTES)}")
    part = part_rows or int(np.clip(usable // 8 // (dim * ROW_WORK_BYTES), MIN_PART, MAX_PART))
    working = part * dim * ROW_WORK_BYTES
    if rows < exact_below and Plan("flat", dim).index_bytes(rows) + working <= usable:
        return Plan("flat", dim, part_rows=part)
    nlist = lists_for(rows)
    for code in codes(dim):
        plan = Plan("ivf", dim, nlist, code, part_rows=part)
        # The final merge holds the whole index and one part.
        if plan.index_bytes(rows) * 1.1 + working <= usable:
            break
    else:
        least = Plan("ivf", dim, nlist, codes(dim)[-1]).index_bytes(rows) * 1.1 + working
        raise UsageError(
            f"--max-memory {human_bytes(budget)} is too small for {rows} vectors of {dim} "
            f"dimensions; give at least {human_bytes(least + BASE_BYTES, up=True)}"
        )
    # The sample and k-means' copy of it take at most half of what is left.
    fits = int(usable // 2 // (dim * 4 * 2))
    train = min(rows, 64 * nlist, max(39 * nlist, fits))
    return Plan("ivf", dim, nlist, plan.code, train, part)


def centroids_plan(rows: int, dim: int, k: int, budget: int) -> Plan:
    """k-means centres of a sample (up to 256 rows a centre, within the budget)."""
    if k < 1 or k > rows:
        raise UsageError(f"--kmeans {k}: choose between 1 and the {rows} input rows")
    fits = max(k, int((budget - BASE_BYTES) // 2 // (dim * 4 * 2)))
    return Plan("centroids", dim, k, train_rows=min(rows, 256 * k, fits), part_rows=MAX_PART)


def calibrate(index, queries: np.ndarray, own: np.ndarray, k: int = 10) -> tuple[int, float]:
    """The smallest power-of-two `nprobe` whose top `k` (the query's own vector left out)
    holds `RECALL_TARGET` of what scanning every list finds; and the recall it reaches."""
    from mmtools.io.index import faiss

    ivf = faiss().extract_index_ivf(index)
    ivf.nprobe = ivf.nlist
    _, truth = index.search(queries, k + 1)
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        _, found = index.search(queries, k + 1)
        r = recall(truth, found, own, k)
        if r >= RECALL_TARGET or nprobe >= ivf.nlist:
            return nprobe, r
        nprobe = min(2 * nprobe, ivf.nlist)


def recall(truth: np.ndarray, found: np.ndarray, own: np.ndarray, k: int) -> float:
    """Share of each row's first `k` true labels (not its own, not -1) among its first `k`
    found ones."""
    hits = total = 0
    for t, f, o in zip(truth, found, own, strict=True):
        want = [x for x in t if x >= 0 and x != o][:k]
        got = [x for x in f if x >= 0 and x != o][:k]
        hits += len(set(want) & set(got))
        total += len(want)
    return hits / total if total else 1.0


def calibration_queries(rows: int) -> int:
    """How many sample queries find `nprobe`: fewer as the index grows."""
    return int(np.clip(CALIBRATION_WORK / max(rows, 1), 20, 200))
