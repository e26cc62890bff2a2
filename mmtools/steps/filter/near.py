"""`filter --near`: keep the rows whose nearest neighbour in a reference set is similar enough.

The reference is a dataset (its embedding column, searched exactly) or an index made by
`mmtools index` (searched as it was built: exact, or IVF with its nprobe). An index of
k-means centres (`mmtools index --kmeans K`) keeps the rows near the reference's clusters,
which is DataComp's image-based filter turned around: here the reference is clustered, not
the pool. A row is kept when the cosine of its embedding and its nearest reference vector is
at least `min_sim`; the others are dropped under the rule `near`. A row without a usable
embedding becomes a reject row (`no_embedding`, `bad_embedding`). Reference and input must
come from one model (read from the column metadata).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import DataContractError, UsageError
from mmtools.io import index as X
from mmtools.step import Result, Step, rejects_at

RULE = "near"
INVERTED_NOTE = "would_drop_"  # as filter's --invert notes what each rule would drop


@dataclass
class NearConfig:
    """Keep rows with a reference vector at cosine >= `min_sim` (`invert`: the others)."""

    reference: str | None = None
    min_sim: float | None = None
    column: str | None = None  # None: the reference index's column, else image_embedding
    invert: bool = False


class NearFilter(Step):
    """Keep the rows near a reference set; count the rest as dropped by `near`."""

    name = RULE
    loads_model = True  # the reference is loaded once per worker, in setup()
    transient = ("_reference",)

    def __init__(self, config: NearConfig):
        super().__init__(config)
        if config.reference is None:
            raise UsageError("--near needs a reference: a dataset or an index")
        if config.min_sim is None or not -1 <= config.min_sim <= 1:
            raise UsageError("--near needs --min-sim X, a cosine between -1 and 1")
        self.path = os.path.abspath(config.reference)
        self.is_index = X.is_index(self.path)
        self.meta = self._describe()
        self.column = config.column or self.meta["column"] or C.IMAGE_EMBEDDING
        self.requires = (C.ID, self.column)
        self._reference = None

    def _describe(self) -> dict:
        """The reference's column, size, model and identity, without reading its vectors."""
        if self.is_index:
            m = X.read_manifest(self.path)
            identity = [self.path, m["generation"], m["updated"], m["rows"]]
            return {
                "column": m["column"],
                "dim": m["dim"],
                "model": m.get("model") or {},
                "identity": identity,
            }
        from mmtools.io.source import Source

        source = Source([self.config.reference])
        if source.shards is None:
            raise UsageError("--near takes a dataset or an index, not a stream")
        column = self.config.column or C.IMAGE_EMBEDDING
        dim = X.embedding_dim(source.schema, column, "the --near reference")
        model = C.column_info(source.schema).get(column) or {}
        return {"column": column, "dim": dim, "model": model, "identity": source.identity()}

    def params(self) -> dict:
        """What changes the output: the reference (as it is now), the threshold, the column."""
        c = self.config
        return {
            RULE: {
                "reference": self.meta["identity"],
                "min_sim": c.min_sim,
                "column": self.column,
                "invert": c.invert,
            }
        }

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The input schema, once the input's embeddings are checked against the reference."""
        X.faiss()  # a missing faiss is refused before the output is touched
        dim = X.embedding_dim(schema, self.column, "filter --near")
        if dim != self.meta["dim"]:
            raise DataContractError(
                f"{self.column} has {dim} dimensions, the --near reference {self.meta['dim']}: "
                "they come from different models"
            )
        ours, theirs = C.column_info(schema).get(self.column) or {}, self.meta["model"]
        if ours and theirs and _key(ours) != _key(theirs):
            raise DataContractError(
                f"{self.column} was made by {_describe(ours)} but the --near reference by "
                f"{_describe(theirs)}; their cosines mean nothing. Embed both with one model"
            )
        return schema

    def setup(self) -> None:
        """Load the reference: an index as built, or a dataset's vectors, searched exactly."""
        if self._reference is not None:
            return
        if self.is_index:
            self._reference = X.IndexReader(self.path)
            return
        from mmtools.io.source import Source

        index = X.faiss().IndexFlatIP(self.meta["dim"])
        for batch in Source([self.config.reference]).batches(
            columns=[self.column], batch_size=65_536
        ):
            vecs, ok = X.unit_vectors(batch.column(self.column))
            index.add(vecs[ok])
        if not index.ntotal:
            raise DataContractError(f"the --near reference has no usable {self.column}")
        self._reference = index

    def nearest(self, vecs: np.ndarray) -> np.ndarray:
        """Each row's cosine to its nearest reference vector (-inf when none is found)."""
        self.setup()
        sims, labels = self._reference.search(np.ascontiguousarray(vecs, np.float32), 1)
        return np.where(labels[:, 0] >= 0, sims[:, 0], -np.inf)

    def process(self, batch: pa.RecordBatch) -> Result:
        """Keep (or, inverted, write) the rows of one batch by their nearest reference."""
        col = batch.column(self.column)
        vecs, ok = X.unit_vectors(col)
        sims = np.full(batch.num_rows, -np.inf, dtype=np.float32)
        if ok.any():
            sims[ok] = self.nearest(vecs[ok])
        near = ok & (sims >= self.config.min_sim)
        far = ok & ~near
        rejects = None
        if not ok.all():
            why = {
                int(i): (
                    r,
                    f"{self.column} is "
                    + ("null" if r == "no_embedding" else "NaN, infinite or zero"),
                )
                for i, r in enumerate(X.unusable_reasons(col, ok))
                if r is not None
            }
            rejects = rejects_at(self.name, batch, sorted(why), why)
        if not self.config.invert:
            dropped = {RULE: int(far.sum())} if far.any() else {}
            drops = self.drop_rows(batch, far, RULE, value=sims)
            return Result(batch.filter(pa.array(near)), rejects, dropped, drops=drops)
        dropped = {"inverted": int(near.sum())} if near.any() else {}
        notes = {INVERTED_NOTE + RULE: int(far.sum())}
        drops = self.drop_rows(batch, near, "inverted", value=sims)
        return Result(batch.filter(pa.array(far)), rejects, dropped, notes=notes, drops=drops)


def _key(info: dict) -> tuple:
    return info.get("model"), info.get("pretrained")


def _describe(info: dict) -> str:
    pretrained = info.get("pretrained")
    return f"{info.get('model')}" + (f" ({pretrained})" if pretrained else "")


def near_steps(config: NearConfig, other_rules: bool) -> list[Step]:
    """The `--near` step of a filter command (none without --near)."""
    if config.reference is None:
        if config.min_sim is not None:
            raise UsageError("--min-sim goes with --near REFERENCE")
        return []
    if config.invert and other_rules:
        raise UsageError(
            "--invert with --near and other rules would need one verdict for both; run "
            "--near --invert and the other rules as two filter commands"
        )
    return [NearFilter(config)]
