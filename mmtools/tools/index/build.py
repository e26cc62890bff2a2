"""`mmtools index`: build, resume and append to an index of one embedding column.

The lifecycle mirrors a dataset's: a lock on the directory, a run file naming what is being
built (command, options, input and the plan), parts committed one at a time, then the index
file and, last, `_index.json`. A rerun of the same command resumes after the last committed
part; a finished index is left alone; another command, input or model behind the same
directory is refused (exit 6) unless `--overwrite`. `--append` adds a new input's rows to a
finished index as the next generation: the old index stays valid until the new manifest is
committed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

from mmtools import columns as C
from mmtools.errors import DriftError, UsageError, uninterrupted
from mmtools.io import index as X
from mmtools.io import layout as L
from mmtools.io.fs import store
from mmtools.sizes import human_bytes
from mmtools.tools.index.parts import Parts
from mmtools.tools.index.plan import Plan, centroids_plan, choose

log = logging.getLogger("mmtools")


@dataclass
class IndexConfig:
    """What `mmtools index` builds: which column, within which memory, how."""

    column: str | None = None  # None: image_embedding, or the index's own with --append
    max_memory: int = 4 << 30
    exact_below: int = 100_000
    part_rows: int | None = None
    kmeans: int | None = None
    seed: int = 0
    append: bool = False

    def params(self) -> dict:
        """The options that change what is built (for the resume fingerprint)."""
        if self.append:
            return {"column": self.column, "append": True}
        keys = ("column", "max_memory", "exact_below", "part_rows", "kmeans", "seed")
        return {k: getattr(self, k) for k in keys}


@dataclass
class BuildReport:
    """What one run did, for the summary line and --json."""

    output: str
    rows_in: int = 0
    indexed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    resumed_from: int = 0
    rows_total: int = 0
    factory: str = ""
    nprobe: int | None = None
    recall: float | None = None
    bytes: int = 0
    seconds: float = 0.0
    appended: bool = False
    already_complete: bool = False

    def line(self) -> str:
        """One summary line."""
        if self.already_complete:
            return f"mmtools index: {self.output} is already complete; nothing to do"
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        parts = [
            f"{self.rows_in} in",
            f"{self.indexed} {'appended' if self.appended else 'indexed'}",
            f"{sum(self.skipped.values())} skipped" + (f" ({skipped})" if skipped else ""),
        ]
        if self.resumed_from:
            parts.append(f"resumed after {self.resumed_from} rows")
        kind = "exact" if self.factory == "Flat" else self.factory
        if self.nprobe is not None:
            kind += f", nprobe {self.nprobe} (recall@10 ~{self.recall:.2f} vs all lists)"
        parts += [
            f"{self.rows_total} vectors",
            kind,
            human_bytes(self.bytes),
            f"{self.seconds:.1f} s",
        ]
        return "mmtools index: " + ", ".join(parts) + f" -> {self.output}"

    def as_dict(self) -> dict:
        """JSON-ready."""
        return dict(self.__dict__)


class IndexBuild:
    """One run of `mmtools index` on one index directory."""

    def __init__(
        self,
        path: str,
        config: IndexConfig,
        *,
        overwrite: bool = False,
        wait_lock: bool = False,
        argv: list[str] | None = None,
        quiet: bool = False,
    ):
        X.check_local(path)
        X.faiss()  # a missing faiss is refused before the index directory is made
        if overwrite and config.append:
            raise UsageError("--overwrite starts a new index; it cannot go with --append")
        if config.append and config.kmeans:
            raise UsageError("--kmeans builds a new index of centres; it cannot go with --append")
        self.path, self.config, self.overwrite = path, config, overwrite
        self.wait_lock, self.argv, self.quiet = wait_lock, argv or [], quiet
        self.store = store(path)

    def run(self, source) -> BuildReport:
        """Build (or resume, or append) from `source`; return what was done."""
        if source.shards is None:
            raise UsageError("index reads its input twice: give a dataset or Parquet files, not -")
        t0 = time.monotonic()
        self.store.makedirs()
        lock = self.store.lock(self.wait_lock)
        lock.acquire()
        try:
            report = self._run(source)
        finally:
            lock.release()
        report.seconds = time.monotonic() - t0
        return report

    def _run(self, source) -> BuildReport:
        report = BuildReport(self.path, appended=self.config.append)
        if self.overwrite:
            self._clear()
        manifest = self.store.read_json(X.MANIFEST)
        if self.config.append and self.config.column is None and manifest:
            self.config.column = manifest["column"]
        self.config.column = self.config.column or C.IMAGE_EMBEDDING
        dim = X.embedding_dim(source.schema, self.config.column, "index")
        model = C.column_info(source.schema).get(self.config.column)
        if model is None:
            log.warning(
                "%s carries no model metadata; the index cannot check queries", self.config.column
            )
        state = self._open(source, manifest, dim, model)
        if state is None:
            report.already_complete = True
            return report
        plan = Plan.from_dict(state["plan"])
        work = Parts(self.store, plan, source, self.config.column, state, self.quiet)
        kmeans = None
        if plan.kind == "centroids":
            records, kmeans = work.centroids(self.config.seed)
        else:
            if plan.kind == "ivf":
                work.train(self.config.seed)
            records = work.add()
        index = work.merge(records, manifest)
        nprobe, reached = work.calibrate(index) if plan.kind == "ivf" else (None, None)
        new = self._manifest(manifest, state, source, model, records, (nprobe, reached), kmeans)
        with uninterrupted():
            self.store.write_json(X.MANIFEST, new)
        self._cleanup(new)
        report.resumed_from = work.resumed_rows
        report.rows_in = sum(r["rows"] for r in records)
        report.indexed = sum(r["indexed"] for r in records)
        for r in records:
            for k, v in r["skipped"].items():
                report.skipped[k] = report.skipped.get(k, 0) + v
        report.rows_total, report.factory = new["rows"], plan.factory()
        report.nprobe, report.recall = nprobe, reached
        report.bytes = self.store.size(new["files"]["index"])
        return report

    # -- opening: resume, complete, drift -----------------------------------------------------

    def _fingerprint(self, source) -> dict:
        fp = {
            "command": "index --append" if self.config.append else "index",
            "params": self.config.params(),
            "inputs": source.identity(),
            "input_schema": [[f.name, str(f.type)] for f in source.schema],
        }
        return json.loads(json.dumps(fp, default=str))  # as it reads back from the run file

    def _open(self, source, manifest: dict | None, dim: int, model: dict | None) -> dict | None:
        """The run to carry out (resumed or new), or None when the index is already complete."""
        fp = self._fingerprint(source)
        run = self.store.read_json(L.RUN_FILE)
        if run is not None and manifest is not None and run["generation"] <= manifest["generation"]:
            self._cleanup(manifest)  # a committed run killed while tidying up
            run = None
        if run is not None:
            if run["fingerprint"] != fp:
                raise DriftError(
                    f"{self.path} holds an unfinished build of another command or input "
                    f"({_difference(run['fingerprint'], fp)}); rerun that command to finish "
                    "it, or pass --overwrite to start over"
                )
            return run
        if self.config.append:
            if not self._check_append(manifest, source, dim, model):
                return None
            plan = Plan.from_dict(manifest["plan"])
            if self.config.part_rows:
                plan = Plan(**{**plan.__dict__, "part_rows": self.config.part_rows})
            base = {
                "generation": manifest["generation"] + 1,
                "part_base": len(manifest["files"]["ids"]),
                "label_base": manifest["rows"],
                "shard_base": len(manifest["shards"]),
            }
        else:
            if manifest is not None:
                if manifest["fingerprint"] == fp:
                    return None
                raise DriftError(
                    f"{self.path} is an index of another command, input or model "
                    f"({_difference(manifest['fingerprint'], fp)}); use --overwrite to "
                    "rebuild it, or --append to add this input to it"
                )
            self._refuse_foreign()
            plan = self._plan(source, dim)
            base = {"generation": 0, "part_base": 0, "label_base": 0, "shard_base": 0}
        run = {"fingerprint": fp, "command": self.argv, "plan": plan.as_dict(), **base}
        run["append"] = self.config.append
        self.store.write_json(L.RUN_FILE, run)
        return run

    def _plan(self, source, dim: int) -> Plan:
        c, rows = self.config, source.total_rows
        if c.kmeans is not None:
            return centroids_plan(rows, dim, c.kmeans, c.max_memory)
        return choose(rows, dim, c.max_memory, c.exact_below, c.part_rows)

    def _check_append(self, manifest, source, dim: int, model: dict | None) -> bool:
        """Whether `source` may be appended (False: it already is); refusals as errors."""
        if manifest is None:
            raise UsageError(
                f"{self.path} holds no finished index to append to; build it first "
                "(mmtools index DATASET -o INDEX, without --append)"
            )
        if manifest["plan"]["kind"] == "centroids":
            raise UsageError(f"{self.path} holds k-means centres; rebuild it to add rows")
        old = manifest.get("model") or {}
        if self.config.column != manifest["column"] or dim != manifest["dim"]:
            raise DriftError(
                f"{self.path} indexes {manifest['column']} ({manifest['dim']} dimensions); "
                f"the input's {self.config.column} has {dim}: build a separate index"
            )
        if old and model and _model_key(old) != _model_key(model):
            raise DriftError(
                f"{self.path} holds embeddings of {describe(old)}, the input's are of "
                f"{describe(model)}: their similarities mean nothing together; re-embed the "
                "input with that model or build a separate index"
            )
        identity = source.identity()
        return not any(d["identity"] == identity for d in manifest["datasets"])

    def _refuse_foreign(self) -> None:
        ours = {L.LOCK_FILE, L.TMP_PREFIX + L.RUN_FILE}
        foreign = [n for n in self.store.names() if n not in ours]
        if foreign:
            raise UsageError(
                f"{self.path} is not empty and holds no mmtools index (found {foreign[0]}); "
                "choose an empty or new directory, or pass --overwrite"
            )

    # -- committing ---------------------------------------------------------------------------

    def _manifest(self, old, state, source, model, records, tuned, kmeans) -> dict:
        from mmtools.io.manifest import versions

        indexed = sum(r["indexed"] for r in records)
        skipped: dict[str, int] = {}
        for r in records:
            for k, v in r["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
        shards = [
            {
                "path": os.path.abspath(s.path),
                "rows": s.rows,
                "size": s.size,
                "mtime_ns": s.mtime_ns,
            }
            for s in source.shards
        ]
        dataset = {
            "inputs": sorted({os.path.dirname(s["path"]) for s in shards}),
            "identity": source.identity(),
            "fingerprint": _dataset_fingerprint(source),
            "rows": sum(r["rows"] for r in records),
            "indexed": indexed,
            "skipped": skipped,
            "labels": [state["label_base"], state["label_base"] + indexed],
            "command": self.argv,
        }
        base = old if state["append"] else {}
        new = {
            "format": X.FORMAT,
            "created": base.get("created") or _now(),
            "updated": _now(),
            "command": base.get("command") or self.argv,
            "fingerprint": base.get("fingerprint") or state["fingerprint"],
            "column": self.config.column,
            "dim": state["plan"]["dim"],
            "metric": "inner_product",
            "model": base.get("model") or model or {},
            "plan": base.get("plan") or state["plan"],
            "nprobe": tuned[0],
            "recall_estimate": tuned[1],
            "rows": state["label_base"] + indexed,
            "generation": state["generation"],
            "files": {
                "index": X.index_file(state["generation"]),
                "ids": [
                    *base.get("files", {}).get("ids", []),
                    *(X.ids_file(r["part"]) for r in records),
                ],
            },
            "shards": [*base.get("shards", []), *shards],
            "datasets": [*base.get("datasets", []), dataset],
            "versions": {**versions(), "faiss": X.faiss().__version__},
        }
        if kmeans is not None:
            new["kmeans"] = kmeans
        return new

    def _cleanup(self, manifest: dict) -> None:
        """After the manifest: drop the run's bookkeeping and files no generation needs."""
        keep = {manifest["files"]["index"], *manifest["files"]["ids"]}
        for d in (X.PARTS_DIR, L.PROGRESS_DIR):
            self.store.rmtree(d)
        for pattern in ("index-*.faiss", f"{X.IDS_DIR}/*", L.TMP_PREFIX + "*"):
            for name in self.store.list(pattern):
                if name not in keep:
                    self.store.unlink(name)
        self.store.unlink(L.RUN_FILE)

    def _clear(self) -> None:
        for d in (X.PARTS_DIR, X.IDS_DIR, L.PROGRESS_DIR):
            self.store.rmtree(d)
        for pattern in ("index-*.faiss", X.TRAINED, X.MANIFEST, L.RUN_FILE, L.TMP_PREFIX + "*"):
            for name in self.store.list(pattern):
                self.store.unlink(name)


def _model_key(info: dict) -> tuple:
    return info.get("model"), info.get("pretrained")


def describe(info: dict) -> str:
    """A model as people read it: name (weights)."""
    pretrained = info.get("pretrained")
    return f"{info.get('model')}" + (f" ({pretrained})" if pretrained else "")


def _difference(old: dict, new: dict) -> str:
    for key in ("command", "params", "inputs", "input_schema"):
        if old.get(key) != new.get(key):
            if key == "params":
                keys = sorted(
                    k for k in {**old[key], **new[key]} if old[key].get(k) != new[key].get(k)
                )
                return f"options differ: {', '.join(keys)}"
            return f"{key} differ" if key.endswith("s") else f"{key} differs"
    return "fingerprint differs"


def _dataset_fingerprint(source) -> str:
    """A digest of the input: its files' identity and, for a dataset, what made it."""
    made = []
    for d in sorted({os.path.dirname(s.path) for s in source.shards}):
        made.append((store(d).read_json(L.MANIFEST) or {}).get("fingerprint"))
    blob = json.dumps([source.identity(), made], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
