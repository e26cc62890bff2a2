"""Pipes between real processes: a reader that leaves early, a writer that dies mid-stream."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from conftest import MMTOOLS, serve_images
from harness import (
    SOAK,
    THREADS,
    Damage,
    check_complete,
    command,
    make_inputs,
    one_line,
    report,
    rows,
)

from mmtools.errors import EXIT_DATA

EXIT_PIPE = 0  # the reader left: not a failure of the upstream (README, Pipes)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Inputs with larger images: each command writes megabytes, many pipe buffers."""
    return make_inputs(tmp_path_factory.mktemp("inputs"), height=128)


def _stream_args(kind: str, inputs) -> list[str]:
    """The command of `kind` writing an Arrow stream to stdout."""
    argv = command(kind, inputs, "-")
    return [*MMTOOLS, *argv[: argv.index("-o")], "--batch-size", "10", "-q"]


@pytest.mark.parametrize(
    "kind",
    ["filter", "embed", "top-fraction", "dedup", "mixup"],
)
def test_upstream_ends_within_two_seconds_when_head_leaves(kind, inputs):
    up = subprocess.Popen(
        _stream_args(kind, inputs),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **THREADS},
    )
    # `head` leaves mid-stream, after the schema and some batches (global steps: after pass 1).
    head = subprocess.Popen(["head", "-c", "100000"], stdin=up.stdout, stdout=subprocess.DEVNULL)
    up.stdout.close()
    assert head.wait(timeout=300) == 0
    left = time.monotonic()
    assert up.wait(timeout=60) == EXIT_PIPE
    assert time.monotonic() - left < 2.0
    assert up.stderr.read() == b""  # quiet: no traceback, no error line


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory):
    """A listing of 120 image URLs on a loopback server answering in 10 ms each."""
    url, server = serve_images(delay=0.01)
    listing = tmp_path_factory.mktemp("slow") / "slow.csv"
    listing.write_text("url,caption\n" + "".join(f"{url}/img/{i},c{i}\n" for i in range(120)))
    yield [*MMTOOLS, "ingest", str(listing), "--workers", "1", "--batch-size", "5", "-q"]
    server.shutdown()


DOWNSTREAM = {
    "filter": ["filter", "-", "--where", "width > 0"],
    "dedup": ["dedup", "-", "-m", "exact"],
}


def _downstream(kind: str, out) -> list[str]:
    return [*MMTOOLS, *DOWNSTREAM[kind], "-o", str(out), "--shard-rows", "20", "-q"]


def _pipe(up_args, down_args, kill_after: float | None = None):
    up = subprocess.Popen(up_args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    down = subprocess.Popen(
        down_args, stdin=up.stdout, stderr=subprocess.PIPE, env={**os.environ, **THREADS}
    )
    up.stdout.close()
    if kill_after is not None:
        try:
            up.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            up.send_signal(signal.SIGKILL)
    up.wait(timeout=300)
    down.wait(timeout=300)
    return up, down


@pytest.mark.timeout(max(600, 20 * SOAK))
@pytest.mark.parametrize("kind", ["filter", "dedup"])  # a streaming and a global reader
def test_upstream_killed_mid_stream_fails_the_downstream_every_time(kind, slow_source, tmp_path):
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    up, down = _pipe(slow_source, _downstream(kind, ref))
    duration = time.monotonic() - t0
    assert (up.returncode, down.returncode) == (0, 0), down.stderr.read().decode()
    rng = random.Random(kind)
    killed = damage = attempt = 0
    resumed = Damage()
    trials = max(3, SOAK // 5)
    while killed < trials:
        attempt += 1
        out = tmp_path / f"out{attempt}"
        up, down = _pipe(slow_source, _downstream(kind, out), rng.uniform(0.2, duration))
        if up.returncode != -signal.SIGKILL:
            continue
        err = down.stderr.read().decode()
        if down.returncode == 0:  # killed after its end marker: the stream was complete
            assert rows(out) == rows(ref)
            continue
        killed += 1
        damage += down.returncode != EXIT_DATA or (out / "_manifest.json").exists()
        assert one_line(err), err
        # The same pipe, run again, resumes the downstream output where it stopped.
        up, down = _pipe(slow_source, _downstream(kind, out))
        assert (up.returncode, down.returncode) == (0, 0), down.stderr.read().decode()
        resumed.add(check_complete(out, ref), rows(ref))
    report(f"upstream SIGKILL mid-stream -> {kind} -o DIR", resumed, killed)
    assert damage == 0  # every truncated stream failed its reader, without a manifest
    assert (resumed.lost, resumed.duplicated, resumed.changed) == (0, 0, 0)
