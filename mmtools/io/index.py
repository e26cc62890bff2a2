"""An index directory: a faiss index over one embedding column, the ids of its rows, and a
manifest written last.

    INDEX/
      _index.json             the commit: what the index holds, how it was built, its files
      index-00000.faiss       the faiss index (the number grows with each --append)
      trained.faiss           an IVF index trained on a sample, still empty: every part
                              (and every later --append) starts from it
      ids/part-00000.parquet  id, shard and row of each vector, in label order
      _run.json  _progress/  parts/   a build in progress; removed once it is committed
      _lock

A vector's faiss label is its position in the ids files read in order; `shard` numbers the
input Parquet files listed in the manifest and `row` is the row within that file. Vectors
are float32 and L2-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import DataContractError, UsageError, require_module
from mmtools.io import layout as L
from mmtools.io.fs import is_remote

MANIFEST = "_index.json"
FORMAT = "mmtools-index/1"
IDS_DIR = "ids"
PARTS_DIR = "parts"
TRAINED = "trained.faiss"
# The ids files: the row's id, which input file (numbered as in the manifest) and which row.
ID_SCHEMA = pa.schema(
    [pa.field(C.ID, pa.string()), pa.field("shard", pa.int32()), pa.field("row", pa.int64())]
)


def faiss():
    """The faiss module, or a one-line error saying how to install it."""
    # OpenMP threads that spin while waiting slow faiss down many times over when the cores
    # are shared; this must be set before faiss loads the OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return require_module("faiss", "index")


def index_file(generation: int) -> str:
    """Name of the faiss file of one generation (each --append writes the next)."""
    return f"index-{generation:05d}.faiss"


def ids_file(part: int) -> str:
    """Name of the ids file of one part."""
    return f"{IDS_DIR}/part-{part:05d}.parquet"


def part_file(part: int) -> str:
    """Name of the faiss file of one part of a build in progress."""
    return f"{PARTS_DIR}/part-{part:05d}.faiss"


def check_local(path: str) -> None:
    """An index lives on a local disk: faiss reads and writes files there."""
    if is_remote(path):
        raise UsageError(f"{path}: an index must be a local directory (faiss reads local files)")


def embedding_dim(schema: pa.Schema, column: str, what: str) -> int:
    """The size of an embedding column; a data-contract error for anything else."""
    C.require(schema, [C.ID, column], what)
    t = schema.field(column).type
    if not pa.types.is_fixed_size_list(t) or not pa.types.is_floating(t.value_type):
        raise DataContractError(
            f"{column} is {t}, not a fixed-size list of floats; make it with mmtools embed"
        )
    return t.list_size


def unit_vectors(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Rows of an embedding column as float32, L2-normalised in float32, and which rows are
    usable (not null, finite, not zero); unusable rows are zeros."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n, dim = len(col), col.type.list_size
    values = col.values.slice(col.offset * dim, n * dim)
    # One float32 copy, normalised in place: a part of the input costs 4 bytes a value here.
    mat = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, dim)
    with np.errstate(invalid="ignore", over="ignore"):
        squares = np.einsum("ij,ij->i", mat, mat)  # NaN or inf anywhere makes it non-finite
    ok = np.isfinite(squares) & (squares > 0) & ~np.asarray(col.is_null())
    if not ok.all():
        mat[~ok] = 0.0
    mat /= np.sqrt(np.where(ok, squares, 1.0)).astype(np.float32)[:, None]
    return mat, ok


def unusable_reasons(col: pa.Array, ok: np.ndarray) -> list[str | None]:
    """Per row: None when usable, else `no_embedding` (null) or `bad_embedding`."""
    null = np.asarray(col.is_null())
    return [
        None if k else "no_embedding" if n else "bad_embedding"
        for k, n in zip(ok, null, strict=True)
    ]


def read_manifest(path: str) -> dict:
    """The manifest of a finished index; a one-line error for anything else."""
    from mmtools.io.manifest import read_json

    if not os.path.isdir(path):
        raise UsageError(f"index {path} does not exist; build it with mmtools index")
    manifest = read_json(os.path.join(path, MANIFEST))
    if manifest is None:
        if os.path.exists(os.path.join(path, L.RUN_FILE)):
            raise DataContractError(
                f"{path} is an unfinished index build; rerun the mmtools index command "
                "that started it"
            )
        raise UsageError(
            f"{path} is not an mmtools index (no {MANIFEST}); make one with mmtools index"
        )
    if manifest.get("format") != FORMAT:
        raise DataContractError(f"{path}: unknown index format {manifest.get('format')!r}")
    return manifest


def is_index(path: str) -> bool:
    """Whether `path` is a directory holding an index (finished or not)."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, n)) for n in (MANIFEST, TRAINED, IDS_DIR)
    )


class IndexReader:
    """A finished index: search it, and map its labels to ids and input rows."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = read_manifest(path)
        self._index = None
        self._ids: pa.Table | None = None

    @property
    def column(self) -> str:
        """The embedding column the index was built from."""
        return self.manifest["column"]

    @property
    def dim(self) -> int:
        """Dimensions of its vectors."""
        return int(self.manifest["dim"])

    @property
    def rows(self) -> int:
        """Vectors it holds."""
        return int(self.manifest["rows"])

    @property
    def model(self) -> dict:
        """Provenance of its embeddings (model, pretrained, ...); {} when unrecorded."""
        return self.manifest.get("model") or {}

    @property
    def kind(self) -> str:
        """`flat` (exact), `ivf` (compressed) or `centroids` (k-means centres)."""
        return self.manifest["plan"]["kind"]

    def index(self):
        """The faiss index, read on first use."""
        if self._index is None:
            file = os.path.join(self.path, self.manifest["files"]["index"])
            try:
                self._index = faiss().read_index(file)
            except RuntimeError as e:
                raise DataContractError(f"cannot read {file}: {str(e).splitlines()[0]}") from None
        return self._index

    def search(
        self, queries: np.ndarray, k: int, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest vectors of each query row: (similarities, labels); label -1 pads."""
        index = self.index()
        if self.kind == "ivf":
            ivf = faiss().extract_index_ivf(index)
            ivf.nprobe = int(nprobe or self.manifest.get("nprobe") or 1)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return index.search(q, min(k, max(self.rows, 1)))

    def ids(self) -> pa.Table:
        """Every label's id, shard and row, in label order."""
        if self._ids is None:
            import pyarrow.parquet as pq

            tables = [
                pq.read_table(os.path.join(self.path, f), schema=ID_SCHEMA)
                for f in self.manifest["files"]["ids"]
            ]
            self._ids = pa.concat_tables(tables) if tables else ID_SCHEMA.empty_table()
        return self._ids

    def label(self, row_id: str) -> int | None:
        """The label of the first vector with this id, or None."""
        import pyarrow.compute as pc

        found = pc.index(self.ids().column(C.ID), row_id).as_py()
        return None if found < 0 else found

    def shards(self) -> list[dict]:
        """The input Parquet files behind the labels: path, rows, size, mtime_ns."""
        return self.manifest["shards"]

    def vector(self, label: int) -> np.ndarray:
        """The stored vector of a label (exact for a flat index, decoded for a compressed one)."""
        index = self.index()
        if self.kind == "ivf":
            faiss().extract_index_ivf(index).make_direct_map()
        return index.reconstruct(int(label))
