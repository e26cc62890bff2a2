"""Fail-safes: a run that rejects every row, or rejects or drops more than its limits allow,
commits its output and exits 7 with one line saying why; over half gets a warning."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    KILL_AFTER_FIRST_COMMIT,
    MMTOOLS,
    image_bytes,
    make_image_folder,
    manifest_summary,
    mmtools,
    read_dataset,
    read_rejects,
)

from mmtools import columns as C
from mmtools.errors import EXIT_FAILSAFE
from mmtools.models import shapes

SHAPES_BUILT = shapes.weights_path().exists()


def _copies(root, n: int, distinct: int = 1):
    """A folder of `n` images, `distinct` different ones, repeated."""
    root.mkdir()
    for i in range(n):
        (root / f"c{i:02d}.jpg").write_bytes(image_bytes(i % distinct))
        (root / f"c{i:02d}.txt").write_text(f"caption {i}")
    return root


def _last(proc) -> str:
    return proc.stderr.decode().strip().splitlines()[-1]


def test_ingest_rejecting_every_row_commits_and_exits_7(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(5):
        (bad / f"b{i}.jpg").write_bytes(b"not an image at all")
    proc = mmtools("ingest", bad, "-o", tmp_path / "out", check=False)
    assert proc.returncode == EXIT_FAILSAFE
    assert _last(proc) == (
        f"mmtools ingest: error: 5 of 5 input rows (100.0%) were rejected (not_image 5); the "
        f"output is committed to {tmp_path / 'out'}: check the input and the options, or pass "
        "--max-reject-rate 1 to accept such a run"
    )
    assert (tmp_path / "out" / "_manifest.json").exists()
    assert read_dataset(tmp_path / "out").num_rows == 0
    assert len(read_rejects(tmp_path / "out")) == 5  # nothing lost
    # Accepted on purpose: the same run exits 0.
    ok = mmtools("ingest", bad, "-o", tmp_path / "ok", "--max-reject-rate", "1", "-q")
    assert ok.returncode == 0 and len(read_rejects(tmp_path / "ok")) == 5


@pytest.mark.parametrize(("limit", "code"), [("0.5", 0), ("0.3", EXIT_FAILSAFE)])
def test_max_reject_rate_is_a_share_of_the_input(tmp_path, limit, code):
    folder = make_image_folder(tmp_path / "imgs", 6)
    for i in range(4):
        (folder / f"broken{i}.jpg").write_bytes(b"")
    out = tmp_path / "out"
    proc = mmtools("ingest", folder, "-o", out, "--max-reject-rate", limit, check=False)
    assert proc.returncode == code
    assert read_dataset(out).num_rows == 6 and len(read_rejects(out)) == 4
    if code:
        assert "4 of 10 input rows (40.0%) were rejected (zero_byte 4)" in _last(proc)
        assert "--max-reject-rate 1" in _last(proc)


def test_dedup_dropping_more_than_95_percent_exits_7_by_default(tmp_path):
    mmtools("ingest", _copies(tmp_path / "imgs", 30), "-o", tmp_path / "ds", "-q")
    out = tmp_path / "out"
    proc = mmtools("dedup", tmp_path / "ds", "-m", "exact", "--exact-key", "image", "-o", out,
                   check=False)  # fmt: skip
    assert proc.returncode == EXIT_FAILSAFE
    assert _last(proc).startswith(
        "mmtools dedup: error: 29 of 30 input rows (96.7%) were dropped (exact 29)"
    )
    assert "--max-drop-rate 1" in _last(proc)
    assert read_dataset(out).num_rows == 1 and manifest_summary(out)["dropped"] == {"exact": 29}
    # Rerun: the output is complete, nothing is judged again.
    again = mmtools("dedup", tmp_path / "ds", "-m", "exact", "--exact-key", "image", "-o", out)
    assert "already complete" in again.stderr.decode()


def test_dedup_at_95_percent_passes_with_a_warning(tmp_path):
    # 20 rows, one image: 19 dropped = 95%, not more.
    mmtools("ingest", _copies(tmp_path / "imgs", 20), "-o", tmp_path / "ds", "-q")
    proc = mmtools("dedup", tmp_path / "ds", "-m", "exact", "--exact-key", "image",
                   "-o", tmp_path / "out")  # fmt: skip
    err = proc.stderr.decode().splitlines()
    assert proc.returncode == 0
    assert "mmtools dedup: warning: 19 of 20 input rows (95.0%) were dropped (exact 19)" in err


def test_dedup_mark_counts_marked_rows(tmp_path):
    mmtools("ingest", _copies(tmp_path / "imgs", 30), "-o", tmp_path / "ds", "-q")
    out = tmp_path / "out"
    proc = mmtools("dedup", tmp_path / "ds", "-m", "exact", "--exact-key", "image", "--mark",
                   "-o", out, check=False)  # fmt: skip
    assert proc.returncode == EXIT_FAILSAFE
    assert "29 of 30 input rows (96.7%) were marked as duplicates (exact 29)" in _last(proc)
    marked = read_dataset(out).column(C.IS_DUPLICATE).to_pylist()
    assert len(marked) == 30 and sum(marked) == 29


def test_filter_warns_over_half_and_trips_its_limit(tmp_path, dataset):
    where = "id >= 'sub'"  # the 10 rows of the subfolder kept, 20 of 30 dropped
    proc = mmtools("filter", dataset, "--where", where, "-o", tmp_path / "a", "--json")
    lines = proc.stderr.decode().strip().splitlines()
    warning = "mmtools filter: warning: 20 of 30 input rows (66.7%) were dropped (where 20)"
    assert proc.returncode == 0 and warning in lines
    assert json.loads(lines[-1])["warnings"] == [warning]  # the summary stays the last line
    proc = mmtools("filter", dataset, "--where", where, "-o", tmp_path / "b",
                   "--max-drop-rate", "0.6", check=False)  # fmt: skip
    assert proc.returncode == EXIT_FAILSAFE and read_dataset(tmp_path / "b").num_rows == 10
    quiet = mmtools("filter", dataset, "--where", where, "-o", tmp_path / "c", "-q")
    assert quiet.stderr == b""


def test_in_a_pipe_the_stage_that_rejected_fails_not_its_reader(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(4):
        (bad / f"b{i}.jpg").write_bytes(b"\x00" * 10)
    out = tmp_path / "out"
    script = (
        f"set -o pipefail; {' '.join(MMTOOLS)} ingest {bad} -q | "
        f"{' '.join(MMTOOLS)} filter --where 'true' -o {out} -q; "
        'echo "${PIPESTATUS[*]}" >&2'
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, timeout=120)
    lines = proc.stderr.decode().strip().splitlines()
    assert lines[-1] == "7 0"  # the reader had no rows of its own to judge
    assert "4 of 4 input rows (100.0%) were rejected" in lines[0]
    assert read_dataset(out).num_rows == 0 and len(read_rejects(out)) == 4


@pytest.mark.skipif(not SHAPES_BUILT, reason="mmtools-shapes weights not built")
def test_embed_rejecting_every_row_exits_7(tmp_path):
    # The user's report: rows without captions, all rejected, used to exit 0.
    n = 6
    table = pa.table(
        {
            C.ID: [f"r{i}" for i in range(n)],
            C.IMAGE: C.media_array([image_bytes(i) for i in range(n)], [None] * n),
            C.TEXT: [""] * n,
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    proc = mmtools("embed", tmp_path / "in.parquet", "--model", "mmtools-shapes",
                   "--modalities", "image,text", "-o", out, check=False)  # fmt: skip
    assert proc.returncode == EXIT_FAILSAFE, proc.stderr
    assert f"{n} of {n} input rows (100.0%) were rejected (no_text {n})" in _last(proc)
    assert (out / "_manifest.json").exists() and len(read_rejects(out)) == n


def _killed_then_resumed(*args) -> tuple[dict, str]:
    """Run `mmtools ARGS`, SIGKILLed right after its first shard's progress record, then the
    same command again; the resumed run's --json summary and its last stderr line."""
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_FIRST_COMMIT, *map(str, args), "--json"],
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    proc = mmtools(*args, "--json", check=False)
    assert proc.returncode == EXIT_FAILSAFE, proc.stderr.decode()
    lines = proc.stderr.decode().strip().splitlines()
    return json.loads(lines[-2]), lines[-1]


def test_a_resumed_run_judges_only_the_rows_it_read_after_resuming_rejects(tmp_path):
    """30 files: 5 broken, 5 good (the shard committed before the kill), then 15 good and 5
    broken. The resumed run read 20 rows and rejected 5: 25%, over 0.2; the whole input's
    10 of 30 or the 10 rejects over 20 rows would give other figures."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(30):
        broken = i < 5 or i >= 25
        (folder / f"f{i:02d}.jpg").write_bytes(b"not an image" if broken else image_bytes(i))
    out = tmp_path / "out"
    args = ["ingest", folder, "-o", out, "--shard-rows", 5, "--max-reject-rate", "0.2"]
    summary, last = _killed_then_resumed(*args)
    assert (summary["resumed_from"], summary["rows_in"]) == (10, 20)
    assert (summary["rejected"], summary["reasons"]) == (5, {"not_image": 5})
    assert last == (
        "mmtools ingest: error: 5 of 20 input rows (25.0%) were rejected (not_image 5); the "
        f"output is committed to {out}: check the input and the options, or pass "
        "--max-reject-rate 1 to accept such a run"
    )
    assert read_dataset(out).num_rows == 20 and len(read_rejects(out)) == 10


def test_a_resumed_run_judges_only_the_rows_it_read_after_resuming_drops(tmp_path):
    """The same with drops: 5 dropped and 5 kept before the kill, then 15 kept and 5 dropped."""
    keep = [0] * 5 + [1] * 20 + [0] * 5
    table = pa.table({C.ID: [f"r{i:02d}" for i in range(30)], "keep": keep})
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    args = ["filter", tmp_path / "in.parquet", "--where", "keep = 1", "-o", out]
    summary, last = _killed_then_resumed(*args, "--shard-rows", 5, "--max-drop-rate", "0.2")
    assert (summary["resumed_from"], summary["rows_in"]) == (10, 20)
    assert summary["dropped"] == {"where": 5}
    assert last.startswith(
        "mmtools filter: error: 5 of 20 input rows (25.0%) were dropped (where 5); the output "
        f"is committed to {out}:"
    )
    assert read_dataset(out).column(C.ID).to_pylist() == [f"r{i:02d}" for i in range(5, 25)]


def test_rejecting_over_half_warns_and_exactly_half_does_not(tmp_path):
    """Warned on stderr and in --json's warnings; --max-reject-rate 1 keeps it from exit 7."""
    for broken, warned in ((7, True), (6, False)):
        folder = make_image_folder(tmp_path / f"imgs{broken}", 6)
        for i in range(broken):
            (folder / f"broken{i}.jpg").write_bytes(b"")
        args = ("-o", tmp_path / f"out{broken}", "--max-reject-rate", "1", "--json")
        proc = mmtools("ingest", folder, *args)
        lines = proc.stderr.decode().strip().splitlines()
        n = 6 + broken
        warning = (
            f"mmtools ingest: warning: {broken} of {n} input rows ({100 * broken / n:.1f}%) "
            f"were rejected (zero_byte {broken})"
        )
        assert (warning in lines) is warned
        assert json.loads(lines[-1]).get("warnings", []) == ([warning] if warned else [])


def test_max_drop_rate_1_turns_the_drop_check_off(tmp_path):
    mmtools("ingest", _copies(tmp_path / "imgs", 30), "-o", tmp_path / "ds", "-q")
    out = tmp_path / "out"
    key = ("-m", "exact", "--exact-key", "image")
    proc = mmtools("dedup", tmp_path / "ds", *key, "-o", out, "--max-drop-rate", "1")
    assert proc.returncode == 0 and manifest_summary(out)["dropped"] == {"exact": 29}
    assert "mmtools dedup: warning: 29 of 30 input rows (96.7%) were dropped (exact 29)" in (
        proc.stderr.decode().splitlines()
    )
