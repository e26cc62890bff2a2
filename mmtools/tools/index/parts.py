"""The faiss work of a build: the training sample, the parts added one at a time, the merge.

Each part is a batch of input rows: their usable vectors go into a small faiss index of their
own (a copy of the trained, empty one for IVF), their ids into an ids file, and a progress
record naming the input position reached commits both. A killed build resumes after the last
record. The merge reads the parts in order into one index, so labels (and, within an IVF
list, the order of the codes) come out the same however often the build was interrupted.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmtools import columns as C
from mmtools.errors import uninterrupted
from mmtools.io import index as X
from mmtools.io import layout as L
from mmtools.tools.index.plan import Plan, calibrate, calibration_queries

SAMPLE_BATCH = 16_384
QUERY_NOISE = 0.25  # norm of the noise added to a unit vector to make a calibration query


class Parts:
    """Sample, train, add and merge for one build (`state`: its run file)."""

    def __init__(self, store, plan: Plan, source, column: str, state: dict, quiet: bool):
        self.store, self.plan, self.source, self.column = store, plan, source, column
        self.state, self.quiet = state, quiet
        self.faiss = X.faiss()
        self.resumed_rows = 0  # input rows committed by an earlier run of this build

    # -- files ----------------------------------------------------------------------------

    def write_index(self, index, name: str) -> None:
        """Write a faiss index under a temporary name and commit it."""
        tmp = _tmp(name)
        self.store.makedirs(name.rpartition("/")[0])
        self.faiss.write_index(index, self.store.path(tmp))
        self.store.commit(tmp, name)

    def read_index(self, name: str):
        """A faiss index file of this directory."""
        return self.faiss.read_index(self.store.path(name))

    def _write_ids(self, table: pa.Table, name: str) -> None:
        tmp = _tmp(name)
        self.store.makedirs(X.IDS_DIR)
        pq.write_table(table, self.store.path(tmp))
        self.store.commit(tmp, name)

    def records(self) -> list[dict]:
        """The committed progress records of this run, in part order."""
        out, base = [], self.state["part_base"]
        while (rec := self.store.read_json(_record(base + len(out)))) is not None:
            out.append(rec)
        return out

    def remove_orphans(self, records: list[dict]) -> None:
        """Drop what a killed run wrote after its last record (parts, ids, temporaries)."""
        first_free = self.state["part_base"] + len(records)
        for name in self.store.list(L.TMP_PREFIX + "*"):
            self.store.unlink(name)
        for folder in (X.PARTS_DIR, X.IDS_DIR, L.PROGRESS_DIR):
            for name in self.store.list(f"{folder}/{L.TMP_PREFIX}*"):
                self.store.unlink(name)
            for name in self.store.list(f"{folder}/*"):
                number = re.search(r"(\d+)\.\w+$", name)
                if number and int(number[1]) >= first_free:
                    self.store.unlink(name)

    # -- the sample and training ------------------------------------------------------------

    def sample(self, want: int) -> np.ndarray:
        """About `want` usable vectors, every n-th row of the input (float32, normalised)."""
        total = self.source.total_rows
        step = max(1, total // max(want, 1))
        out, pos = [], 0
        bar = self._bar(total, "index: sampling")
        for batch in self.source.batches(columns=[self.column], batch_size=SAMPLE_BATCH):
            at = np.arange(pos, pos + batch.num_rows)
            take = pa.array(at[at % step == 0] - pos)
            vecs, ok = X.unit_vectors(batch.column(self.column).take(take))
            out.append(vecs[ok])
            pos += batch.num_rows
            bar.update(batch.num_rows)
        bar.close()
        x = np.concatenate(out) if out else np.zeros((0, self.plan.dim), np.float32)
        return np.ascontiguousarray(x[:want])

    def train(self, seed: int) -> None:
        """Train the IVF index on a sample and commit it empty (`trained.faiss`), once."""
        if self.store.exists(X.TRAINED):
            return
        x = self.sample(self.plan.train_rows)
        index = self.faiss.index_factory(
            self.plan.dim, self.plan.factory(), self.faiss.METRIC_INNER_PRODUCT
        )
        self.faiss.extract_index_ivf(index).cp.seed = seed
        index.train(x)
        self.write_index(index, X.TRAINED)

    def centroids(self, seed: int) -> tuple[list[dict], dict]:
        """k-means centres of a sample as the one part of the index; with what k-means did
        (a rerun after a kill past that part keeps it)."""
        if records := self.records():
            return records, records[0]["kmeans"]
        self.remove_orphans([])
        k, x = self.plan.nlist, self.sample(self.plan.train_rows)
        km = self.faiss.Kmeans(self.plan.dim, k, niter=20, seed=seed, spherical=True)
        km.train(x)
        centres = km.centroids / np.linalg.norm(km.centroids, axis=1, keepdims=True)
        sizes = np.bincount(km.index.search(x, 1)[1][:, 0], minlength=k)
        index = self.faiss.IndexFlatIP(self.plan.dim)
        index.add(np.ascontiguousarray(centres, dtype=np.float32))
        ids = pa.table(
            {
                C.ID: [f"centroid-{i:05d}" for i in range(k)],
                "shard": pa.nulls(k, pa.int32()),
                "row": pa.nulls(k, pa.int64()),
            },
            schema=X.ID_SCHEMA,
        )
        info = {"k": k, "sample_rows": len(x), "sizes": sizes.tolist(), "seed": seed}
        total = self.source.total_rows
        record = {"part": 0, "rows": total, "indexed": k, "skipped": {}, "position": total}
        self._commit_part(index, ids, {**record, "kmeans": info})
        return [record], info

    # -- adding parts -----------------------------------------------------------------------

    def add(self) -> list[dict]:
        """Add the input part by part after the last committed one; every record."""
        records = self.records()
        self.remove_orphans(records)
        position = records[-1]["position"] if records else 0
        self.resumed_rows = position
        label = self.state["label_base"] + sum(r["indexed"] for r in records)
        template = self.read_index(X.TRAINED) if self.plan.kind == "ivf" else None
        bounds = np.cumsum([0] + [s.rows for s in self.source.shards])
        bar = self._bar(self.source.total_rows, "index", initial=position)
        batches = self.source.batches(
            columns=[C.ID, self.column], batch_size=self.plan.part_rows, skip_rows=position
        )
        for batch in batches:
            vecs, ok = X.unit_vectors(batch.column(self.column))
            has_id = ~np.asarray(batch.column(C.ID).is_null())
            reasons = X.unusable_reasons(batch.column(self.column), ok)
            skipped = Counter(
                r if i else "no_id" for r, i in zip(reasons, has_id, strict=True) if r or not i
            )
            ok &= has_id
            at = position + np.flatnonzero(ok)
            shard = np.searchsorted(bounds, at, side="right") - 1
            ids = pa.table(
                {
                    C.ID: batch.column(C.ID).filter(pa.array(ok)),
                    "shard": pa.array(shard + self.state["shard_base"], pa.int32()),
                    "row": pa.array(at - bounds[shard], pa.int64()),
                },
                schema=X.ID_SCHEMA,
            )
            index = self._part_index(template, vecs if ok.all() else vecs[ok], label)
            position += batch.num_rows
            record = {
                "part": self.state["part_base"] + len(records),
                "rows": batch.num_rows,
                "indexed": int(ok.sum()),
                "skipped": dict(sorted(skipped.items())),
                "position": position,
            }
            self._commit_part(index, ids, record)
            records.append(record)
            label += record["indexed"]
            bar.update(batch.num_rows)
        bar.close()
        return records

    def _part_index(self, template, vecs: np.ndarray, label: int):
        if template is None:
            index = self.faiss.IndexFlatIP(self.plan.dim)
            index.add(vecs)
            return index
        index = self.faiss.clone_index(template)
        index.add_with_ids(vecs, np.arange(label, label + len(vecs), dtype=np.int64))
        return index

    def _commit_part(self, index, ids: pa.Table, record: dict) -> None:
        with uninterrupted():  # a signal waits for the part's record
            self._write_ids(ids, X.ids_file(record["part"]))
            self.write_index(index, X.part_file(record["part"]))
            self.store.makedirs(L.PROGRESS_DIR)
            self.store.write_json(_record(record["part"]), record)

    # -- merge and nprobe -------------------------------------------------------------------

    def merge(self, records: list[dict], manifest: dict | None):
        """One index from the existing one (--append) or an empty one, and every part, in
        order; committed as this run's generation."""
        names = [X.part_file(r["part"]) for r in records]
        if self.plan.kind == "ivf":
            base = manifest["files"]["index"] if self.state["append"] else None
            index = self._merge_lists(base, names)
        else:
            index = (
                self.read_index(manifest["files"]["index"])
                if self.state["append"]
                else self.faiss.IndexFlatIP(self.plan.dim)
            )
            for name in names:
                index.merge_from(self.read_index(name), 0)
        self.write_index(index, X.index_file(self.state["generation"]))
        return index

    def _merge_lists(self, base: str | None, names: list[str]):
        """The IVF lists of `base` and the parts copied, in that order, into lists allocated
        once at their final size: growing each list part by part (faiss' merge_from) can
        leave it holding twice its size, and the index is most of a build's memory."""
        sources = ([base] if base else []) + names
        nlist = self.plan.nlist
        sizes = np.zeros(nlist, dtype=np.int64)
        for name in sources:  # first pass: the size of every list
            source = self.read_index(name)  # kept alive while its lists are read
            lists = self.faiss.extract_index_ivf(source).invlists
            sizes += [lists.list_size(i) for i in range(nlist)]
            del lists, source
        index = self.read_index(X.TRAINED)
        ivf = self.faiss.extract_index_ivf(index)
        merged = self.faiss.ArrayInvertedLists(nlist, ivf.code_size)
        for i in np.flatnonzero(sizes):
            merged.resize(int(i), int(sizes[i]))
        filled = np.zeros(nlist, dtype=np.int64)
        for name in sources:
            source = self.read_index(name)
            lists = self.faiss.extract_index_ivf(source).invlists
            for i in range(nlist):
                if n := lists.list_size(i):
                    merged.update_entries(
                        i, int(filled[i]), n, lists.get_ids(i), lists.get_codes(i)
                    )
                    filled[i] += n
            del lists, source
        ivf.replace_invlists(merged, True)
        merged.this.disown()  # the index owns the lists now
        ivf.ntotal = index.ntotal = int(sizes.sum())
        return index

    def calibrate(self, index) -> tuple[int, float]:
        """nprobe for this index, from queries near vectors spread over it: each stored vector
        moved by noise of norm `QUERY_NOISE`, as a query is rarely a copy of a row."""
        ivf = self.faiss.extract_index_ivf(index)
        n = index.ntotal
        if not n:
            return 1, 1.0
        own = np.unique(np.linspace(0, n - 1, min(n, calibration_queries(n))).astype(np.int64))
        ivf.make_direct_map()
        queries = np.stack([index.reconstruct(int(i)) for i in own])
        ivf.set_direct_map_type(self.faiss.DirectMap.NoMap)
        noise = np.random.default_rng(0).standard_normal(queries.shape).astype(np.float32)
        queries += QUERY_NOISE * noise / np.linalg.norm(noise, axis=1, keepdims=True)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        nprobe, reached = calibrate(index, queries, own)
        return nprobe, round(reached, 4)

    def _bar(self, total, desc: str, initial: int = 0):
        from tqdm import tqdm

        return tqdm(
            total=total,
            initial=initial,
            unit="rows",
            disable=self.quiet,
            file=sys.stderr,
            desc=desc,
            dynamic_ncols=True,
            mininterval=0.5,
        )


def _tmp(name: str) -> str:
    head, _, base = name.rpartition("/")
    return f"{head}/{L.TMP_PREFIX}{base}" if head else L.TMP_PREFIX + base


def _record(part: int) -> str:
    return f"{L.PROGRESS_DIR}/{part:05d}.json"
