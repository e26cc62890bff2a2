"""README claims about the recipes and the demo's plots and clip_score calibration."""

from __future__ import annotations

import fcntl
import io
import os
import re
import stat
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import mmtools, read_dataset
from llm_server import LLMServer
from PIL import Image
from test_recipes import _tar, shapes  # noqa: F401  (shapes: module fixture, 40 ingested images)
from test_recipes_filter import RECIPES, pool, run_recipe  # noqa: F401

from mmtools import columns as C
from mmtools.demo import synth


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `root`: (mtime_ns, size, content)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size, p.read_bytes())
    return out


def _rerun_changes_nothing(name: str, *args, **env) -> None:
    """Rerun a recipe whose output (the second positional argument) is finished."""
    out = Path(args[1])
    before = _snapshot(out)
    assert before, f"{out} is empty"
    again = run_recipe(name, *args, **env)
    assert again.returncode == 0, again.stderr.decode()
    assert _snapshot(out) == before


# -- W32: rerun on a finished output, a recipe exits 0 and writes nothing ----------------------


def test_threshold_and_top30_recipes_rerun_exit_0_and_write_nothing(pool, tmp_path):  # noqa: F811
    src, _ = pool
    for name in ("laion_threshold.sh", "datacomp_top30.sh"):
        out = tmp_path / name
        proc = run_recipe(name, src, out)
        assert proc.returncode == 0, proc.stderr.decode()
        _rerun_changes_nothing(name, src, out)


def test_mixgen_recipe_rerun_exits_0_and_writes_nothing(shapes, tmp_path):  # noqa: F811
    proc = run_recipe("mixgen.sh", shapes / "ds", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr.decode()
    _rerun_changes_nothing("mixgen.sh", shapes / "ds", tmp_path / "out")


# -- W33: laclip_rewrite.sh sends the few-shot examples as chat turns (and reruns idle) ---------


def _examples() -> list[tuple[str, str]]:
    lines = (RECIPES / "prompts" / "rewrite_examples.txt").read_text().splitlines()
    pairs = [ln.split("=>", 1) for ln in lines if ln.strip() and not ln.startswith("#")]
    return [(a.strip(), b.strip()) for a, b in pairs]


def test_laclip_recipe_sends_the_few_shot_examples_before_each_caption(shapes, tmp_path):  # noqa: F811
    examples = _examples()
    assert len(examples) == 4
    captions = set(read_dataset(shapes / "ds").column(C.TEXT).to_pylist())
    out = tmp_path / "out"
    with LLMServer() as server:
        env = {"BASE_URL": server.url, "MODEL": "tiny"}
        proc = run_recipe("laclip_rewrite.sh", shapes / "ds", out, **env)
        assert proc.returncode == 0, proc.stderr.decode()
        assert len(server.messages) == 40
        for messages in server.messages:
            assert [m["role"] for m in messages] == ["user", "assistant"] * 4 + ["user"]
            for (alt, caption), (user, assistant) in zip(
                examples, zip(messages[:-1:2], messages[1:-1:2], strict=True), strict=True
            ):
                assert user["content"].rstrip().endswith(f"Caption: {alt}")
                assert assistant["content"] == caption
            last = messages[-1]["content"].rstrip()
            assert last.startswith(messages[0]["content"].rstrip()[: -len(examples[0][0])])
            assert last.split("Caption: ", 1)[1] in captions
        # W32: rerun on the finished output, it asks the server nothing and writes nothing.
        _rerun_changes_nothing("laclip_rewrite.sh", shapes / "ds", out, **env)
        assert server.requests == 40


# -- W34: alt_synthetic_mix.sh: VLM captions, mixed into `text` at MIX ---------------------------


def test_alt_synthetic_recipe_mixes_vlm_captions_into_half_the_rows(shapes, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    with LLMServer() as server:
        env = {"BASE_URL": server.url, "MODEL": "tiny-vlm"}
        proc = run_recipe("alt_synthetic_mix.sh", shapes / "ds", out, **env)
        assert proc.returncode == 0, proc.stderr.decode()
        # One request per row, each carrying its image (a VLM caption, not a text rewrite).
        assert server.requests == 40 and len(server.images) == 40
        assert {fmt for _, _, fmt in server.images} == {"JPEG"}
        _rerun_changes_nothing("alt_synthetic_mix.sh", shapes / "ds", out, **env)  # W32
        assert server.requests == 40
    rows = read_dataset(out).to_pylist()
    source = read_dataset(shapes / "ds").to_pylist()
    alt = {r[C.ID]: r[C.TEXT] for r in source}
    assert len(rows) == 40
    assert all(r[C.TEXT_ORIGINAL] == alt[r[C.ID]] for r in rows)
    assert all(r[C.TEXT_SYNTHETIC] and r[C.TEXT_SYNTHETIC] != r[C.TEXT_ORIGINAL] for r in rows)
    synthetic = [r for r in rows if r[C.TEXT] == r[C.TEXT_SYNTHETIC]]
    assert all(r[C.TEXT] == r[C.TEXT_ORIGINAL] for r in rows if r not in synthetic)
    assert {r[C.CAPTION_SOURCE] for r in rows if r not in synthetic} == {"alt"}
    assert "alt" not in {r[C.CAPTION_SOURCE] for r in synthetic}
    # MIX defaults to 0.5: a Binomial(40, 0.5) count, fixed by the seed; 12..28 is +-2.5 sd.
    assert 12 <= len(synthetic) <= 28


# -- W35, W36: the defaults the recipes pass to mmtools -----------------------------------------

STUB = """#!/usr/bin/env bash
printf '%s\\0' "$@" >"$(mktemp "$STUB_LOG/call.XXXXXX")"
cat >/dev/null
[ "$1" = info ] && echo '{"name": "id"}'
exit 0
"""


def _calls(stub_dir: Path, name: str, *args, **env) -> list[list[str]]:
    """The mmtools command lines a recipe runs, recorded by a stand-in `mmtools`."""
    stub, log = stub_dir / "mmtools", stub_dir / f"{name}.calls"
    log.mkdir()
    if not stub.exists():
        stub.write_text(STUB)
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    # The defaults come from the recipe, not from the caller's environment.
    base = {k: v for k, v in os.environ.items() if k not in ("MODEL", "PRETRAINED", "QUERIES",
                                                                "MAX_SIM")}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(RECIPES / name), *map(str, args)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env={**base, "MMTOOLS": str(stub), "STUB_LOG": str(log), **env},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return [p.read_text().split("\0")[:-1] for p in sorted(log.iterdir())]


def _option(calls: list[list[str]], option: str) -> set[str]:
    return {c[i + 1] for c in calls for i, a in enumerate(c) if a == option}


@pytest.mark.parametrize(
    "name, args, env, model, pretrained",
    [
        ("laion_threshold.sh", ["in", "out"], {}, "ViT-B-32", "openai"),
        ("datacomp_top30.sh", ["in", "out"], {}, "ViT-B-32", "laion2b_s34b_b79k"),
        ("semdedup.sh", ["in", "out"], {}, "ViT-B-32", "laion2b_s34b_b79k"),
        ("query_filter.sh", ["in", "out"], {}, "ViT-B-32", "laion2b_s34b_b79k"),
        ("train_quality_head.sh", ["in", "out"], {}, "ViT-B-32", "laion2b_s34b_b79k"),
        ("datacomp_image_filter.sh", ["pool", "ref", "out"], {}, "ViT-B-32", "laion2b_s34b_b79k"),
        ("cron_incremental.sh", ["INBOX", "out"], {}, "ViT-B-32", "laion2b_s34b_b79k"),
        ("laion_subsets.sh", ["in", "out"], {"AESTHETIC_HEAD": "a.pth"}, "ViT-L-14", "openai"),
    ],
)
def test_recipes_default_to_the_models_readme_names(tmp_path, name, args, env, model, pretrained):
    if name == "cron_incremental.sh":
        (tmp_path / "inbox" / "00000").mkdir(parents=True)
        args = [tmp_path / "inbox", tmp_path / "out"]
    else:
        args = [tmp_path / a for a in args]
    calls = _calls(tmp_path, name, *args, **env)
    assert _option(calls, "--model") == {model}
    assert _option(calls, "--pretrained") == {pretrained}


def test_query_filter_recipe_defaults_to_three_queries_at_0_25(tmp_path):
    calls = _calls(tmp_path, "query_filter.sh", tmp_path / "in", tmp_path / "out")
    (score,) = [c for c in calls if c[0] == "score"]
    queries = [score[i + 1] for i, a in enumerate(score) if a == "--query"]
    names = [score[i + 1] for i, a in enumerate(score) if a == "--query-name"]
    assert queries == ["a watermark", "text", "a logo"]
    assert names == ["q1", "q2", "q3"]
    (where,) = _option(calls, "--where")
    assert where == "q1 < 0.25 AND q2 < 0.25 AND q3 < 0.25"


# -- U16: cron_incremental.sh is locked ---------------------------------------------------------


def test_cron_recipe_skips_while_another_run_holds_the_lock(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    _tar(inbox / "00000.tar", 0, 2)
    (out / "curated").mkdir(parents=True)
    env = {"MODEL": "mmtools-shapes", "PRETRAINED": "", "WHERE": "clip_score > -1"}
    with open(out / ".cron.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run still going
        proc = run_recipe("cron_incremental.sh", inbox, out, **env)
    assert proc.returncode == 0, proc.stderr.decode()
    log = (out / "cron.log").read_text().splitlines()
    assert len(log) == 1 and log[0].endswith(" skipped: the previous run is still going")
    assert list((out / "curated").iterdir()) == [] and not (out / "seen").exists()


# -- W31: the demo's stats --plot step writes the CLIP score, aspect and mixup λ plots ---------


def test_demo_stats_plot_step_writes_clip_score_aspect_and_lambda_pngs(tmp_path):
    from mmtools.demo.chain import DemoConfig, stages

    (plot_stage,) = [cmds for n, cmds in stages(tmp_path, tmp_path / "images", DemoConfig(), 0.5)
                     if n == "stats --plot"]  # fmt: skip
    (command,) = plot_stage
    assert command == ["stats", str(tmp_path / "final"), "--plot", str(tmp_path / "plots")]
    # A dataset with the final stage's kind of columns: rows and mixed rows, scored.
    n = 12
    rng = np.random.default_rng(0)
    images = [s.image for s in synth.generate(n, seed=0)]
    blobs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "JPEG")
        blobs.append(buf.getvalue())
    mixed = np.arange(n) >= 9
    table = pa.table(
        {
            C.ID: [f"r{i}" for i in range(n)],
            C.IMAGE: C.media_array(blobs, [None] * n),
            C.TEXT: [f"a red circle number {i}" for i in range(n)],
            C.WIDTH: pa.array([im.width for im in images], pa.int32()),
            C.HEIGHT: pa.array([im.height + i for i, im in enumerate(images)], pa.int32()),
            C.CLIP_SCORE: pa.array(rng.uniform(0.6, 0.9, n), pa.float32()),
            "mixup_lambda": pa.array([0.5 if m else None for m in mixed], pa.float32()),
        }
    )
    from conftest import write_shards

    write_shards(tmp_path / "final", table)
    mmtools(*command)
    pngs = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"clip_score.png", "image.aspect.png", "mixup_lambda.png"} <= pngs
    # One histogram per numeric column or measure, nothing else.
    assert pngs == {
        "clip_score.png", "mixup_lambda.png", "width.png", "height.png",
        "image.aspect.png", "image.min_side.png",
        "text.words.png", "text.chars.png",
    }  # fmt: skip
    for name in pngs:
        with Image.open(tmp_path / "plots" / name) as im:
            assert im.format == "PNG"
            im.load()


# -- U13: the demo's clip_score cut has the fewest expected errors at the 15% mismatch rate ----


def _scored(monkeypatch, matched: np.ndarray, shuffled: np.ndarray) -> int:
    """Make calibrate_threshold see these matched and shuffled cosines; return n.

    The cosines come from `embed`; the model it would embed with is not needed for them."""
    from mmtools.demo import train
    from mmtools.models import shapes as shapes_model

    n = len(matched)
    image = np.eye(n, dtype=np.float64)
    text = np.diag(matched.astype(np.float64))
    # np.roll(text, 1)[i] is text[i - 1]: put shuffled[i] on row i - 1, column i.
    text[np.arange(n) - 1, np.arange(n)] = shuffled
    monkeypatch.setattr(train, "embed", lambda *a, **k: (image, text))
    monkeypatch.setattr(shapes_model, "create", lambda *a, **k: (None, None, None))
    return n


def _errors(prior: float, matched, shuffled, cut: float) -> float:
    return prior * np.mean(shuffled >= cut) + (1 - prior) * np.mean(matched < cut)


def test_demo_calibrates_at_the_planted_15_percent_mismatch_rate():
    from mmtools.demo.chain import DemoConfig

    assert DemoConfig().mismatch == 0.15


@pytest.mark.parametrize("prior, want", [(0.15, 0.3), (0.5, 0.7)])
def test_calibrated_cut_trades_the_two_errors_by_the_mismatch_rate(monkeypatch, prior, want):
    from mmtools.demo.chain import calibrate_threshold

    # Cut 0.3 lets half the shuffled pairs through; cut 0.7 drops a tenth of the matched ones.
    matched = np.array([0.7] * 18 + [0.3] * 2)
    shuffled = np.array([0.2] * 10 + [0.5] * 10)
    n = _scored(monkeypatch, matched, shuffled)
    assert calibrate_threshold(prior, n=n) == want


def test_calibrated_cut_has_the_fewest_expected_errors_of_any_cut(monkeypatch):
    from mmtools.demo.chain import calibrate_threshold

    rng = np.random.default_rng(4)
    matched = np.round(rng.normal(0.62, 0.08, 60), 2)
    shuffled = np.round(rng.normal(0.45, 0.08, 60), 2)
    n = _scored(monkeypatch, matched, shuffled)
    cut = calibrate_threshold(0.15, n=n)
    grid = np.round(np.arange(-1.0, 1.0005, 0.001), 3)  # any cut, at the 3 decimals it rounds to
    best = min(_errors(0.15, matched, shuffled, c) for c in grid)
    assert _errors(0.15, matched, shuffled, cut) == pytest.approx(best, abs=1e-12)
    assert re.fullmatch(r"-?\d+\.\d{1,3}", repr(cut))
