"""Rebuild a dedup index from the datasets that fed it (`mmtools dedup-index DIR --rebuild-from`).

Each dataset becomes one generation holding the keys of its rows (those not marked
`is_duplicate` by a `dedup --mark` run), made with the settings the index records and kept
as a run keeps them (`Dedup.index_rows`: digests, band codes, quantised embeddings).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.io.fs import is_remote
from mmtools.io.layout import MANIFEST
from mmtools.io.manifest import fingerprint_digest, read_json
from mmtools.steps.dedup.index import INDEX_FILE, SeenIndex
from mmtools.steps.dedup.step import Dedup, DedupConfig


def config_of(settings: dict) -> DedupConfig:
    """The dedup options that make keys as an index's recorded `settings` say."""
    c = DedupConfig(methods=tuple(settings["methods"]))
    if "exact" in settings:
        c.exact_key = "+".join(settings["exact"]["fields"])
    if "phash" in settings:
        c.max_distance, c.phash_flip = settings["phash"]["max_distance"], settings["phash"]["flip"]
    if "minhash" in settings:
        for k, v in settings["minhash"].items():
            setattr(c, k, v)
    if "semantic" in settings:
        c.column, c.eps = settings["semantic"]["column"], settings["semantic"]["eps"]
    return c


def rebuild(
    path: str,
    datasets: list[str],
    open_source: Callable,
    wait: bool = False,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Replace the generations of the index at `path` by one per dataset; return its rows."""
    settings = (read_json(os.path.join(path, INDEX_FILE)) or {}).get("params")
    if settings is None:
        raise UsageError(
            f"{path} records no dedup settings to rebuild with; run `mmtools dedup DATASET "
            f"--index {path} ...` on the datasets instead"
        )
    outputs = [p if is_remote(p) else os.path.abspath(p) for p in datasets]
    seen = SeenIndex(path, wait).open(settings)
    try:
        for dataset, output in zip(datasets, outputs, strict=True):
            source = open_source([dataset])
            step = Dedup(config_of(settings))
            step.output_schema(source.schema)
            if step.settings != settings:
                raise UsageError(f"{dataset} cannot make keys as {path} records them")
            parts = []
            columns = list(dict.fromkeys([*step.scan_columns, C.IS_DUPLICATE]))
            for batch in source.batches(columns=columns):
                if C.IS_DUPLICATE in batch.schema.names:
                    batch = batch.filter(pc.invert(batch.column(C.IS_DUPLICATE)))
                parts.append(step.keys(batch))
                if progress:
                    progress(batch.num_rows)
            source.close()
            empty = pa.table({C.ID: pa.array([], pa.string())})
            keys = step.index_rows(pa.Table.from_batches(parts)) if parts else empty
            manifest = read_json(os.path.join(dataset, MANIFEST)) or {}
            seen.stage(keys, output, fingerprint_digest(manifest.get("fingerprint", {})))
            seen.promote()
        seen.keep_only(outputs)
        return seen.rows
    finally:
        seen.close()
