"""The dataset manifest: shards, counts, schema, lineage; written last and atomically."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import pyarrow as pa

from mmtools import columns as C


def durable() -> bool:
    """Whether commits fsync (default). MMTOOLS_FSYNC=0 skips it: commits stay atomic against
    a killed process, but not against a power loss."""
    return os.environ.get("MMTOOLS_FSYNC", "1") != "0"


def fsync_path(path: str) -> None:
    """fsync a file or directory by path, when durable commits are on."""
    if not durable():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str) -> dict | None:
    """Read a JSON file, or None when it does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_json_atomic(path: str, obj: dict) -> None:
    """Write JSON to a temporary name, fsync, and rename over `path`."""
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path) or ".")


def fingerprint_digest(fingerprint: dict) -> str:
    """A run's fingerprint (as `_run.json` and the manifest hold it) as a short hash."""
    import hashlib

    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def versions() -> dict:
    """Versions of the software that made the data (torch only if it was loaded)."""
    from mmtools import __version__

    out = {"mmtools": __version__, "pyarrow": pa.__version__, "python": platform.python_version()}
    for mod in ("torch", "open_clip", "transformers", "polars"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "unknown")
    return out


def schema_text(schema: pa.Schema) -> str:
    """A schema as text for a JSON manifest (its Arrow IPC message, base64): types exactly."""
    import base64

    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_text(text: str) -> pa.Schema:
    """The schema `schema_text` wrote."""
    import base64

    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def schema_fields(schema: pa.Schema) -> list[dict]:
    """A readable description of the schema."""
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def build_manifest(
    records, schema, fingerprint, command, summary, lineage, column_info, position
) -> dict:
    """Assemble the manifest from the committed progress records."""
    reasons: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for r in records:
        for k, v in r["reject_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
        for k, v in r["dropped"].items():
            dropped[k] = dropped.get(k, 0) + v
    shards = [shard_entry(r) for r in records if r["shard"]]
    return {
        "format": "mmtools-dataset/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "fingerprint": fingerprint,
        "versions": versions(),
        "schema": schema_fields(schema),
        "columns": {**C.column_info(schema), **column_info},
        "rows": sum(s["rows"] for s in shards),
        "shards": shards,
        "rejects": {
            "rows": sum(reasons.values()),
            "by_reason": reasons,
            "shards": [r["rejects"] for r in records if r["rejects"]],
        },
        "dropped": dropped,
        "ledger": {
            "rows": sum(r.get("drop_rows", 0) for r in records),
            "shards": [r["drops"] for r in records if r.get("drops")],
        },
        "generated": sum(r.get("generated", 0) for r in records),
        "stats": run_stats(records),
        "position": position.as_dict(),
        "summary": summary,
        "lineage": lineage,
    }


def shard_entry(record: dict) -> dict:
    """A data shard in the manifest: its rows, bytes and lineage, and the stats of the commit
    unit that made it (rows rejected by reason beside it, seconds it took)."""
    return {
        "name": record["shard"],
        "rows": record["rows"],
        "bytes": record["bytes"],
        "inputs": record["inputs"],
        "rejected": record.get("rejected", 0),
        "reject_reasons": record.get("reject_reasons", {}),
        "seconds": record.get("seconds", 0.0),
    }


def run_stats(records: list[dict]) -> dict:
    """Successes, failures, success rate, bytes written and seconds over commit units."""
    ok = sum(r["rows"] for r in records)
    failed = sum(r.get("rejected", 0) for r in records)
    return {
        "succeeded": ok,
        "failed": failed,
        "success_rate": round(ok / (ok + failed), 4) if ok + failed else None,
        "bytes": sum(r["bytes"] for r in records),
        "seconds": round(sum(r.get("seconds", 0.0) for r in records), 3),
    }
