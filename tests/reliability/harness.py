"""The reliability suite's inputs, the commands of each step kind, and output checks."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import conftest
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import (
    by_id,
    image_bytes,
    mmtools,
    read_dataset,
    read_rejects,
    reject_reasons,
    write_shards,
)
from forked import THREADS

from mmtools import columns as C

SOAK = int(os.environ.get("MMTOOLS_SOAK", "20"))
ROWS, INPUT_SHARDS = 400, 8
SHAPE = ["--shard-rows", "20", "--batch-size", "10", "-q"]

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# -- inputs -----------------------------------------------------------------------------------


def corpus_table(rows: int = ROWS, seed: int = 0, height: int = 16) -> pa.Table:
    """Rows of id, image, text, width, height, image_sha256: duplicates, ties and bad images."""
    rng = np.random.default_rng(seed)
    data, widths = [], []
    for i in range(rows):
        w = int(rng.integers(16, 40))
        if i % 23 == 5:
            data.append(data[i - 3])  # a byte copy: exact dedup drops it
            widths.append(widths[i - 3])
            continue
        blob = image_bytes(seed * 100_000 + i, size=(w, height))
        data.append(blob[: len(blob) // 3] if i % 97 == 11 else blob)  # truncated: a reject
        widths.append(w)
    return pa.table(
        {
            C.ID: [f"r{i:05d}" for i in range(rows)],
            C.IMAGE: C.media_array(data, [None] * rows),
            C.TEXT: [f"a photo number {i} of {i % 7} things" for i in range(rows)],
            C.WIDTH: pa.array(widths, pa.int32()),
            C.HEIGHT: pa.array([height] * rows, pa.int32()),
            C.IMAGE_SHA256: [hashlib.sha256(d).hexdigest() for d in data],
        }
    )


def image_folder(root: Path, n: int = ROWS) -> Path:
    """`n` small captioned JPEGs, plus a few files ingest must reject."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"img{i:05d}.jpg").write_bytes(image_bytes(i, size=(24, 16)))
        (root / f"img{i:05d}.txt").write_text(f"a photo number {i}")
    # Bad files spread over the listing, so that several shards carry reject rows.
    (root / "img00100z.jpg").write_bytes(b"\xff\xd8\xff not really")
    (root / "img00250z.png").write_bytes(b"")
    (root / "img00390z.jpg").write_bytes(b"just text")
    return root


def png_header(width: int, height: int, mode: int = 2, data: bytes = b"") -> bytes:
    """A PNG that declares `width` x `height` but carries (almost) no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(data or b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def media_file(path, images: dict[str, bytes], texts: dict | None = None) -> None:
    """A Parquet file with one row per image (id = name)."""
    names = sorted(images)
    table = pa.table(
        {
            C.ID: names,
            C.IMAGE: C.media_array([images[n] for n in names], names),
            C.TEXT: [(texts or {}).get(n, f"a picture called {n}") for n in names],
        }
    )
    pq.write_table(table, path)


def outcome(out) -> tuple[dict, dict]:
    """(rows by id, reject reason by id) of a complete dataset."""
    return by_id(read_dataset(out)), reject_reasons(out)


def tiny_clip(directory: Path) -> Path:
    """This suite's open_clip model config (smaller than the unit tests'), run unpretrained."""
    return conftest.tiny_clip(directory, layers=1, config=TINY_CLIP)


@dataclass
class Inputs:
    """The inputs every kind of command reads."""

    dataset: Path
    folder: Path
    model: Path


def make_inputs(root: Path, height: int = 16) -> Inputs:
    """Build the shared inputs under `root` (images `height` pixels high)."""
    root.mkdir(parents=True, exist_ok=True)
    return Inputs(
        write_shards(root / "corpus", corpus_table(height=height), INPUT_SHARDS),
        image_folder(root / "folder"),
        tiny_clip(root),
    )


def command(kind: str, inp: Inputs, out: Path, *extra: str) -> list[str]:
    """The argv (without `mmtools`) of one command of each step kind, writing to `out`."""
    ds, o = str(inp.dataset), ["-o", str(out), *SHAPE, *extra]
    model = ["--model", str(inp.model), "--pretrained", "none", "--device", "cpu"]
    mix = ["--lam", "0.5", "--fraction", "0.3", "--keep-originals"]
    return {
        "filter": ["filter", ds, "--where", "width % 3 <> 0", *o],
        "ingest": ["ingest", str(inp.folder), "--workers", "2", *o],
        "embed": ["embed", ds, *model, "--workers", "1", *o],
        "top-fraction": ["filter", ds, "--top-fraction", "0.5", "--by", "width", *o],
        "dedup": ["dedup", ds, "-m", "exact", *o],
        "mixup": ["mixup", ds, *mix, "--workers", "1", *o],
    }[kind]


KINDS = {
    "streaming": ("filter", "ingest"),
    "model": ("embed",),
    "global": ("top-fraction", "dedup", "mixup"),
}


# -- reading and checking outputs -----------------------------------------------------------


def _digest(row: dict) -> str:
    return hashlib.sha256(repr(sorted(row.items())).encode()).hexdigest()[:16]


def rows(out: Path) -> Counter:
    """Multiset of (id, content hash) of the rows of a complete dataset, via its manifest."""
    return Counter((row[C.ID], _digest(row)) for row in read_dataset(out).to_pylist())


def rejects(out: Path) -> Counter:
    """Multiset of (id, step, reason) of the reject rows of a dataset."""
    table = read_rejects(out)
    found = [] if table is None else table.to_pylist()
    return Counter((r[C.ID], r[C.REJECT_STEP], r[C.REJECT_REASON]) for r in found)


@dataclass
class Damage:
    """Rows lost, duplicated or changed against a reference, over all checks of one fault."""

    trials: int = 0
    lost: int = 0
    duplicated: int = 0
    changed: int = 0

    def add(self, out: Counter, ref: Counter) -> None:
        """Count the differences of `out` from `ref` (multisets of (id, hash))."""
        self.trials += 1
        ids_out = Counter(i for i, _ in out.elements())
        ids_ref = Counter(i for i, _ in ref.elements())
        self.lost += sum((ids_ref - ids_out).values())
        self.duplicated += sum((ids_out - ids_ref).values())
        self.changed += sum(min(n, ids_ref[i]) for (i, _), n in (out - ref).items())


def leftovers(out: Path) -> list[str]:
    """Files a completed run must not leave: temporaries, progress records, run file, lock."""
    bad = [str(p.relative_to(out)) for p in out.rglob(".tmp-*")]
    bad += [n for n in ("_progress", "_run.json", "_lock") if (out / n).exists()]
    return bad


def check_complete(out: Path, ref: Path) -> Counter:
    """Assert `out` is a complete, self-consistent dataset with `ref`'s rejects and counts."""
    manifest = json.loads((out / "_manifest.json").read_text())
    expected = json.loads((ref / "_manifest.json").read_text())
    assert leftovers(out) == [], leftovers(out)
    on_disk = sorted(p.name for p in out.glob("part-*.parquet"))
    assert on_disk == sorted(s["name"] for s in manifest["shards"])
    listed = sorted(manifest["rejects"]["shards"])
    assert sorted(f"_rejects/{p.name}" for p in (out / "_rejects").glob("*")) == listed
    found = rows(out)
    assert manifest["rows"] == sum(found.values())
    for key in ("rows", "dropped", "generated"):
        assert manifest[key] == expected[key], key
    assert manifest["rejects"]["by_reason"] == expected["rejects"]["by_reason"]
    assert rejects(out) == rejects(ref)
    return found


def one_line(err: str) -> bool:
    """Whether `err` is a single line of text (an error message, not a traceback)."""
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def report(fault: str, damage: Damage, kills: int = 0) -> None:
    """Append one fault's tally to $MMTOOLS_SOAK_REPORT (JSON lines), when set."""
    path = os.environ.get("MMTOOLS_SOAK_REPORT")
    if path:
        line = {"fault": fault, "kills": kills, **damage.__dict__}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def reference(kind: str, inp: Inputs, out: Path) -> Path:
    """The uninterrupted run of `kind` through the real command line."""
    mmtools(*command(kind, inp, out), env=THREADS)
    return out


class References:
    """Uninterrupted outputs of each kind of command under `root`, made on first use."""

    def __init__(self, inputs: Inputs, root: Path):
        self.inputs, self.root, self.made = inputs, root, {}

    def __call__(self, kind: str) -> Path:
        if kind not in self.made:
            self.made[kind] = reference(kind, self.inputs, self.root / kind)
        return self.made[kind]
