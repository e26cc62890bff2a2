"""Retry generations: rows of a finished dataset re-attempted and committed beside it.

A finished dataset's rejected rows can be run again (`ingest --retry-failed`). The rows that
now succeed are written as new shards numbered after the existing ones, with their own
progress records, exactly like a run (a killed retry resumes the same way); `_retry.json`
names the generation and its first shard index. Last, the manifest is rewritten in one
atomic step: the new shards added, the retried rows taken out of the old reject shards
(rewritten under new names, so the previous manifest stays readable until the switch) and
the rows that failed again listed with the generation's own reject shards.
"""

from __future__ import annotations

import datetime
import hashlib
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmtools import columns as C
from mmtools.errors import DriftError, UsageError
from mmtools.io import layout as L
from mmtools.io.dataset import DatasetSink, Position, _first_difference, _reason_counts
from mmtools.io.fs import store
from mmtools.io.manifest import run_stats, shard_entry, versions

INDEX = re.compile(r"part-(\d+)")
GENERATION = re.compile(r"(-r\d+)?\.parquet$")  # a reject shard rewritten by generation N


def generation(manifest: dict) -> int:
    """How many retry generations a finished dataset has had."""
    return len(manifest.get("retries", []))


def finished_rejects(path: str) -> tuple[dict, pa.Table]:
    """The manifest of a finished dataset and all its reject rows."""
    st = store(path)
    manifest = st.read_json(L.MANIFEST)
    if manifest is None:
        raise UsageError(
            f"--retry-failed needs a finished output, and {path} has no {L.MANIFEST}; "
            "rerun the command without --retry-failed to finish it first"
        )
    tables = [
        pq.read_table(st.path(name), filesystem=st.filesystem())
        for name in manifest["rejects"]["shards"]
    ]
    if not tables:
        return manifest, C.REJECT_SCHEMA.empty_table()
    return manifest, pa.concat_tables(tables, promote_options="permissive")


class RetrySink(DatasetSink):
    """Add retry generation `generation` (of the rows `ids`) to the finished dataset `path`."""

    def __init__(self, path: str, *, ids: list[str], generation: int, **options):
        super().__init__(path, **options)
        self.ids = ids
        self.generation = generation

    def _open(self, schema: pa.Schema, fingerprint: dict, locate) -> Position:
        self.schema, self.fingerprint = schema, fingerprint
        base = self.store.read_json(L.MANIFEST)
        if base is None or generation(base) + 1 != self.generation:
            raise UsageError(f"{self.path} changed while --retry-failed started; run it again")
        if base.get("fingerprint") != fingerprint:
            raise DriftError(
                f"{self.path} was made by a different command, input or model "
                f"({_first_difference(base.get('fingerprint'), fingerprint)}); --retry-failed "
                "takes the command line that made it"
            )
        self.base = base
        gen = self.generation
        self._locate = lambda start, end: [{"retry": gen, "start": start, "end": end}]
        digest = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()
        state = self.store.read_json(L.RETRY_FILE)
        if state is None or (state.get("generation"), state.get("ids")) != (gen, digest):
            self.store.rmtree(L.PROGRESS_DIR)  # a finished generation's leftovers, if any
            state = {"generation": gen, "ids": digest, "base": _next_index(base)}
            self.store.write_json(L.RETRY_FILE, state)
        self._base = state["base"]
        return self._resume()

    def _kept(self) -> set[str]:
        ledger = set(self.base.get("ledger", {}).get("shards", []))
        return (
            {s["name"] for s in self.base["shards"]} | set(self.base["rejects"]["shards"]) | ledger
        )

    def _complete(self, summary: dict, lineage: list[dict], column_info: dict) -> None:
        if self.complete:
            return
        self._commit()
        rejects, removed, superseded = self._rewrite_rejects()
        self.manifest = self._merged(summary, lineage, rejects, removed)
        self.store.write_json(L.MANIFEST, self.manifest)
        self.complete = True
        for name in superseded:
            self.store.unlink(name)
        self.store.unlink(L.RETRY_FILE)
        self._finish_cleanup()

    def _rewrite_rejects(self) -> tuple[list[str], dict[str, int], list[str]]:
        """The finished reject shards without the retried rows (new names where changed),
        then this generation's; the reasons taken out; the shards they replace."""
        ids = pa.array(self.ids, pa.string())
        names, removed, superseded = [], {}, []
        for name in self.base["rejects"]["shards"]:
            table = pq.read_table(self.store.path(name), filesystem=self.store.filesystem())
            hit = pc.is_in(table.column(C.ID), value_set=ids)
            if not pc.any(hit).as_py():
                names.append(name)
                continue
            for reason, n in _reason_counts(table.filter(hit).to_batches()).items():
                removed[reason] = removed.get(reason, 0) + n
            superseded.append(name)
            rest = table.filter(pc.invert(hit))
            if rest.num_rows:
                new = GENERATION.sub(f"-r{self.generation}.parquet", name)
                tmp = f"{L.REJECTS_DIR}/{L.TMP_PREFIX}{new.rsplit('/', 1)[-1]}"
                self._write_table(rest, tmp)
                self.store.commit(tmp, new)
                names.append(new)
        names += [r["rejects"] for r in self.records if r["rejects"]]
        return names, removed, superseded

    def _merged(self, summary: dict, lineage: list[dict], rejects: list[str], removed) -> dict:
        """The finished manifest with this generation's shards, rejects, stats and lineage."""
        base, new = self.base, self.records
        by_reason = dict(base["rejects"]["by_reason"])
        for reason, n in removed.items():
            by_reason[reason] -= n
        for r in new:
            for reason, n in r["reject_reasons"].items():
                by_reason[reason] = by_reason.get(reason, 0) + n
        by_reason = {k: v for k, v in by_reason.items() if v}
        shards = base["shards"] + [shard_entry(r) for r in new if r["shard"]]
        stats = run_stats(new)
        retry = {"generation": self.generation, "retried": len(self.ids), **stats}
        total = sum(by_reason.values())
        rows = sum(s["rows"] for s in shards)
        seconds = base.get("stats", {}).get("seconds", 0.0) + stats["seconds"]
        return {
            **base,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "rows": rows,
            "shards": shards,
            "rejects": {"rows": total, "by_reason": by_reason, "shards": rejects},
            "stats": {
                "succeeded": rows,
                "failed": total,
                "success_rate": round(rows / (rows + total), 4) if rows + total else None,
                "bytes": sum(s["bytes"] for s in shards),
                "seconds": round(seconds, 3),
            },
            "retries": [*base.get("retries", []), retry],
            "summary": summary,
            "lineage": [*base.get("lineage", []), *lineage],
        }


def _next_index(manifest: dict) -> int:
    """The first commit-unit index after every shard and reject shard of `manifest`."""
    names = [s["name"] for s in manifest["shards"]] + manifest["rejects"]["shards"]
    names += manifest.get("ledger", {}).get("shards", [])
    found = [int(m.group(1)) for n in names if (m := INDEX.search(n))]
    return max(found, default=-1) + 1
