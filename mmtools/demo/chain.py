"""`mmtools demo`: sample data with planted noise, the whole chain as real pipes, a report.

The sample is made with `mmtools.demo.synth` and carries known noise: captions moved to the wrong
images, exact copies, near-duplicates (the same scene shifted a little, re-encoded, with a
slightly edited caption), blurred images and corrupt files. A tenth of the sample is labelled
blurry or sharp (a `blurry` field in its `.json`), as a curator labels a sample: a head
trained on those labels filters the rest. The truth is written beside the data, so the
report can give, per stage, the precision and recall of that stage's own removals.

The sample is drawn from a generator seed the bundled model never saw (`sample_seed`), with
textured backgrounds (the model was trained on plain ones), so every figure is measured on
unseen data.
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
    blurred: float = 0.2
    labelled: float = 0.1
    corrupt: int = 6


SAMPLE_SEED_OFFSET = 2_000_000  # demo samples come from seeds 2_000_000 + --seed


def sample_seed(seed: int) -> int:
    """The generator seed of the demo sample for `--seed`, checked against the seeds the
    bundled model's training record says it trained and was evaluated on."""
    from mmtools.models import shapes as shapes_model

    drawn = SAMPLE_SEED_OFFSET + seed
    used = set(shapes_model.training_record().get("seeds", [])) | {CALIBRATION_SEED}
    if drawn in used:
        raise MmtoolsError(f"seed {drawn} was used to train or calibrate mmtools-shapes")
    return drawn


@dataclass
class Truth:
    """Which sample ids carry which planted noise."""

    mismatched: list[str] = field(default_factory=list)
    exact_pairs: list[list[str]] = field(default_factory=list)
    near_pairs: list[list[str]] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    blurred: list[str] = field(default_factory=list)
    labelled: list[str] = field(default_factory=list)


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


def _blurred_and_labelled(rest: list[int], cfg: DemoConfig, rng) -> tuple[set[int], list[int]]:
    """The rows to blur (from `rest`, rows with no other planted noise) and the labelled
    tenth, drawn from the blurred rows and the others alike (stratified), so that a small
    sample still holds enough of each class to train on."""
    blurred = set(rest[: int(cfg.blurred * cfg.rows)])
    labelled = rng.sample(sorted(blurred), round(cfg.labelled * len(blurred)))
    others = [i for i in range(cfg.rows) if i not in blurred]
    return blurred, labelled + rng.sample(others, round(cfg.labelled * len(others)))


def make_sample(root: Path, cfg: DemoConfig) -> Truth:
    """Write captioned images with planted noise under `root`; return the truth."""
    from PIL import ImageFilter

    from mmtools.demo import synth

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    samples = list(synth.generate(cfg.rows, sample_seed(cfg.seed), cfg.size, textured=True))
    ids = [f"s{i:05d}.jpg" for i in range(cfg.rows)]
    order = rng.sample(range(cfg.rows), cfg.rows)
    n_mis, n_exact = int(cfg.mismatch * cfg.rows), int(cfg.exact_dups * cfg.rows)
    n_near = int(cfg.near_dups * cfg.rows)
    mis = order[:n_mis]
    exact = order[n_mis : n_mis + n_exact]
    near = order[n_mis + n_exact : n_mis + n_exact + n_near]
    blurred, labelled = _blurred_and_labelled(order[n_mis + n_exact + n_near :], cfg, rng)
    captions = [s.caption for s in samples]
    # Mismatches: rotate captions among the chosen rows so each gets another scene's caption.
    for a, b in zip(mis, mis[1:] + mis[:1], strict=True):
        captions[a] = samples[b].caption
    truth = Truth(mismatched=[ids[i] for i in mis])
    truth.blurred = [ids[i] for i in sorted(blurred)]
    truth.labelled = [ids[i] for i in sorted(labelled)]
    for i, s in enumerate(samples):
        image = s.image.filter(ImageFilter.GaussianBlur(cfg.size / 8)) if i in blurred else s.image
        (root / ids[i]).write_bytes(_jpeg(image, 90))
        (root / ids[i]).with_suffix(".txt").write_text(captions[i])
    for i in labelled:
        (root / ids[i]).with_suffix(".json").write_text(json.dumps({"blurry": i in blurred}))
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


CALIBRATION_SEED = 12345


def calibrate_threshold(prior: float, n: int = 1000, seed: int = CALIBRATION_SEED) -> float:
    """The clip_score cut for mmtools-shapes, calibrated on fresh pairs (not the demo's data).

    Scores matched and shuffled captions of newly generated scenes, written as JPEG like the
    sample, and takes the cut with the fewest expected errors when a `prior` share of the
    captions are wrong, as one calibrates a threshold for any new model and noise rate.
    """
    import numpy as np
    from PIL import Image

    from mmtools.demo import synth
    from mmtools.demo.train import embed
    from mmtools.models import shapes as shapes_model

    model, preprocess, tokenizer = shapes_model.create()
    fresh = [
        synth.Sample(Image.open(io.BytesIO(_jpeg(s.image, 90))).convert("RGB"), s.caption, s.attrs)
        for s in synth.generate(n, seed, textured=True)
    ]
    image_emb, text_emb = embed(model, preprocess, tokenizer, fresh)
    matched = (image_emb * text_emb).sum(axis=1)
    shuffled = (image_emb * np.roll(text_emb, 1, axis=0)).sum(axis=1)
    cuts = np.sort(np.concatenate([matched, shuffled]))
    errors = [prior * (shuffled >= c).mean() + (1 - prior) * (matched < c).mean() for c in cuts]
    return round(float(cuts[int(np.argmin(errors))]), 3)


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
    scored, sharp, filtered, deduped, final = (q(str(out / n)) for n in STAGE_DIRS)
    head = q(str(out / "blurry.safetensors"))
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
            "train-head --label blurry",
            [f"train-head {scored} --label blurry --seed {seed} -o {head}"],
        ),
        (
            f"score --head | filter {BLURRY} < 0.5",
            [
                f"score {scored} --head {BLURRY}={head} -q",
                f"filter --where {q(f'{BLURRY} < 0.5')} -o {sharp} --json",
            ],
        ),
        (
            f"filter clip_score >= {threshold}",
            [f"filter {sharp} --where {where} -o {filtered} --json"],
        ),
        (
            "dedup exact + phash",
            # Synthetic scenes on plain backdrops sit closer in pHash than photographs do,
            # so the demo keeps the radius below the photographs' default (10).
            [
                f"dedup {filtered} -m exact -m phash --max-distance 6 "
                f"--keep highest:clip_score -o {deduped} --json"
            ],
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


STAGE_DIRS = ("scored", "sharp", "filtered", "deduped", "final")
BLURRY = "blurry_score"


def _report(out: Path, truth: Truth, timings, threshold: float) -> dict:
    """Rows per stage, and per stage the precision and recall of its own removals against
    what was planted among the rows that reached it."""
    scored, sharp, filtered = _ids(out / "scored"), _ids(out / "sharp"), _ids(out / "filtered")
    deduped, final = _ids(out / "deduped"), _ids(out / "final")
    unlabelled = scored - set(truth.labelled)
    rejects = _rejects(out / "scored")
    reasons: dict[str, int] = {}
    rejected: set[str] = set()
    if rejects is not None:
        for rid, reason in zip(
            rejects.column("id").to_pylist(), rejects.column("reason").to_pylist(), strict=True
        ):
            reasons[reason] = reasons.get(reason, 0) + 1
            rejected.add(rid)
    return {
        "rows": {
            "sample": len(scored) + len(rejected),
            "scored": len(scored),
            "sharp": len(sharp),
            "filtered": len(filtered),
            "deduped": len(deduped),
            "final": len(final),
        },
        "threshold": threshold,
        "corrupt": {"planted": len(truth.corrupt), **_stage(rejected, set(truth.corrupt))},
        # The head's removals among the rows nobody labelled (a labelled row is no test).
        "blurred": {
            "planted": len(truth.blurred),
            "labelled": len(truth.labelled),
            **_stage((scored - sharp) & unlabelled, set(truth.blurred) & unlabelled),
        },
        "mismatched": {
            "planted": len(truth.mismatched),
            **_stage(sharp - filtered, set(truth.mismatched) & sharp),
        },
        "duplicates": _dedup_stage(filtered, deduped, truth),
        "rejects": reasons,
        "seconds": {name: round(t, 2) for name, t in timings},
        "outputs": {
            "dataset": str(out / "final"),
            "plots": str(out / "plots"),
            "log": str(out / "demo.log"),
        },
    }


def _stage(removed: set[str], planted: set[str]) -> dict:
    """A stage's removals against the planted rows that reached it."""
    p, r = precision_recall(removed, planted)
    return {
        "reached": len(planted),
        "removed": len(removed),
        "precision": round(p, 4),
        "recall": round(r, 4),
    }


def _dedup_stage(before: set[str], after: set[str], truth: Truth) -> dict:
    """Dedup's own removals: a removed row is right when its planted twin reached dedup too
    and survived; a planted pair that reached dedup is found when exactly one row survives."""
    pairs = {"exact": truth.exact_pairs, "near": truth.near_pairs}
    removed = before - after
    right = {
        row
        for a, b in truth.exact_pairs + truth.near_pairs
        for row, twin in ((a, b), (b, a))
        if row in removed and twin in after
    }
    precision = len(right) / len(removed) if removed else 1.0
    out: dict = {"removed": len(removed), "precision": round(precision, 4)}
    found = reached = 0
    for kind, planted in pairs.items():
        both = [(a, b) for a, b in planted if a in before and b in before]
        hit = sum(1 for a, b in both if (a in after) != (b in after))
        out[kind] = {"planted": len(planted), "reached": len(both), "found": hit}
        found, reached = found + hit, reached + len(both)
    out["recall"] = round(found / reached, 4) if reached else 1.0
    return out


def format_report(rep: dict) -> str:
    """The report as a few readable lines."""
    rows, mis, bad, dup = rep["rows"], rep["mismatched"], rep["corrupt"], rep["duplicates"]
    blur = rep["blurred"]

    def pr(stage: dict) -> str:
        return f"precision {stage['precision']:.2f}, recall {stage['recall']:.2f}"

    lines = [
        "rows: " + " -> ".join(f"{k} {v}" for k, v in rows.items()),
        f"ingest/embed rejected {bad['removed']} rows, {bad['planted']} corrupt files planted: "
        f"{pr(bad)} (" + ", ".join(f"{k} {v}" for k, v in sorted(rep["rejects"].items())) + ")",
        f"a head trained on {blur['labelled']} labelled rows dropped {blur['removed']} of the "
        f"unlabelled rows, which held {blur['reached']} blurred images: {pr(blur)}",
        f"filter clip_score >= {rep['threshold']} dropped {mis['removed']} rows, "
        f"{mis['reached']} mismatched captions reached it: {pr(mis)}",
        f"dedup removed {dup['removed']} rows: {pr(dup)}; exact pairs found "
        f"{dup['exact']['found']}/{dup['exact']['reached']}, near pairs "
        f"{dup['near']['found']}/{dup['near']['reached']} (of those that reached dedup)",
        "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in rep["seconds"].items()),
        f"output: {rep['outputs']['dataset']}  plots: {rep['outputs']['plots']}  "
        f"log: {rep['outputs']['log']}",
    ]
    return "\n".join(lines)
