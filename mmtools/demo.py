"""`mmtools demo`: sample data with planted noise, the whole chain as real pipes, a report.

The sample is made with `mmtools.synth` and carries known noise: captions moved to the wrong
images, exact copies, near-duplicates (the same scene shifted a little, re-encoded, with a
slightly edited caption) and corrupt files. The truth is written beside the data, so the
report can say how much of each kind the chain removed.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa


@dataclass
class DemoConfig:
    """Size and noise of the sample."""

    rows: int = 600
    seed: int = 0
    size: int = 64
    mismatch: float = 0.15
    exact_dups: float = 0.05
    near_dups: float = 0.05
    corrupt: int = 6


@dataclass
class Truth:
    """Which sample ids carry which planted noise."""

    mismatched: list[str] = field(default_factory=list)
    exact_pairs: list[list[str]] = field(default_factory=list)
    near_pairs: list[list[str]] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)


def _jpeg(image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _edit(caption: str) -> str:
    """A near-duplicate caption: one small wording change."""
    for a, b in (
        (" on the left", " at the left"),
        (" background", " backdrop"),
        ("a ", "one "),
        (" in the center", " in the middle"),
    ):
        if a in caption:
            return caption.replace(a, b, 1)
    return caption + "."


def make_sample(root: Path, cfg: DemoConfig) -> Truth:
    """Write captioned images with planted noise under `root`; return the truth."""
    from mmtools import synth

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    samples = list(synth.generate(cfg.rows, cfg.seed, cfg.size))
    ids = [f"s{i:05d}.jpg" for i in range(cfg.rows)]
    order = rng.sample(range(cfg.rows), cfg.rows)
    n_mis, n_exact = int(cfg.mismatch * cfg.rows), int(cfg.exact_dups * cfg.rows)
    n_near = int(cfg.near_dups * cfg.rows)
    mis = order[:n_mis]
    exact = order[n_mis : n_mis + n_exact]
    near = order[n_mis + n_exact : n_mis + n_exact + n_near]
    captions = [s.caption for s in samples]
    # Mismatches: rotate captions among the chosen rows so each gets another scene's caption.
    for a, b in zip(mis, mis[1:] + mis[:1], strict=True):
        captions[a] = samples[b].caption
    truth = Truth(mismatched=[ids[i] for i in mis])
    for i, s in enumerate(samples):
        (root / ids[i]).write_bytes(_jpeg(s.image, 90))
        (root / ids[i]).with_suffix(".txt").write_text(captions[i])
    for i in exact:
        copy = f"copy_{ids[i]}"
        shutil.copyfile(root / ids[i], root / copy)
        (root / copy).with_suffix(".txt").write_text(captions[i])
        truth.exact_pairs.append([ids[i], copy])
    for i in near:
        twin = f"near_{ids[i]}"
        moved = synth.render(synth.shifted(samples[i].attrs, 0.01, 0.0), cfg.size)
        (root / twin).write_bytes(_jpeg(moved, 75))
        (root / twin).with_suffix(".txt").write_text(_edit(captions[i]))
        truth.near_pairs.append([ids[i], twin])
    good = (root / ids[0]).read_bytes()
    bad = [
        good[: len(good) // 2],
        b"",
        b"not an image at all",
        good[:20],
        b"\xff\xd8\xff" * 9,
        b"GIF89a" + bytes(30),
    ]
    for k in range(cfg.corrupt):
        name = f"broken_{k:02d}.jpg"
        (root / name).write_bytes(bad[k % len(bad)])
        truth.corrupt.append(name)
    (root.parent / "truth.json").write_text(json.dumps(truth.__dict__, indent=1))
    return truth


def _ids(path: Path) -> set[str]:
    from mmtools.io.source import Source

    src = Source([str(path)])
    return {v for b in src.batches(columns=["id"]) for v in b.column("id").to_pylist()}


def _rejects(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    files = sorted((path / "_rejects").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def precision_recall(found: set[str], truth: set[str]) -> tuple[float, float]:
    """Precision and recall of `found` against `truth` (1.0 when a side is empty)."""
    hit = len(found & truth)
    return (hit / len(found) if found else 1.0, hit / len(truth) if truth else 1.0)


def run_pipe(commands: list[list[str]], log) -> float:
    """Run commands joined by OS pipes (stderr to `log`); raise if any fails; return seconds."""
    t0 = time.monotonic()
    procs, prev = [], None
    for args in commands:
        p = subprocess.Popen(
            [sys.executable, "-m", "mmtools", *args],
            stdin=prev.stdout if prev else subprocess.DEVNULL,
            stdout=subprocess.PIPE if args is not commands[-1] else log,
            stderr=log,
        )
        if prev:
            prev.stdout.close()
        procs.append(p)
        prev = p
    codes = [p.wait() for p in procs]
    if any(codes):
        failed = " | ".join("mmtools " + " ".join(c) for c in commands)
        raise RuntimeError(f"{failed} exited {codes}; see the log")
    return time.monotonic() - t0
