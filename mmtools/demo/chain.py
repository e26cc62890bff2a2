"""`mmtools demo`: sample data with planted noise, the whole chain as real pipes, a report.

The sample is made with `mmtools.demo.synth` and carries known noise: captions moved to the wrong
images, exact copies, near-duplicates (the same scene shifted a little, re-encoded, with a
slightly edited caption) and corrupt files. The truth is written beside the data, so the
report can say how much of each kind the chain removed.
"""

from __future__ import annotations

import io
import json
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from mmtools.errors import MmtoolsError


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
    from mmtools.demo import synth

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
    from mmtools.io.dataset import read_rejects

    return read_rejects(str(path))


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
        raise MmtoolsError(f"{failed} exited {codes}; the log has the details")
    return time.monotonic() - t0


def calibrate_threshold(n: int = 400, seed: int = 12345) -> float:
    """The clip_score cut for mmtools-shapes, calibrated on fresh pairs (not the demo's data).

    Scores matched and shuffled captions of newly generated scenes and takes the cut that
    best separates them (Youden's J), as one calibrates a threshold for any new model.
    """
    import numpy as np

    from mmtools.demo import synth
    from mmtools.demo.train import embed
    from mmtools.models import shapes as shapes_model

    model, preprocess, tokenizer = shapes_model.create()
    image_emb, text_emb = embed(model, preprocess, tokenizer, list(synth.generate(n, seed)))
    matched = (image_emb * text_emb).sum(axis=1)
    shuffled = (image_emb * np.roll(text_emb, 1, axis=0)).sum(axis=1)
    cuts = np.sort(np.concatenate([matched, shuffled]))
    j = [(matched >= c).mean() - (shuffled >= c).mean() for c in cuts]
    return round(float(cuts[int(np.argmax(j))]), 3)


def run_demo(out: Path, cfg: DemoConfig, threshold: float, log) -> dict:
    """Make the sample, run the chain, and measure what it removed against the truth."""
    out.mkdir(parents=True, exist_ok=True)
    images = out / "sample" / "images"
    truth = make_sample(images, cfg)
    timings = [(name, run_pipe(cmds, log)) for name, cmds in stages(out, images, cfg, threshold)]
    return _report(out, truth, timings, threshold)


def stages(out: Path, images: Path, cfg: DemoConfig, threshold: float) -> list:
    """The demo chain: (stage name, the piped commands of the stage) in order."""
    q = shlex.quote
    scored, filtered, deduped, final = (q(str(out / n)) for n in STAGE_DIRS)
    where = q(f"clip_score >= {threshold}")
    seed = cfg.seed
    spec = [
        (
            "ingest | embed | score",
            [
                f"ingest {q(str(images))} -q",
                "embed --model mmtools-shapes -q",
                f"score -o {scored} --json",
            ],
        ),
        (
            f"filter clip_score >= {threshold}",
            [f"filter {scored} --where {where} -o {filtered} --json"],
        ),
        (
            "dedup exact + phash",
            [f"dedup {filtered} -m exact -m phash --keep highest:clip_score -o {deduped} --json"],
        ),
        (
            "rewrite (template) | mixup",
            [
                f"rewrite {deduped} --backend template --mix 0.5 --seed {seed} -q",
                "mixup --mode image-text --fraction 0.2 --keep-originals "
                f"--seed {seed} -o {final} --json",
            ],
        ),
        ("stats --plot", [f"stats {final} --plot {q(str(out / 'plots'))}"]),
    ]
    return [(name, [shlex.split(c) for c in commands]) for name, commands in spec]


STAGE_DIRS = ("scored", "filtered", "deduped", "final")


def _report(out: Path, truth: Truth, timings, threshold: float) -> dict:
    scored, filtered = _ids(out / "scored"), _ids(out / "filtered")
    deduped, final = _ids(out / "deduped"), _ids(out / "final")
    dropped = scored - filtered
    p, r = precision_recall(dropped, set(truth.mismatched))
    rejects = _rejects(out / "scored")
    reasons: dict[str, int] = {}
    rejected_ids: set[str] = set()
    if rejects is not None:
        for rid, reason in zip(
            rejects.column("id").to_pylist(), rejects.column("reason").to_pylist(), strict=True
        ):
            reasons[reason] = reasons.get(reason, 0) + 1
            rejected_ids.add(rid)

    def collapsed(pairs):  # a pair is resolved when at most one of the two survives
        return sum(1 for a, b in pairs if not (a in deduped and b in deduped))

    return {
        "rows": {
            "sample": len(scored) + len(rejected_ids),
            "scored": len(scored),
            "filtered": len(filtered),
            "deduped": len(deduped),
            "final": len(final),
        },
        "threshold": threshold,
        "mismatched": {
            "planted": len(truth.mismatched),
            "removed": len(dropped),
            "precision": round(p, 4),
            "recall": round(r, 4),
        },
        "exact_duplicates": {
            "planted": len(truth.exact_pairs),
            "removed": collapsed(truth.exact_pairs),
        },
        "near_duplicates": {
            "planted": len(truth.near_pairs),
            "removed": collapsed(truth.near_pairs),
        },
        "corrupt": {
            "planted": len(truth.corrupt),
            "rejected": len(set(truth.corrupt) & rejected_ids),
        },
        "rejects": reasons,
        "seconds": {name: round(t, 2) for name, t in timings},
        "outputs": {
            "dataset": str(out / "final"),
            "plots": str(out / "plots"),
            "log": str(out / "demo.log"),
        },
    }


def format_report(rep: dict) -> str:
    """The report as a few readable lines."""
    rows, mis = rep["rows"], rep["mismatched"]
    ex, near, bad = rep["exact_duplicates"], rep["near_duplicates"], rep["corrupt"]
    lines = [
        "rows: " + " -> ".join(f"{k} {v}" for k, v in rows.items()),
        f"mismatched captions removed by clip_score >= {rep['threshold']}: {mis['removed']} "
        f"rows dropped, {mis['planted']} planted; precision {mis['precision']:.2f}, "
        f"recall {mis['recall']:.2f}",
        f"exact duplicates removed: {ex['removed']}/{ex['planted']}; near-duplicates removed: "
        f"{near['removed']}/{near['planted']}",
        f"corrupt files rejected: {bad['rejected']}/{bad['planted']} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(rep["rejects"].items()))
        + ")",
        "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in rep["seconds"].items()),
        f"output: {rep['outputs']['dataset']}  plots: {rep['outputs']['plots']}  "
        f"log: {rep['outputs']['log']}",
    ]
    return "\n".join(lines)
