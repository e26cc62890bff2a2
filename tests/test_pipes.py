"""Arrow IPC pipes between real mmtools processes: streaming, early close, upstream death."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pyarrow as pa
from conftest import MMTOOLS, image_bytes, mmtools, read_dataset

from mmtools.errors import EXIT_DATA


def _pipe(*commands: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Run `a | b | ...` as real OS pipes; return each process with its stderr."""
    procs, prev = [], None
    for i, args in enumerate(commands):
        last = i == len(commands) - 1
        p = subprocess.Popen(
            args,
            stdin=prev.stdout if prev else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if prev:
            prev.stdout.close()  # so the upstream sees SIGPIPE/EPIPE when we exit
        procs.append(p)
        prev = p
        del last
    out = procs[-1].stdout.read()
    results = []
    for p in procs:
        p.wait(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, p.stderr.read()))
    return results


def test_ingest_into_head(image_folder):
    up, down = _pipe([*MMTOOLS, "ingest", str(image_folder)], [*MMTOOLS, "head", "-n", "3"])
    assert down.returncode == 0
    lines = down.stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["id", "image", "text"]
    assert len(lines) == 5 and "<jpeg" in lines[2]
    assert b"Traceback" not in up.stderr + down.stderr


def test_stream_carries_rows_and_rejects(image_folder):
    (image_folder / "broken.jpg").write_bytes(b"nope")
    up, down = _pipe([*MMTOOLS, "ingest", str(image_folder)], [*MMTOOLS, "info", "--json"])
    assert (up.returncode, down.returncode) == (0, 0)
    desc = json.loads(down.stdout)
    assert desc["rows"] == 30
    assert desc["lineage"][0]["command"] == "ingest" and desc["lineage"][0]["rejected"] == 1


def test_head_closes_pipe_quietly_and_fast(tmp_path):
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "many", 3000)
    t0 = time.monotonic()
    up, down = _pipe(
        [*MMTOOLS, "ingest", str(folder), "--batch-size", "64"], [*MMTOOLS, "head", "-n", "1"]
    )
    assert down.returncode == 0 and len(down.stdout.decode().splitlines()) == 3
    assert up.returncode == 0  # stopped quietly by the closed pipe: head's choice, not a failure
    assert up.stderr.count(b"\n") <= 2 and b"Traceback" not in up.stderr + down.stderr
    assert time.monotonic() - t0 < 30


def test_shell_head_closes_pipe_quietly(image_folder):
    proc = subprocess.run(
        f"{' '.join(MMTOOLS)} ingest {image_folder} -q | head -c 10 > /dev/null",
        shell=True,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == b""


def test_rerunning_a_finished_pipeline_under_pipefail_exits_0_and_changes_nothing(tmp_path):
    # Images large enough that the stream overflows the pipe buffers: the upstream stages are
    # still writing when the finished last stage leaves.
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(30):
        (folder / f"img{i:02d}.jpg").write_bytes(image_bytes(i, size=(256, 256)))
    out = tmp_path / "out"
    mm = " ".join(MMTOOLS)
    script = (
        f"set -o pipefail; {mm} ingest {folder} --batch-size 4 -q"
        f" | {mm} filter --where 'width > 0' --batch-size 4 -q"
        f" | {mm} dedup -m exact -o {out}; "
        # each stage's status, then the pipeline's (pipefail: the last non-zero one)
        'statuses="${PIPESTATUS[*]} $?"; echo "statuses $statuses" >&2; exit "${statuses##* }"'
    )

    def files() -> dict:
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    first = subprocess.run(["bash", "-c", script], capture_output=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stderr.decode().splitlines()[-1] == "statuses 0 0 0 0"
    made = files()
    assert "_manifest.json" in made and len(read_dataset(out)) == 30
    second = subprocess.run(["bash", "-c", script], capture_output=True, timeout=300)
    err = second.stderr.decode().splitlines()
    assert second.returncode == 0 and err[-1] == "statuses 0 0 0 0"
    assert err[0] == f"mmtools dedup: {out} is already complete; nothing to do"
    assert files() == made


def test_upstream_killed_mid_stream_fails_downstream(tmp_path, image_folder):
    full = mmtools("ingest", image_folder, "-q").stdout
    cut = full[: len(full) // 2]
    proc = mmtools("info", "-", input=cut, check=False)
    assert proc.returncode == EXIT_DATA
    assert "broke off" in proc.stderr.decode() or "end marker" in proc.stderr.decode()
    # A stream cut exactly between messages (no trailer) is caught too.
    reader = pa.ipc.open_stream(full)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, reader.schema) as w:
        w.write_batch(reader.read_next_batch())
    proc = mmtools(
        "export",
        "-",
        "-o",
        tmp_path / "x",
        "--format",
        "jsonl",
        input=sink.getvalue().to_pybytes(),
        check=False,
    )
    assert proc.returncode == EXIT_DATA and "end marker" in proc.stderr.decode()
    assert not (tmp_path / "x" / "_export.json").exists()


def test_upstream_sigkill_fails_downstream(tmp_path, slow_listing):
    up = subprocess.Popen(
        [*MMTOOLS, "ingest", str(slow_listing), "--shard-rows", "5", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    down = subprocess.Popen(
        [*MMTOOLS, "info", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Relay the stream and kill the upstream once it is well into it (some batches of the
    # 400 rows passed on), however slow the machine is; then pass on what it had written.
    relayed = 0
    while relayed < 20_000 and (chunk := up.stdout.read1(65536)):
        down.stdin.write(chunk)
        relayed += len(chunk)
    up.send_signal(signal.SIGKILL)
    up.wait()
    _, err = down.communicate(input=up.stdout.read(), timeout=30)
    assert relayed >= 20_000, "the upstream ended before it was killed"
    assert down.returncode == EXIT_DATA and b"end marker" in err


def test_refuses_to_write_binary_to_a_terminal(image_folder):
    import os
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.run(
        [*MMTOOLS, "ingest", str(image_folder)], stdout=follower, stderr=subprocess.PIPE, timeout=60
    )
    os.close(follower)
    os.close(leader)
    assert proc.returncode == 2 and b"terminal" in proc.stderr


def test_empty_stdin_is_a_clear_error():
    proc = mmtools("head", "-", input=b"", check=False)
    assert proc.returncode == EXIT_DATA and "standard input is empty" in proc.stderr.decode()


def test_non_arrow_stdin_is_a_clear_error():
    proc = mmtools("head", "-", input=image_bytes(1), check=False)
    assert proc.returncode == EXIT_DATA
    assert "not an Arrow IPC stream" in proc.stderr.decode()
