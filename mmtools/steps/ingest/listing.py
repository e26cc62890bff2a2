"""What `ingest` reads: media folders with sidecar captions, listing files, WebDataset tars.

Each input becomes a listing (one row per sample: id, kind, where the bytes are, caption or
sidecar, then the listing file's other columns, named EXTRA + their output name), sorted
and deterministic, served through the same interface as a dataset source so that ingest
resumes, shards and reports like every other step.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tarfile
from dataclasses import dataclass

import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.media import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS
from mmtools.steps.ingest.metadata import (
    CAPTION_FIELDS,
    EXPORT_MANIFEST,
    INGESTED,
    conform,
    export_schema,
    merged_provenance,
    restored,
    sample_columns,
)

log = logging.getLogger("mmtools")

LISTING_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("kind", pa.string()),  # image | audio | none
        ("location", pa.string()),  # file path, URL, or tar file
        ("offset", pa.int64()),  # byte offset inside a tar, else null
        ("size", pa.int64()),
        ("caption", pa.string()),
        ("sidecar", pa.string()),  # path of a .txt/.json caption file, else null
        ("member", pa.string()),  # a tar sample's key in the tar (its name, less extensions)
    ]
)
LISTING_SUFFIXES = {".csv", ".tsv", ".jsonl", ".ndjson", ".parquet"}
# Matched in any case: LAION's URL/TEXT, img2dataset's url/caption.
PATH_COLUMNS = ("url", "path", "image", "audio", "file", "filepath", "filename")
CAPTION_COLUMNS = ("caption", "text", "alt", "alt_text", "title")
EXTRA = "extra:"  # prefix of a kept listing column in the listing table
SIDECAR_EXTENSIONS = (".txt", ".json")
# Registered by Pillow but not decoded without outside help (stubs, Ghostscript, video).
_NOT_DECODED = {".bufr", ".grib", ".h5", ".hdf", ".emf", ".wmf", ".eps", ".ps", ".mpg", ".mpeg"}


@functools.cache
def image_extensions() -> frozenset[str]:
    """Extensions of the image formats Pillow decodes (imported on first use)."""
    from PIL import Image

    Image.init()
    pillow = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return frozenset(IMAGE_EXTENSIONS | (pillow - _NOT_DECODED))


def media_kind(name: str) -> str | None:
    """'image' or 'audio' by file extension, else None."""
    ext = os.path.splitext(name)[1].lower()
    if ext in AUDIO_EXTENSIONS:
        return "audio"
    # The common cases answered without importing every Pillow plugin (a fixed cost of
    # ~0.1 s, more than the rest of a small folder's listing); no plugin claims a caption's.
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in SIDECAR_EXTENSIONS:
        return None
    if ext in image_extensions():
        return "image"
    return None


@dataclass
class ListingOptions:
    """How to read listing files."""

    path_col: str | None = None
    caption_col: str | None = None
    id_col: str | None = None
    drop_extra: bool = False


def build_listing(inputs: list[str], opts: ListingOptions) -> tuple[pa.Table, list[str]]:
    """Turn folders, listing files and tars into one sorted listing table; also return the
    files of folders passed over as unsupported."""
    tables, skipped = [], []
    seen: dict[str, int] = {}  # URL -> times listed so far, for the ids of repeats
    for spec in inputs:
        if os.path.isdir(spec):
            table, passed = _folder(os.path.abspath(spec), opts)  # paths stored absolute
            tables.append(table)
            skipped += passed
        elif spec.endswith(".tar"):
            tables.append(_tar(spec, opts))
        elif os.path.splitext(spec)[1].lower() in LISTING_SUFFIXES:
            tables.append(_listing_file(spec, opts, seen))
        elif os.path.exists(spec):
            raise UsageError(
                f"cannot ingest {spec}: expected a folder, a .tar WebDataset shard, or a "
                f"{'/'.join(sorted(LISTING_SUFFIXES))} listing (compressed tars: decompress first)"
            )
        else:
            raise UsageError(f"input {spec} does not exist")
    if not tables:
        return LISTING_SCHEMA.empty_table(), skipped
    try:  # listings with other extra columns: missing ones are null
        table = pa.concat_tables(tables, promote_options="permissive")
        return table.replace_schema_metadata(merged_provenance(tables)), skipped
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise UsageError(f"the listings' extra columns do not agree ({e}); --drop-extra") from None


def extra_columns(schema: pa.Schema) -> dict[str, str]:
    """Output name -> listing-table name of the kept listing columns."""
    return {n[len(EXTRA) :]: n for n in schema.names if n.startswith(EXTRA)}


def skipped_counts(skipped: list[str]) -> dict[str, int]:
    """Passed-over files by extension ('(none)' for none), most frequent first."""
    counts: dict[str, int] = {}
    for path in skipped:
        ext = os.path.splitext(path)[1].lower() or "(none)"
        counts[ext] = counts.get(ext, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _rows_to_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in LISTING_SCHEMA]
    return pa.table(
        [pa.array(c, f.type) for c, f in zip(cols, LISTING_SCHEMA, strict=True)],
        schema=LISTING_SCHEMA,
    )


def _folder(root: str, opts: ListingOptions) -> tuple[pa.Table, list[str]]:
    rows, skipped, metas = [], [], []
    export = os.path.isfile(os.path.join(root, EXPORT_MANIFEST))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if export and dirpath == root:  # an export's own bookkeeping is not data
            dirnames[:] = [d for d in dirnames if not d.startswith("_")]
        names = set(filenames)
        under = os.path.relpath(dirpath, root)  # once a folder: relpath costs a file's read
        for name in sorted(filenames):
            kind = media_kind(name)
            if kind is None:
                # Caption files and hidden files (.DS_Store) are not samples of their own.
                if not name.startswith(".") and not name.lower().endswith(SIDECAR_EXTENSIONS):
                    skipped.append(os.path.join(dirpath, name))
                    log.info("skipped %s: unsupported file type", skipped[-1])
                continue
            path = os.path.join(dirpath, name)
            stem = os.path.splitext(name)[0]
            sidecar = next((s for s in (stem + ".txt", stem + ".json") if s in names), None)
            meta = (
                _json_file(os.path.join(dirpath, stem + ".json"))
                if stem + ".json" in names
                else None
            )
            metas.append(meta)
            rows.append(
                [
                    name if under == os.curdir else os.path.join(under, name),
                    kind,
                    path,
                    None,
                    os.path.getsize(path),
                    None,
                    os.path.join(dirpath, sidecar) if sidecar else None,
                    None,
                ]
            )
    return _with_metadata(rows, metas, [None] * len(rows), opts, root), skipped


def _json_file(path: str) -> dict | None:
    """A sidecar .json's object, or None (a caption file that does not parse is rejected as
    bad_caption when its caption is read)."""
    import json

    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _tar(path: str, opts: ListingOptions) -> pa.Table:
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
            elif ext == ".json":
                try:
                    meta = json.loads(tf.extractfile(m).read())
                except ValueError:
                    continue
                g["meta"] = meta if isinstance(meta, dict) else None
            elif ext.endswith(".npy") and ext.count(".") == 2:  # KEY.COLUMN.npy: a vector
                g.setdefault("arrays", {})[ext[1:-4]] = _npy(tf.extractfile(m).read())
    rows, metas, arrays = [], [], []
    for key in sorted(groups):
        g = groups[key]
        kind, offset, size = g.get("media", ("none", None, None))
        meta = g.get("meta")
        caption = g.get("caption")
        if caption is None and meta:
            caption = next((str(meta[k]) for k in CAPTION_FIELDS if meta.get(k) is not None), None)
        rows.append([f"{stem}/{key}", kind, path, offset, size, caption, None, key])
        metas.append(meta)
        arrays.append(g.get("arrays"))
    return _with_metadata(rows, metas, arrays, opts, os.path.dirname(os.path.abspath(path)))


def _npy(data: bytes):
    import io

    import numpy as np

    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None


def _with_metadata(rows, metas, arrays, opts: ListingOptions, directory: str) -> pa.Table:
    """The listing of a folder's or a tar's samples, with their ids (--id-col, or an export's
    `id`) and the columns of their metadata kept (unless --drop-extra)."""
    types = export_schema(directory)
    id_col = opts.id_col or (C.ID if types is not None else None)
    if id_col:
        found = [m.get(id_col) if m else None for m in metas]
        if opts.id_col and rows and all(v is None for v in found):
            raise UsageError(
                f"--id-col {id_col}: no sample's .json under {directory} has it; "
                "pass the name of a field every sample's .json holds"
            )
        missing = sum(v is None for v in found)
        if missing and opts.id_col:
            log.warning(
                "%d samples have no %s in their .json; they keep their own ids", missing, id_col
            )
        for row, v in zip(rows, found, strict=True):
            if v is not None:
                row[0] = str(v)
    listing = _rows_to_table([tuple(r) for r in rows])
    if opts.drop_extra:
        return listing
    # An export's copies of what ingest writes itself are written anew, not kept.
    skip = {
        *CAPTION_FIELDS,
        *([id_col] if id_col else []),
        *(INGESTED if types is not None else ()),
    }
    columns = sample_columns(metas, skip) | sample_columns(arrays, skip)
    names = _output_names(list(columns), directory)
    for name, out in names.items():
        listing = listing.append_column(EXTRA + out, conform(name, columns[name], types))
    return restored(listing, names, types)


def _pick(names: list[str], wanted: str | None, candidates: tuple, what: str, path: str) -> str:
    if wanted:
        if wanted not in names:
            raise UsageError(f"{path} has no column {wanted!r}; it has {', '.join(names)}")
        return wanted
    lower = {}
    for n in names:
        lower.setdefault(n.lower(), n)
    for c in candidates:
        if c in names or c in lower:
            return c if c in names else lower[c]
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


def _listing_file(path: str, opts: ListingOptions, seen: dict[str, int]) -> pa.Table:
    table = _read_listing(path)
    names = table.column_names
    path_col = _pick(names, opts.path_col, PATH_COLUMNS, "path", path)
    caption_col = _pick(names, opts.caption_col, CAPTION_COLUMNS, "caption", path)
    types = export_schema(os.path.dirname(os.path.abspath(path)))  # an mmtools export's JSONL
    if types is not None and not opts.id_col and C.ID in names:
        id_col = C.ID
    else:
        id_col = _pick(names, opts.id_col, (), "id", path) if opts.id_col else None
    base = os.path.dirname(os.path.abspath(path))
    locs = [None if p is None else str(p) for p in table.column(path_col).to_pylist()]
    locs = [
        p if p is None or "://" in p or os.path.isabs(p) else os.path.join(base, p) for p in locs
    ]
    if id_col:
        ids = [str(v) for v in table.column(id_col).to_pylist()]
    else:
        ids = [_derived_id(p, i, seen) for i, p in enumerate(locs)]
    captions = [None if c is None else str(c) for c in table.column(caption_col).to_pylist()]
    kinds = [(media_kind(p.split("?")[0]) or "image") if p else "none" for p in locs]
    n = len(ids)
    none = [None] * n
    listing = _rows_to_table(
        list(zip(ids, kinds, locs, none, none, captions, none, none, strict=True))
    )
    if opts.drop_extra:
        return listing
    kept = [c for c in names if c not in (path_col, caption_col, id_col)]
    if types is not None:  # what ingest writes itself is written anew
        kept = [c for c in kept if c not in INGESTED]
    names = _output_names(kept, path)
    for name, out in names.items():
        column = table.column(name).combine_chunks()
        listing = listing.append_column(EXTRA + out, conform(name, column, types))
    return restored(listing, names, types)


def _derived_id(location: str | None, row: int, seen: dict[str, int]) -> str:
    """A hash of the URL; a URL listed again gets its repeat number too, so that each
    listing row is a sample (ids of listings without repeats are the plain hash)."""
    key = location or f"row{row}"
    repeat = seen.get(key, 0) if location and "://" in location else 0
    seen[key] = repeat + 1
    # A local file listed twice keeps one id: the second is rejected as duplicate_id.
    return hashlib.sha1((key if not repeat else f"{key}\n{repeat}").encode()).hexdigest()[:20]


def _output_names(kept: list[str], path: str) -> dict[str, str]:
    """Listing column -> output name: its own, or LISTING_PREFIX + it where ingest writes a
    column of that name itself (e.g. width)."""
    out = {n: C.LISTING_PREFIX + n if n in INGESTED else n for n in kept}
    if len(set(out.values())) < len(out):
        raise UsageError(
            f"{path}: a renamed column would clash ({', '.join(kept)}); rename it or --drop-extra"
        )
    for n, renamed in out.items():
        if renamed != n:
            log.info("%s: column %s kept as %s (%s is an mmtools column)", path, n, renamed, n)
    return out


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
