"""A description of a dataset for `info`: counts, schema, rejects and lineage."""

from __future__ import annotations

from mmtools import columns as C
from mmtools.io.fs import store
from mmtools.io.layout import MANIFEST, RUN_FILE
from mmtools.io.manifest import schema_fields


def describe(source, inputs: list[str]) -> dict:
    """Rows, shards, bytes, schema, column provenance, rejects and lineage of a source."""
    desc: dict = {"schema": schema_fields(source.schema), "columns": C.column_info(source.schema)}
    if source.shards is None:
        rows = sum(b.num_rows for b in source.batches())
        desc.update(rows=rows, shards=0, bytes=0, lineage=source.upstream)
        return desc
    desc.update(
        rows=sum(s.rows for s in source.shards),
        shards=len(source.shards),
        bytes=sum(s.size for s in source.shards),
        lineage=source.upstream,
    )
    if len(inputs) == 1 and source.dataset_dir:
        st = store(inputs[0])
        manifest = st.read_json(MANIFEST)
        desc["complete"] = manifest is not None
        if manifest:
            desc["rejects"] = manifest["rejects"]
            desc["dropped"] = manifest["dropped"]
            desc["columns"] = {**desc["columns"], **manifest.get("columns", {})}
            desc["created"] = manifest["created"]
            desc["versions"] = manifest["versions"]
            desc.update(_stats(manifest))
        elif st.exists(RUN_FILE):
            desc["complete"] = False
    return desc


def _stats(manifest: dict) -> dict:
    """Successes, failures and time overall and per shard, and the retry generations."""
    out = {"shard_stats": manifest["shards"]}
    if "stats" in manifest:
        out["stats"] = manifest["stats"]
    if manifest.get("retries"):
        out["retries"] = manifest["retries"]
    return out
