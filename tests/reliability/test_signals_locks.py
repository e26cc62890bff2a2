"""SIGTERM and Ctrl-C stop a run promptly and cleanly; overlapping runs meet the output lock."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest
from conftest import MMTOOLS, mmtools, wait_for
from forked import Run, cli, run_to_end, summary
from harness import THREADS, References, check_complete, command, make_inputs, one_line, rows

from mmtools.errors import EXIT_LOCKED, EXIT_SIGINT, EXIT_SIGTERM


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def refs(inputs, tmp_path_factory):
    return References(inputs, tmp_path_factory.mktemp("refs"))


def _assert_clean_stop(out) -> None:
    """No manifest, no temporary file; every shard on disk is whole and has its record."""
    assert not (out / "_manifest.json").exists()
    assert not list(out.rglob(".tmp-*"))
    records = [json.loads(p.read_text()) for p in (out / "_progress").glob("*.json")]
    committed = {r["shard"] for r in records}
    for shard in out.glob("part-*.parquet"):
        assert shard.name in committed
        pq.read_metadata(shard)


class _Process:
    """A run to signal: the real command line, or a fork of it (no interpreter start-up)."""

    def __init__(self, argv: list[str], log, real: bool):
        self.log = log
        if real:
            with open(log, "wb") as err:
                self.proc = subprocess.Popen(
                    [*MMTOOLS, *argv], stderr=err, env={**os.environ, **THREADS}
                )
            self.pid, self.alive = self.proc.pid, lambda: self.proc.poll() is None
            self.wait = lambda: self.proc.wait(timeout=60)
        else:
            run = Run(argv, log)
            self.pid, self.alive, self.wait = run.proc.pid, run.proc.is_alive, run.wait


@pytest.mark.parametrize(
    ("kind", "signum", "real"),
    [
        ("ingest", signal.SIGTERM, True),
        ("filter", signal.SIGINT, True),
        ("embed", signal.SIGTERM, False),
        ("embed", signal.SIGINT, False),
        ("dedup", signal.SIGTERM, False),
        ("mixup", signal.SIGINT, False),
    ],
    ids=["ingest-TERM", "filter-INT", "embed-TERM", "embed-INT", "dedup-TERM", "mixup-INT"],
)
def test_signal_stops_promptly_cleanly_and_the_rerun_resumes(
    kind, signum, real, inputs, refs, tmp_path
):
    ref, out = refs(kind), tmp_path / "out"
    proc = _Process(command(kind, inputs, out), tmp_path / "run.log", real)
    wait_for(out / "_progress" / "00001.json", proc.alive, timeout=120)
    t0 = time.monotonic()
    os.kill(proc.pid, signum)
    assert proc.wait() == {signal.SIGTERM: EXIT_SIGTERM, signal.SIGINT: EXIT_SIGINT}[signum]
    assert time.monotonic() - t0 < 10  # a few seconds, well under a 30 s grace period
    err = (tmp_path / "run.log").read_text()
    assert err.strip().splitlines() == [
        f"mmtools {command(kind, inputs, out)[0]}: error: stopped by "
        f"{signal.Signals(signum).name}; rerun the command to resume"
    ]
    _assert_clean_stop(out)
    code, err = cli(*command(kind, inputs, out, "--json"))
    assert code == 0 and summary(err)["resumed_from"] > 0
    assert check_complete(out, ref) == rows(ref)


def test_ctrl_c_on_a_pipe_stops_both_ends_and_the_rerun_resumes(inputs, tmp_path):
    """Ctrl-C reaches the whole foreground process group: `mmtools ingest | mmtools dedup`."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    upstream = [*MMTOOLS, "ingest", str(inputs.folder), "--batch-size", "10", "-q"]

    def downstream(path):
        return [*MMTOOLS, "dedup", "-", "-m", "exact", "-o", str(path), "--shard-rows", "20", "-q"]

    stream = subprocess.run(upstream, capture_output=True, check=True, timeout=300).stdout
    subprocess.run(downstream(ref), input=stream, check=True, timeout=300)

    def pipe():
        up = subprocess.Popen(  # a process group of its own, like a shell's foreground job
            upstream, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=os.setpgrp
        )
        down = subprocess.Popen(
            downstream(out),
            stdin=up.stdout,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: os.setpgid(0, up.pid),
        )
        up.stdout.close()
        return up, down

    up, down = pipe()
    # The downstream has read the stream's schema and opened its output: both are running.
    wait_for(out / "_run.json", lambda: down.poll() is None, timeout=120)
    os.killpg(up.pid, signal.SIGINT)
    assert up.wait(timeout=30) in (EXIT_SIGINT, 0)  # 0: the downstream went first
    assert down.wait(timeout=30) in (EXIT_SIGINT, 3)  # 3: it saw the stream break first
    for p in (up, down):
        assert b"Traceback" not in p.stderr.read()
    assert not (out / "_manifest.json").exists()
    up, down = pipe()
    assert (down.wait(timeout=300), up.wait(timeout=300)) == (0, 0)
    assert check_complete(out, ref) == rows(ref)


# -- the output lock --------------------------------------------------------------------------


@contextlib.contextmanager
def _stopped_first_run(kind, inputs, out, log):
    """A forked run paused (SIGSTOP) while it holds the output lock, after its first commit."""
    run = Run(command(kind, inputs, out), log)
    try:
        wait_for(out / "_progress" / "00000.json", run.proc.is_alive, timeout=120)
        os.kill(run.proc.pid, signal.SIGSTOP)
        assert run.proc.is_alive()
        yield run
    finally:
        if run.proc.is_alive():  # a failed test must not leave a stopped process behind
            run.proc.kill()


def test_second_writer_is_refused_with_the_holder_pid(inputs, refs, tmp_path):
    out = tmp_path / "out"
    with _stopped_first_run("dedup", inputs, out, tmp_path / "first.log") as first:
        second = mmtools(*command("dedup", inputs, out), check=False)
        assert second.returncode == EXIT_LOCKED
        err = second.stderr.decode()
        assert one_line(err) and f"(pid {first.proc.pid})" in err and "--wait-lock" in err
        os.kill(first.proc.pid, signal.SIGCONT)
        assert first.wait() == 0
        assert check_complete(out, refs("dedup")) == rows(refs("dedup"))


def test_wait_lock_waits_for_the_holder_then_finds_the_work_done(inputs, refs, tmp_path):
    out = tmp_path / "out"
    with _stopped_first_run("mixup", inputs, out, tmp_path / "first.log") as first:
        argv = [*MMTOOLS, *command("mixup", inputs, out, "--wait-lock", "--json")]
        second = subprocess.Popen(argv, stderr=subprocess.PIPE)
        time.sleep(2.0)
        assert second.poll() is None  # blocked on the lock, not failed
        os.kill(first.proc.pid, signal.SIGCONT)
        assert first.wait() == 0
        assert second.wait(timeout=120) == 0
        assert summary(second.stderr.read().decode())["already_complete"] is True
        assert check_complete(out, refs("mixup")) == rows(refs("mixup"))


def test_a_waiting_run_takes_over_from_a_killed_holder_and_resumes(inputs, refs, tmp_path):
    out = tmp_path / "out"
    with _stopped_first_run("embed", inputs, out, tmp_path / "first.log") as first:
        second = Run(
            command("embed", inputs, out, "--wait-lock", "--json"), tmp_path / "second.log"
        )
        time.sleep(1.0)
        assert second.proc.is_alive()
        first.proc.kill()
        assert first.wait() == -signal.SIGKILL
        assert second.wait() == 0, second.stderr()
        done = summary(second.stderr())
        assert done["resumed_from"] >= 10 and not done["already_complete"]
        assert check_complete(out, refs("embed")) == rows(refs("embed"))


@pytest.mark.parametrize("content", [b"999999999", b"", b"not a pid \xff"])
def test_a_stale_lock_file_is_taken_over(content, inputs, refs, tmp_path):
    out = tmp_path / "out"
    assert run_to_end(command("dedup", inputs, out), tmp_path / "k.log", ("progress", 2)) == -9
    (out / "_lock").write_bytes(content)  # a lock file whose holder is gone
    mmtools(*command("dedup", inputs, out))
    assert check_complete(out, refs("dedup")) == rows(refs("dedup"))


def test_overlapping_cron_runs_all_succeed_and_write_each_row_once(inputs, refs, tmp_path):
    out = tmp_path / "out"
    argv = [*MMTOOLS, *command("dedup", inputs, out, "--wait-lock", "--json")]
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE) for _ in range(3)]
    summaries = []
    for p in procs:
        assert p.wait(timeout=300) == 0
        summaries.append(summary(p.stderr.read().decode()))
    assert sorted(s["already_complete"] for s in summaries) == [False, True, True]
    assert check_complete(out, refs("dedup")) == rows(refs("dedup"))
