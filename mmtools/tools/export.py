"""Export a dataset to WebDataset tars, JSONL plus a media folder, or a captioned media folder."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.media import MediaError, read, sniff_format

FORMATS = ("webdataset", "jsonl", "folder")
_EXT = {"jpeg": "jpg", "bytes": "bin", "riff": "bin"}


@dataclass
class ExportStats:
    """What an export wrote."""

    rows: int = 0
    files: int = 0
    skipped: Counter = field(default_factory=Counter)  # rows written without media, by reason

    @property
    def skipped_no_media(self) -> int:
        """Rows written without a media file."""
        return sum(self.skipped.values())

    def skipped_text(self) -> str:
        """'3 without media: missing_file 2, no_media 1' for the summary line."""
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()))
        return f"{self.skipped_no_media} without media" + (f": {reasons}" if reasons else "")


def _ext(data: bytes) -> str:
    kind = sniff_format(data)
    return _EXT.get(kind, kind)


def _scalars(row: dict, schema: pa.Schema) -> dict:
    """Columns that fit in JSON metadata: no media, no embeddings."""
    out = {}
    for f in schema:
        if f.name in C.MEDIA or pa.types.is_fixed_size_list(f.type):
            continue
        v = row.get(f.name)
        out[f.name] = v if not isinstance(v, bytes) else None
    return out


def _media(row: dict) -> tuple[str, bytes]:
    """The row's first media cell that holds bytes or a path, read; else `no_media`."""
    for kind in C.MEDIA:
        m = row.get(kind)
        if m and (m.get("bytes") is not None or m.get("path")):
            return kind, read(m, kind)
    raise MediaError("no_media", "the row holds no media bytes and no path")


def prepare_output(path: str, overwrite: bool) -> None:
    """Create the output directory; refuse a non-empty one unless overwriting."""
    if os.path.exists(path) and os.listdir(path):
        if not overwrite:
            raise UsageError(f"output {path} is not empty; pass --overwrite or choose another")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)


def export(source, out: str, fmt: str, shard_rows: int = 10_000) -> ExportStats:
    """Write every row of `source` to `out` in format `fmt`."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    writer = {"webdataset": _TarWriter, "jsonl": _JsonlWriter, "folder": _FolderWriter}[fmt]
    stats = ExportStats()
    with writer(out, shard_rows) as w:
        for batch in source.batches(batch_size=256):
            for row in batch.to_pylist():
                key = f"{stats.rows:09d}"
                try:
                    media = _media(row)
                except MediaError as e:
                    media = None
                    stats.skipped[e.reason] += 1
                stats.files += w.add(key, row, media, _scalars(row, batch.schema))
                stats.rows += 1
    return stats


class _TarWriter:
    """WebDataset shards: key.jpg + key.txt + key.json, `shard_rows` samples per tar."""

    def __init__(self, out: str, shard_rows: int):
        self.out, self.shard_rows = out, shard_rows
        self.count, self.tar, self.tmp = 0, None, None

    def __enter__(self):
        return self

    def _roll(self) -> None:
        self._finish()
        self.tmp = os.path.join(self.out, f".tmp-{self.count // self.shard_rows:05d}.tar")
        self.tar = tarfile.open(self.tmp, "w")  # noqa: SIM115 (closed in _finish)

    def _finish(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self.tmp, self.tmp.replace(".tmp-", ""))
            self.tar = None

    def _put(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, row: dict, media, meta: dict) -> int:
        if self.count % self.shard_rows == 0:
            self._roll()
        self.count += 1
        files = 0
        if media is not None:
            self._put(f"{key}.{_ext(media[1])}", media[1])
            files += 1
        if row.get(C.TEXT) is not None:
            self._put(f"{key}.txt", row[C.TEXT].encode())
            files += 1
        self._put(f"{key}.json", json.dumps(meta, ensure_ascii=False, default=str).encode())
        return files + 1

    def __exit__(self, *exc):
        if exc[0] is None:
            self._finish()
        elif self.tar is not None:
            self.tar.close()
            os.unlink(self.tmp)


class _FolderWriter:
    """Media files with .txt sidecar captions: the layout `mmtools ingest` reads back."""

    def __init__(self, out: str, shard_rows: int):
        self.out = out
        self.media_dir = out

    def __enter__(self):
        return self

    def _write_media(self, key: str, media) -> str | None:
        if media is None:
            return None
        name = f"{key}.{_ext(media[1])}"
        with open(os.path.join(self.media_dir, name), "wb") as f:
            f.write(media[1])
        return name

    def add(self, key: str, row: dict, media, meta: dict) -> int:
        name = self._write_media(key, media)
        if row.get(C.TEXT) is not None and name:
            with open(os.path.join(self.out, f"{key}.txt"), "w", encoding="utf-8") as f:
                f.write(row[C.TEXT])
            return 2
        return int(name is not None)

    def __exit__(self, *exc):
        pass


class _JsonlWriter(_FolderWriter):
    """data.jsonl (one object per row, with the media file name) plus a media/ folder."""

    def __init__(self, out: str, shard_rows: int):
        super().__init__(out, shard_rows)
        self.media_dir = os.path.join(out, "media")
        os.makedirs(self.media_dir, exist_ok=True)
        self.tmp = os.path.join(out, ".tmp-data.jsonl")
        self.f = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)

    def add(self, key: str, row: dict, media, meta: dict) -> int:
        name = self._write_media(key, media)
        meta = {**meta, "file": f"media/{name}" if name else None}
        self.f.write(json.dumps(meta, ensure_ascii=False, default=str) + "\n")
        return int(name is not None)

    def __exit__(self, *exc):
        self.f.close()
        if exc[0] is None:
            os.replace(self.tmp, os.path.join(self.out, "data.jsonl"))
