"""Resume drift: the input, an option or the model changes between a killed run and its rerun.

The rerun must refuse with one clear line (exit 6), or start over with --overwrite; it must
never mix rows made before the change with rows made after it.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import mmtools, write_shards
from forked import cli, run_to_end
from harness import (
    INPUT_SHARDS,
    THREADS,
    TINY_CLIP,
    check_complete,
    command,
    corpus_table,
    make_inputs,
    one_line,
    reference,
    rows,
)

from mmtools.errors import EXIT_DRIFT


@pytest.fixture
def inputs(tmp_path):
    return make_inputs(tmp_path / "inputs")


def _killed_run(argv, tmp_path) -> None:
    """A run killed after its second commit: _run.json and two shards on disk."""
    assert run_to_end(argv, tmp_path / "killed.log", kill_at=("progress", 2)) == -9


def _snapshot(out) -> dict:
    return {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "_lock"}


def _refused(argv, out, *expected: str) -> None:
    """The rerun is refused with one line naming the change, and leaves the output alone."""
    before = _snapshot(out)
    code, err = cli(*argv)
    assert code == EXIT_DRIFT, err
    assert one_line(err) and "--overwrite" in err
    assert all(e in err for e in expected), err
    assert _snapshot(out) == before


def test_changed_input_behind_the_same_path(inputs, tmp_path):
    """New rows written over the input shards (same names) between the runs."""
    out = tmp_path / "out"
    argv = command("dedup", inputs, out)
    _killed_run(argv, tmp_path)
    write_shards(inputs.dataset, corpus_table(seed=1), INPUT_SHARDS)  # new rows, same file names
    _refused(argv, out, "inputs differs")
    assert cli(*argv, "--overwrite")[0] == 0
    fresh = reference("dedup", inputs, tmp_path / "fresh")
    assert check_complete(out, fresh) == rows(fresh)


def test_changed_caption_behind_the_same_path(inputs, tmp_path):
    out = tmp_path / "out"
    argv = command("ingest", inputs, out)
    _killed_run(argv, tmp_path)
    (inputs.folder / "img00007.txt").write_text("a new caption")
    _refused(argv, out, "inputs differs")


def _swap(argv: list[str], old: str, new: str) -> list[str]:
    changed = list(argv)
    changed[changed.index(old)] = new
    return changed


@pytest.mark.parametrize(
    ("kind", "change", "named"),
    [
        ("mixup", lambda argv: _swap(argv, "0.5", "0.4"), "lam"),
        ("dedup", lambda argv: _swap(argv, "exact", "phash"), "methods"),
        ("embed", lambda argv: [*argv, "--dtype", "float32"], "clip_embed"),
    ],
    ids=["mixup-lam", "dedup-method", "embed-dtype"],
)
def test_changed_option(kind, change, named, inputs, tmp_path):
    out = tmp_path / "out"
    argv = command(kind, inputs, out)
    _killed_run(argv, tmp_path)
    _refused(change(argv), out, f"options differ: {named}")


def test_changed_model(inputs, tmp_path):
    out = tmp_path / "out"
    argv = command("embed", inputs, out)
    _killed_run(argv, tmp_path)
    other = tmp_path / "wider-clip.json"
    other.write_text(json.dumps({**TINY_CLIP, "embed_dim": 24}))
    changed = _swap(argv, str(inputs.model), str(other))
    _refused(changed, out, "options differ: clip_embed")
    assert cli(*changed, "--overwrite")[0] == 0
    table = pq.read_table(out / "part-00000.parquet")
    assert table.schema.field("image_embedding").type.list_size == 24


def _checkpoint(path, seed: int) -> None:
    import open_clip
    import torch

    open_clip.add_model_config(str(path.parent / "tiny-clip.json"))
    torch.manual_seed(seed)
    torch.save(open_clip.create_model("tiny-clip").state_dict(), path)


@pytest.mark.parametrize("changed", ["checkpoint", "config"])
def test_model_replaced_behind_the_same_path(changed, inputs, tmp_path):
    ckpt = inputs.model.parent / "tiny.pt"
    _checkpoint(ckpt, seed=1)
    out = tmp_path / "out"
    argv = command("embed", inputs, out)
    argv[argv.index("none")] = str(ckpt)
    _killed_run(argv, tmp_path)
    if changed == "checkpoint":
        _checkpoint(ckpt, seed=2)
    else:
        cfg = json.loads(json.dumps(TINY_CLIP))
        cfg["vision_cfg"]["patch_size"] = 16  # same embedding size, another model
        inputs.model.write_text(json.dumps(cfg))
        _checkpoint(ckpt, seed=1)
    _refused(argv, out)


def test_changed_upstream_stream(inputs, tmp_path):
    out = tmp_path / "out"
    first = mmtools("ingest", inputs.folder, "--batch-size", "10", "-q").stdout
    other = make_inputs(tmp_path / "other")
    (other.folder / "img00000.jpg").unlink()  # another folder: other ids from the start
    second = mmtools("ingest", other.folder, "--batch-size", "10", "-q").stdout
    args = ["-", "--model", inputs.model, "--pretrained", "none", "--device", "cpu"]
    args += ["-o", out, "--shard-rows", "20", "-q"]
    broken = mmtools("embed", *args, input=first[: len(first) // 2], check=False, env=THREADS)
    assert broken.returncode == 3 and (out / "_progress" / "00001.json").exists()
    proc = mmtools("embed", *args, input=second, check=False, env=THREADS)
    assert proc.returncode == EXIT_DRIFT, proc.stderr.decode()
