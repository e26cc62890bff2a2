"""Every documented exit code, triggered through the real command line by its cause; the same
cause gives the same code in every command."""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MMTOOLS, image_bytes, make_image_folder, mmtools, read_dataset, wait_for

from mmtools.errors import EXIT_CODES


def _one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """The single stderr line of a failed command, checked to be the house error line."""
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mmtools {command}: error: "), lines
    return lines[0]


def _success(tmp_path, dataset) -> None:
    proc = mmtools("filter", dataset, "--where", "width > 0", "-o", tmp_path / "ok", "-q")
    assert proc.returncode == 0 and read_dataset(tmp_path / "ok").num_rows == 30


def _broken_writer(tmp_path, dataset, flag: str) -> subprocess.CompletedProcess:
    """`filter` whose writer raises: an unexpected error inside a run (a bug)."""
    code = (
        "import sys\n"
        "from mmtools import engines\n"
        "def broken(self, rows, res): raise RuntimeError('writer broke')\n"
        "engines.Writer.write = broken\n"
        f"sys.argv = ['mmtools', 'filter', {str(dataset)!r}, '--where', 'true', "
        f"'-o', {str(tmp_path / 'o')!r}, {flag!r}]\n"
        "from mmtools.cli import main\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)


def _failure(tmp_path, dataset) -> None:
    # An unexpected error inside a run is a bug: exit 1, one line.
    proc = _broken_writer(tmp_path, dataset, "-q")
    assert proc.returncode == 1
    assert _one_error_line(proc, "filter").endswith(
        "RuntimeError: writer broke (rerun with -v for details)"
    )


def test_an_unexpected_error_with_v_shows_the_traceback(tmp_path, dataset):
    proc = _broken_writer(tmp_path, dataset, "-v")
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.strip().splitlines()[-1].endswith("RuntimeError: writer broke")


# The user misspelled a column: exit 2 in every command that takes one.
MISSPELLED = {
    "filter --where": ["filter", "{ds}", "--where", "widht > 3", "-o", "{out}"],
    "filter --by": ["filter", "{ds}", "--top-fraction", "0.5", "--by", "widht", "-o", "{out}"],
    "dedup --keep": ["dedup", "{ds}", "-m", "exact", "--keep", "highest:widht", "-o", "{out}"],
    "dedup --column": ["dedup", "{ds}", "-m", "semantic", "--column", "widht", "-o", "{out}"],
    "mixup --pairing": ["mixup", "{ds}", "--pairing", "same:widht", "-o", "{out}"],
    "head -c": ["head", "{ds}", "-c", "id,widht"],
    "stats -c": ["stats", "{ds}", "-c", "widht"],
}


def _usage(tmp_path, dataset) -> None:
    for what, argv in MISSPELLED.items():
        args = [a.format(ds=dataset, out=tmp_path / "u") for a in argv]
        proc = mmtools(*args, check=False)
        assert proc.returncode == 2, (what, proc.stderr)
        assert "widht" in _one_error_line(proc, argv[0]), what
        assert not (tmp_path / "u" / "_manifest.json").exists()


def _data_contract(tmp_path, dataset) -> None:
    # A column the step needs that the data lacks (no embeddings for semantic dedup) ...
    proc = mmtools("dedup", dataset, "-m", "semantic", "-o", tmp_path / "d", check=False)
    assert proc.returncode == 3
    assert "needs column(s) image_embedding" in _one_error_line(proc, "dedup")
    # ... and a stream cut short.
    full = mmtools("filter", dataset, "--where", "true", "-o", "-", "-q").stdout
    proc = mmtools("info", "-", input=full[: len(full) // 2], check=False)
    assert proc.returncode == 3


def _noise_png(seed: int, side: int) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _partial(tmp_path, dataset) -> None:
    # A file-size limit (as a full disk): the shards before it stay committed; rerun resumes.
    folder = make_image_folder(tmp_path / "big", 12)
    (folder / "sub" / "img00009.jpg").write_bytes(_noise_png(9, 300))  # a shard over the limit
    limit = 200_000

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "p"
    argv = [*MMTOOLS, "ingest", str(folder), "-o", str(out), "--shard-rows", "2", "-q"]
    proc = subprocess.run(argv, preexec_fn=limited, capture_output=True, timeout=120)
    assert proc.returncode == 4
    assert "rerun the same command to resume" in _one_error_line(proc, "ingest")
    assert not (out / "_manifest.json").exists() and list((out / "_progress").glob("*.json"))
    assert subprocess.run(argv, capture_output=True, timeout=120).returncode == 0
    assert read_dataset(out).num_rows == 12


def _locked(tmp_path, dataset) -> None:
    from mmtools.io.lock import DirLock

    out = tmp_path / "l"
    out.mkdir()
    lock = DirLock(str(out / "_lock"))
    lock.acquire()
    try:
        proc = mmtools("filter", dataset, "--where", "true", "-o", out, check=False)
    finally:
        lock.release()
    assert proc.returncode == 5 and "--wait-lock" in _one_error_line(proc, "filter")


def _drift(tmp_path, dataset) -> None:
    mmtools("filter", dataset, "--where", "width > 0", "-o", tmp_path / "dr", "-q")
    proc = mmtools("filter", dataset, "--where", "width > 1", "-o", tmp_path / "dr", check=False)
    assert proc.returncode == 6 and "--overwrite" in _one_error_line(proc, "filter")


def _failsafe(tmp_path, dataset) -> None:
    # Thirty copies of one image: dedup drops 29 of 30 (96.7%), over its default 0.95.
    copies = tmp_path / "copies"
    copies.mkdir()
    for i in range(30):
        (copies / f"c{i:02d}.jpg").write_bytes(image_bytes(0))
    mmtools("ingest", copies, "-o", tmp_path / "cds", "-q")
    proc = mmtools("dedup", tmp_path / "cds", "-m", "exact", "-o", tmp_path / "fs", check=False)
    assert proc.returncode == 7
    line = proc.stderr.decode().strip().splitlines()[-1]
    assert line.startswith("mmtools dedup: error: 29 of 30 input rows (96.7%) were dropped")
    assert read_dataset(tmp_path / "fs").num_rows == 1  # committed


def _cantcreat(tmp_path, dataset) -> None:
    if os.geteuid() == 0:  # root writes through permissions: put a file in the way instead
        (tmp_path / "file").write_text("not a directory")
        out = tmp_path / "file" / "out"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "out"
    for argv in (
        ["filter", dataset, "--where", "true", "-o", out],
        ["export", dataset, "-o", out],
        ["stats", dataset, "--plot", out],
    ):
        proc = mmtools(*argv, check=False)
        assert proc.returncode == 73, (argv, proc.stderr)
        assert f"cannot write {out}" in _one_error_line(proc, argv[0])


def _refused_directory(tmp_path) -> Path | None:
    """A directory this user may not create entries in: a 0o555 one, or for root (whom
    permissions do not stop) sysfs, where the kernel refuses new files; None if none."""
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        return tmp_path / "ro"
    try:
        os.mkdir("/sys/mmtools-probe")
    except PermissionError:
        return Path("/sys")
    except OSError:
        return None
    os.rmdir("/sys/mmtools-probe")
    return None


def test_permission_denied_is_73_for_a_directory_and_a_shard(tmp_path, dataset):
    where = _refused_directory(tmp_path)
    if where is None:
        pytest.skip("no directory here refuses this user")
    proc = mmtools("filter", dataset, "--where", "true", "-o", where / "out", check=False)
    assert proc.returncode == 73
    line = _one_error_line(proc, "filter")
    assert line.startswith(f"mmtools filter: error: cannot write {where / 'out'}: ")
    assert "permission denied" in line or "operation not permitted" in line
    # pyarrow's own error (no errno, no file name) for a shard that cannot be created
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmtools.errors import EXIT_CANTCREAT, cannot_write

    with pytest.raises(OSError) as raised:
        pq.write_table(pa.table({"a": [1]}), str(where / "part-00000.parquet"))
    err = cannot_write(raised.value, str(where))
    assert err is not None and err.exit_code == EXIT_CANTCREAT
    assert cannot_write(raised.value, str(tmp_path / "elsewhere")) is None  # not the output


def _temporary(tmp_path, dataset) -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "x"}
    env |= {"AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    env |= {"AWS_EC2_METADATA_DISABLED": "true"}
    proc = mmtools("info", "s3://nowhere/ds", env=env, check=False, timeout=120)
    assert proc.returncode == 75 and "s3://nowhere/ds" in _one_error_line(proc, "info")


def _signal(signum: int):
    def trigger(tmp_path, dataset) -> None:
        from conftest import serve_images

        url, server = serve_images(delay=0.05)
        listing = tmp_path / "slow.csv"
        listing.write_text("url,caption\n" + "".join(f"{url}/img/{i},c{i}\n" for i in range(400)))
        out = tmp_path / f"sig{signum}"
        argv = [*MMTOOLS, "ingest", str(listing), "-o", str(out), "--shard-rows", "5", "-q"]
        try:
            run = subprocess.Popen(argv, stderr=subprocess.PIPE)
            wait_for(out / "_progress" / "00000.json", run, timeout=120)
            t0 = time.monotonic()
            run.send_signal(signum)
            code = run.wait(timeout=60)
        finally:
            server.shutdown()
        assert code == 128 + signum and time.monotonic() - t0 < 10
        assert b"rerun the command to resume" in run.stderr.read()

    return trigger


TRIGGERS = {
    0: _success,
    1: _failure,
    2: _usage,
    3: _data_contract,
    4: _partial,
    5: _locked,
    6: _drift,
    7: _failsafe,
    73: _cantcreat,
    75: _temporary,
    130: _signal(signal.SIGINT),
    143: _signal(signal.SIGTERM),
}


def test_every_documented_code_has_a_trigger():
    assert list(TRIGGERS) == list(EXIT_CODES)


@pytest.mark.parametrize("code", list(EXIT_CODES))
def test_exit_code(code, tmp_path, dataset):
    TRIGGERS[code](tmp_path, dataset)


def test_a_closed_reader_is_exit_0_not_141(image_folder):
    up = subprocess.Popen(
        [*MMTOOLS, "ingest", str(image_folder), "--batch-size", "2", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = up.stdout.read(100)  # the stream has started
    up.stdout.close()
    assert first and up.wait(timeout=60) == 0
    assert up.stderr.read() == b""
