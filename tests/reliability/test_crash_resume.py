"""SIGKILL at random and at chosen points of every step kind, then resume: no row lost or twice.

Each command of each step kind (streaming, model, global) is killed MMTOOLS_SOAK times in all
(20 by default; `just soak` sets 200), at seeded random moments of its run, in chains of one
to three kills on the same output (so resumes get killed too), and then run to the end. The
result must equal an uninterrupted run as a multiset of (id, row content hash), with the same
rejects and counts, no temporary file, no progress record, and a consistent manifest.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time

import pyarrow.parquet as pq
import pytest
from forked import POINTS, Run, cli, run_to_end, summary
from harness import (
    KINDS,
    SOAK,
    Damage,
    References,
    check_complete,
    command,
    make_inputs,
    report,
    rows,
)

COMMANDS = [(group, kind) for group, kinds in KINDS.items() for kind in kinds]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def refs(inputs, tmp_path_factory):
    return References(inputs, tmp_path_factory.mktemp("refs"))


def _check_killed_state(out, expected) -> None:
    """After a kill: either no manifest, or a manifest over exactly the complete data."""
    if (out / "_manifest.json").exists():
        assert rows(out) == expected


@pytest.mark.timeout(max(600, 20 * SOAK))  # `just soak` runs ten times as many kills
@pytest.mark.parametrize(("group", "kind"), COMMANDS, ids=[f"{g}-{k}" for g, k in COMMANDS])
def test_random_kills_and_resumes_lose_and_repeat_no_row(group, kind, inputs, refs, tmp_path):
    ref = refs(kind)
    expected = rows(ref)
    # Calibrate the kill window on uninterrupted forked runs (the first one warms caches);
    # each must equal the reference made by the real command line.
    for calib in ("calib0", "calib1"):
        t0 = time.monotonic()
        assert run_to_end(command(kind, inputs, tmp_path / calib), tmp_path / "calib.log") == 0
        duration = time.monotonic() - t0
        assert check_complete(tmp_path / calib, ref) == expected
    wanted = math.ceil(SOAK / len(KINDS[group]))
    rng = random.Random(f"{kind}:{wanted}")
    kills = resume_kills = chain = 0
    damage = Damage()
    while kills < wanted:
        out, log = tmp_path / f"out{chain}", tmp_path / f"run{chain}.log"
        for link in range(rng.choice([1, 2, 3])):
            run = Run(command(kind, inputs, out), log)
            if not run.kill_after(rng.uniform(0.0, duration)):
                assert run.wait() == 0, run.stderr()
                break
            kills, resume_kills = kills + 1, resume_kills + (link > 0)
            _check_killed_state(out, expected)
        assert run_to_end(command(kind, inputs, out), log) == 0, log.read_text()
        damage.add(check_complete(out, ref), expected)
        shutil.rmtree(out)
        chain += 1
    report(f"random SIGKILL: {kind} ({group})", damage, kills)
    assert (damage.lost, damage.duplicated, damage.changed) == (0, 0, 0)
    assert resume_kills > 0 or wanted < 10  # kills hit resuming runs too


@pytest.mark.parametrize("kind", ["filter", "top-fraction"])
def test_filter_resumes_after_a_kill(kind, inputs, refs, tmp_path):
    ref, out = refs(kind), tmp_path / "out"
    argv = command(kind, inputs, out)
    assert run_to_end(argv, tmp_path / "killed.log", kill_at=("progress", 1)) == -9
    code = run_to_end(argv, tmp_path / "resumed.log")
    assert code == 0, (tmp_path / "resumed.log").read_text()
    assert check_complete(out, ref) == rows(ref)


NTH = {"tmp-shard": 3, "shard-renamed": 3, "progress-tmp": 3, "progress": 3}
# Points reached once the manifest is in place: the data is complete, the cleanup is not.
AFTER_MANIFEST = ("manifest", "progress-removed", "run-file-removed")
# Each point on one kind (rejects need a kind that makes some); the chains below add more.
TARGETS = [(p, ("ingest", "embed", "dedup")[i % 3]) for i, p in enumerate(POINTS)]
TARGETS = [(p, "embed" if p == "rejects-renamed" else k) for p, k in TARGETS]


@pytest.mark.parametrize(("point", "kind"), [pytest.param(p, k, id=f"{p}-{k}") for p, k in TARGETS])
def test_kill_at_each_commit_step_then_resume(point, kind, inputs, refs, tmp_path):
    ref, out = refs(kind), tmp_path / "out"
    argv = command(kind, inputs, out)
    code = run_to_end(argv, tmp_path / "killed.log", kill_at=(point, NTH.get(point, 1)))
    assert code == -9, (tmp_path / "killed.log").read_text()
    _check_killed_state(out, rows(ref))
    assert (out / "_manifest.json").exists() == (point in AFTER_MANIFEST)
    assert run_to_end(argv, tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()
    assert check_complete(out, ref) == rows(ref)


@pytest.mark.parametrize("kind", ["ingest", "embed", "mixup"])
def test_a_chain_of_kills_at_every_point_during_resumes(kind, inputs, refs, tmp_path):
    """Kill the first run and then each resume at the next commit step, then finish."""
    ref, out = refs(kind), tmp_path / "out"
    argv = command(kind, inputs, out)
    chain = [p for p in POINTS if p not in AFTER_MANIFEST]
    damage = Damage()
    for i, point in enumerate(chain):
        code = run_to_end(argv, tmp_path / f"{i}.log", kill_at=(point, 2 if point in NTH else 1))
        assert code == -9, (tmp_path / f"{i}.log").read_text()
    assert run_to_end(argv, tmp_path / "end.log") == 0
    damage.add(check_complete(out, ref), rows(ref))
    report(f"targeted SIGKILL chain: {kind}", damage, len(chain))
    assert (damage.lost, damage.duplicated, damage.changed) == (0, 0, 0)


@pytest.mark.parametrize("kind", [k for _, k in COMMANDS])
def test_second_run_of_a_complete_output_does_nothing(kind, inputs, refs):
    ref = refs(kind)
    before = {p: p.read_bytes() for p in sorted(ref.rglob("*")) if p.is_file()}
    code, err = cli(*command(kind, inputs, ref, "--json"))
    assert code == 0, err
    done = summary(err)
    assert done["already_complete"] is True
    assert (done["rows_in"], done["rows_out"], done["rejected"]) == (0, 0, 0)
    after = {p: p.read_bytes() for p in sorted(ref.rglob("*")) if p.is_file()}
    assert after == before


def test_manifest_row_counts_match_each_shard(inputs, refs):
    for kind in ("filter", "dedup"):
        ref = refs(kind)
        manifest = json.loads((ref / "_manifest.json").read_text())
        for shard in manifest["shards"]:
            assert pq.read_metadata(ref / shard["name"]).num_rows == shard["rows"]
