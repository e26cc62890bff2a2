"""`mmtools search`: a query's vector, its nearest rows in an index, and those rows' data.

A text or image query is embedded by the model recorded in the index (never another one);
an `--id` query takes that row's own embedding from the dataset it came from (or, when that
is gone, the vector stored in the index). Hits are read back from the indexed dataset, only
the row groups that hold them, after checking that the files are the ones indexed.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import DataContractError, UsageError
from mmtools.io.index import IndexReader, unit_vectors
from mmtools.io.rows import schema_of, take_rows
from mmtools.tools.index.build import describe

log = logging.getLogger("mmtools")

RANK = "rank"  # of a hit in the printed table and in --json (not a dataset column)


def check_model(reader: IndexReader, model: str | None, pretrained: str | None) -> dict:
    """The model queries are embedded with: the index's own; another one is refused."""
    info = dict(reader.model)
    if not info:
        if model is None:
            raise UsageError(
                f"{reader.path} records no embedding model; query it with --id, or name the "
                "model that made its embeddings with --model"
            )
        return {"model": model, "pretrained": pretrained}
    if model is not None and model != info.get("model"):
        raise UsageError(
            f"{reader.path} holds embeddings of {describe(info)}; a query embedded by {model} "
            "cannot be compared with them (leave out --model, or build an index with that model)"
        )
    if pretrained is not None and pretrained != info.get("pretrained"):
        if not os.path.exists(pretrained):
            raise UsageError(
                f"{reader.path} holds embeddings of {describe(info)}, not of weights "
                f"{pretrained!r}; leave out --pretrained, or pass a local copy of those weights"
            )
        info["pretrained"] = os.path.abspath(pretrained)  # the same weights, moved
    return info


def query_vector(
    reader: IndexReader,
    *,
    text: str | None = None,
    image: str | None = None,
    row_id: str | None = None,
    device: str = "auto",
    model: str | None = None,
    pretrained: str | None = None,
) -> np.ndarray:
    """The query as a (1, dim) float32 unit vector."""
    if sum(q is not None for q in (text, image, row_id)) != 1:
        raise UsageError("give exactly one query: --text TEXT, --image FILE or --id ID")
    if row_id is not None:
        vec = _row_vector(reader, row_id)
    else:
        from mmtools.models import query

        info = check_model(reader, model, pretrained)
        vec = (
            query.embed_text(info, text, device)
            if text is not None
            else query.embed_image(info, _image(image), device)
        )
    if vec.shape[1] != reader.dim:
        raise DataContractError(
            f"the query has {vec.shape[1]} dimensions, {reader.path} holds {reader.dim}"
        )
    return vec


def _image(path: str):
    from mmtools.media import MediaError, decode_image, read

    try:
        return decode_image(read({"bytes": None, "path": os.path.abspath(path)}, "image"))
    except MediaError as e:
        raise UsageError(f"--image {path}: {e.reason} ({e.detail})") from None


def _row_vector(reader: IndexReader, row_id: str) -> np.ndarray:
    label = reader.label(row_id)
    if label is None:
        raise UsageError(f"no row with id {row_id!r} in {reader.path}")
    if reader.kind == "centroids":
        return reader.vector(label)[None, :].astype(np.float32)
    try:
        rows = fetch(reader, np.array([label]), [C.ID, reader.column])
        vec, ok = unit_vectors(rows.column(reader.column))
        if ok.all():
            return vec
    except (OSError, DataContractError) as e:
        log.warning("cannot read %s from its dataset (%s); using the index's copy", row_id, e)
    return reader.vector(label)[None, :].astype(np.float32)


def find(reader: IndexReader, vec: np.ndarray, k: int, nprobe: int | None = None) -> pa.Table:
    """The `k` nearest rows: rank, label, similarity, and their id, shard and row."""
    sims, labels = reader.search(vec, k, nprobe)
    keep = labels[0] >= 0
    labels, sims = labels[0][keep], sims[0][keep]
    where = reader.ids().take(pa.array(labels))
    return pa.table(
        {
            RANK: pa.array(np.arange(1, len(labels) + 1), pa.int32()),
            "label": pa.array(labels, pa.int64()),
            C.SIMILARITY: pa.array(np.clip(sims, -1, 1), pa.float32()),
            C.ID: where.column(C.ID),
            "shard": where.column("shard"),
            "row": where.column("row"),
        }
    )


def fetch(reader: IndexReader, labels: np.ndarray, columns: list[str] | None = None) -> pa.Table:
    """The dataset rows behind `labels`, in that order (`columns`: those that exist; None:
    all), after checking the files are the ones indexed and the ids match."""
    where = reader.ids().take(pa.array(labels, pa.int64()))
    shard = np.asarray(where.column("shard").fill_null(-1))
    if (shard < 0).any():
        raise UsageError(f"{reader.path} holds k-means centres, not rows of a dataset")
    row = np.asarray(where.column("row"))
    shards = reader.shards()
    pieces, order = [], []
    for s in np.unique(shard):
        info = shards[s]
        _check_unchanged(reader, info)
        names = schema_of(info["path"]).names
        cols = None if columns is None else [c for c in names if c in columns]
        at = np.flatnonzero(shard == s)
        pieces.append(take_rows(info["path"], row[at].tolist(), cols))
        order.append(at)
    table = _unify(pieces)
    inverse = np.empty(len(labels), dtype=np.int64)
    inverse[np.concatenate(order)] = np.arange(len(labels))
    table = table.take(pa.array(inverse))
    if table.column(C.ID).to_pylist() != where.column(C.ID).to_pylist():
        raise DataContractError(_stale(reader))
    return table


def hit_rows(reader: IndexReader, hits: pa.Table, columns: list[str] | None = None) -> pa.Table:
    """The hits' dataset rows with their similarity, in rank order."""
    rows = fetch(reader, np.asarray(hits.column("label")), columns)
    rows = rows.drop_columns([c for c in (C.SIMILARITY,) if c in rows.column_names])
    return rows.append_column(C.SIMILARITY, hits.column(C.SIMILARITY))


def _check_unchanged(reader: IndexReader, info: dict) -> None:
    from mmtools.io.fs import stat

    try:
        size, mtime = stat(info["path"])
    except OSError:
        raise DataContractError(
            f"{info['path']}, indexed in {reader.path}, is gone; rebuild the index"
        ) from None
    if (size, mtime) != (info["size"], info["mtime_ns"]):
        raise DataContractError(_stale(reader))


def _stale(reader: IndexReader) -> str:
    return (
        f"{reader.path} is out of date: a dataset it indexed changed since; rebuild it "
        "(mmtools index ... --overwrite)"
    )


def _unify(pieces: list[pa.Table]) -> pa.Table:
    """Concatenate rows of several input files (appended datasets may differ in columns)."""
    try:
        return pa.concat_tables(pieces, promote_options="default")
    except pa.ArrowInvalid as e:
        raise DataContractError(f"the hits' datasets do not share a schema: {e}") from None


def table_rows(hits: pa.Table, rows: pa.Table | None) -> list[dict]:
    """Hits as plain rows for the table and --json: rank, id, similarity, caption, source."""
    out = []
    for i, (rank, rid, sim) in enumerate(
        zip(
            hits.column(RANK).to_pylist(),
            hits.column(C.ID).to_pylist(),
            hits.column(C.SIMILARITY).to_pylist(),
            strict=True,
        )
    ):
        row = {RANK: rank, C.ID: rid, C.SIMILARITY: round(sim, 4)}
        for name, col in (("caption", C.TEXT), (C.SOURCE, C.SOURCE)):
            has = rows is not None and col in rows.column_names
            row[name] = rows.column(col)[i].as_py() if has else None
        out.append(row)
    return out


def write_hits(sink, rows: pa.Table, fingerprint: dict, info: dict, argv: list[str]) -> bool:
    """Write the hit rows as a dataset (or an Arrow stream); False when that output is
    already complete."""
    from mmtools.io.dataset import Position

    schema = C.with_metadata(rows.schema.remove_metadata(), info)
    sink.open(schema, fingerprint, lambda start, end: [])
    if sink.complete:
        sink.close({}, [], info)
        return False
    try:
        done = 0
        for batch in rows.cast(schema).to_batches():
            done += batch.num_rows
            sink.write(batch, [], {}, Position(done))
        summary = {"command": "search", "rows_out": rows.num_rows}
        sink.close(summary, [{"argv": argv, **summary}], info)
    except BaseException:
        sink.abort()
        raise
    return True
