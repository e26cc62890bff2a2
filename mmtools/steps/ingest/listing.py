"""What `ingest` reads: media folders with sidecar captions, listing files, WebDataset tars.

Each input becomes a listing (one row per sample: id, kind, where the bytes are, caption or
sidecar), sorted and deterministic, served through the same interface as a dataset source
so that ingest resumes, shards and reports like every other step.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass

import pyarrow as pa

from mmtools.errors import UsageError
from mmtools.media import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS

LISTING_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("kind", pa.string()),  # image | audio | none
        ("location", pa.string()),  # file path, URL, or tar file
        ("offset", pa.int64()),  # byte offset inside a tar, else null
        ("size", pa.int64()),
        ("caption", pa.string()),
        ("sidecar", pa.string()),  # path of a .txt/.json caption file, else null
    ]
)
LISTING_SUFFIXES = {".csv", ".tsv", ".jsonl", ".ndjson", ".parquet"}
PATH_COLUMNS = ("url", "path", "image", "audio", "file", "filepath", "filename")
CAPTION_COLUMNS = ("caption", "text", "alt", "alt_text", "title")


def media_kind(name: str) -> str | None:
    """'image' or 'audio' by file extension, else None."""
    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in AUDIO_EXTENSIONS:
        return "audio"
    return None


@dataclass
class ListingOptions:
    """How to read listing files."""

    path_col: str | None = None
    caption_col: str | None = None
    id_col: str | None = None


def build_listing(inputs: list[str], opts: ListingOptions) -> pa.Table:
    """Turn folders, listing files and tars into one sorted listing table."""
    tables = []
    for spec in inputs:
        if os.path.isdir(spec):
            tables.append(_folder(spec))
        elif spec.endswith(".tar"):
            tables.append(_tar(spec))
        elif os.path.splitext(spec)[1].lower() in LISTING_SUFFIXES:
            tables.append(_listing_file(spec, opts))
        elif os.path.exists(spec):
            raise UsageError(
                f"cannot ingest {spec}: expected a folder, a .tar WebDataset shard, or a "
                f"{'/'.join(sorted(LISTING_SUFFIXES))} listing (compressed tars: decompress first)"
            )
        else:
            raise UsageError(f"input {spec} does not exist")
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()


def _rows_to_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in LISTING_SCHEMA]
    return pa.table(
        [pa.array(c, f.type) for c, f in zip(cols, LISTING_SCHEMA, strict=True)],
        schema=LISTING_SCHEMA,
    )


def _folder(root: str) -> pa.Table:
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        for name in sorted(filenames):
            kind = media_kind(name)
            if kind is None:
                continue
            path = os.path.join(dirpath, name)
            stem = os.path.splitext(name)[0]
            sidecar = next((s for s in (stem + ".txt", stem + ".json") if s in names), None)
            rows.append(
                (
                    os.path.relpath(path, root),
                    kind,
                    path,
                    None,
                    os.path.getsize(path),
                    None,
                    os.path.join(dirpath, sidecar) if sidecar else None,
                )
            )
    return _rows_to_table(rows)


def _tar(path: str) -> pa.Table:
    import json

    groups: dict[str, dict] = {}
    stem = os.path.splitext(os.path.basename(path))[0]
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
            ext = "." + base.split(".", 1)[1] if "." in base else ""
            g = groups.setdefault(key, {})
            if media_kind(base) and "media" not in g:
                g["media"] = (media_kind(base), m.offset_data, m.size)
            elif ext == ".txt":
                g["caption"] = tf.extractfile(m).read().decode("utf-8", errors="replace")
            elif ext == ".json" and "caption" not in g:
                try:
                    meta = json.loads(tf.extractfile(m).read())
                    g["caption"] = meta.get("caption") if isinstance(meta, dict) else None
                except ValueError:
                    pass
    rows = []
    for key in sorted(groups):
        g = groups[key]
        kind, offset, size = g.get("media", ("none", None, None))
        rows.append((f"{stem}/{key}", kind, path, offset, size, g.get("caption"), None))
    return _rows_to_table(rows)


def _pick(names: list[str], wanted: str | None, candidates: tuple, what: str, path: str) -> str:
    if wanted:
        if wanted not in names:
            raise UsageError(f"{path} has no column {wanted!r}; it has {', '.join(names)}")
        return wanted
    for c in candidates:
        if c in names:
            return c
    raise UsageError(
        f"{path}: cannot tell which column holds the {what}; pass --{what}-col "
        f"(columns: {', '.join(names)})"
    )


def _read_listing(path: str) -> pa.Table:
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".parquet":
            return pq.read_table(path)
        if ext in (".jsonl", ".ndjson"):
            return pjson.read_json(path)
        delimiter = "\t" if ext == ".tsv" else ","
        return pcsv.read_csv(
            path,
            parse_options=pcsv.ParseOptions(delimiter=delimiter),
            convert_options=pcsv.ConvertOptions(strings_can_be_null=False),
        )
    except (pa.ArrowException, OSError) as e:
        raise UsageError(f"cannot read listing {path}: {e}") from None


def _listing_file(path: str, opts: ListingOptions) -> pa.Table:
    table = _read_listing(path)
    names = table.column_names
    path_col = _pick(names, opts.path_col, PATH_COLUMNS, "path", path)
    caption_col = _pick(names, opts.caption_col, CAPTION_COLUMNS, "caption", path)
    base = os.path.dirname(os.path.abspath(path))
    locs = [None if p is None else str(p) for p in table.column(path_col).to_pylist()]
    locs = [
        p if p is None or "://" in p or os.path.isabs(p) else os.path.join(base, p) for p in locs
    ]
    if opts.id_col:
        ids = [str(v) for v in table.column(_pick(names, opts.id_col, (), "id", path)).to_pylist()]
    else:
        ids = [hashlib.sha1((p or f"row{i}").encode()).hexdigest()[:20] for i, p in enumerate(locs)]
    captions = [None if c is None else str(c) for c in table.column(caption_col).to_pylist()]
    kinds = [(media_kind(p.split("?")[0]) or "image") if p else "none" for p in locs]
    rows = list(
        zip(
            ids,
            kinds,
            locs,
            [None] * len(ids),
            [None] * len(ids),
            captions,
            [None] * len(ids),
            strict=True,
        )
    )
    return _rows_to_table(rows)


def listing_digest(table: pa.Table, inputs: list[str]) -> str:
    """A digest of what the listing points at (names, sizes, modification times)."""
    h = hashlib.sha256()
    for spec in inputs:
        st = os.stat(spec)
        h.update(f"{os.path.abspath(spec)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    cols = (table.column(n).to_pylist() for n in ("key", "location", "size", "sidecar"))
    for key, location, size, sidecar in zip(*cols, strict=True):
        h.update(f"{key}:{size}:{_stat(location)}:{_stat(sidecar)}\n".encode())
    return h.hexdigest()


def _stat(path: str | None) -> str:
    """A local file's size and mtime, so that an edit behind the same name is seen; else ''."""
    if not path or "://" in path:
        return ""
    try:
        st = os.stat(path)
    except OSError:
        return ""  # missing: ingest rejects the row itself
    return f"{st.st_size}/{st.st_mtime_ns}"
