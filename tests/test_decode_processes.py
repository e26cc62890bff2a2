"""`embed --decode-in processes`: images decoded in worker processes give what threads give
(rows, rejects, embeddings bit for bit), leave no shared memory behind, and a decoding process
that dies fails the run with one line instead of hanging or losing rows."""

from __future__ import annotations

import gc
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    image_bytes,
    mmtools,
    naming,
    proc_stat,
    processes,
    read_dataset,
    reject_reasons,
    tiny_clip,
)
from test_embed import matrix, media_table
from test_shapes_domain import photo_variants

from mmtools import columns as C
from mmtools.errors import MmtoolsError, UsageError
from mmtools.steps.embed import ClipEmbed, EmbedConfig


@pytest.fixture(scope="module")
def clip_json(tmp_path_factory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("models"))


def _config(clip_json, **kw) -> EmbedConfig:
    kw = {"model": str(clip_json), "pretrained": "none", "device": "cpu", "workers": 2, **kw}
    return EmbedConfig(**kw)


def photos_and_bad_rows(tmp: Path) -> pa.Table:
    """The twelve photographs (flips, crops) as JPEGs, PNGs with alpha, and every bad kind."""
    photos = []
    for i, im in enumerate(photo_variants()):
        buf = io.BytesIO()
        if i % 4 == 3:
            im.convert("RGBA").save(buf, "PNG")
        else:
            im.convert("RGB").save(buf, "JPEG", quality=90)
        photos.append(buf.getvalue())
    on_disk = tmp / "on_disk.jpg"
    on_disk.write_bytes(photos[1])
    cut = photos[0][: len(photos[0]) // 2]
    images = [*photos, cut, b"not an image", b"", None, photos[2], None, None]
    texts = [*(f"photo {i}" for i in range(12)), "cut", "junk", "empty", "none", " ", "d", "m"]
    paths = [None] * 17 + [str(on_disk), str(tmp / "missing.jpg")]
    return media_table(images, texts, paths)


def memfds() -> list[str]:
    """This process's open shared decoding buffers (descriptors, and those that mappings
    hold)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:mmtools-decode-"):
            found.append(target)
    return found


def run_all(step, table: pa.Table, rows: int) -> tuple[pa.Table, dict]:
    step.setup()
    results = list(step.run(table.to_batches(max_chunksize=rows)))
    rejects = [r.rejects for r in results if r.rejects is not None]
    reasons = {}
    for r in rejects:
        reasons.update(dict(zip(r.column(C.ID).to_pylist(), r["reason"].to_pylist(), strict=True)))
    return pa.Table.from_batches([r.batch for r in results]), reasons


def test_processes_give_the_rows_rejects_and_embeddings_threads_give_bit_for_bit(
    clip_json, tmp_path
):
    """Real photographs and every bad kind, batches of 7 split between two processes; the
    float32 buffer (CPU) and the 8-bit one (what a GPU gets) alike."""
    table = photos_and_bad_rows(tmp_path)
    threads, why = run_all(ClipEmbed(_config(clip_json, dtype="float32")), table, 7)
    assert why == {
        "r012": "truncated",
        "r013": "not_image",
        "r014": "zero_byte",
        "r015": "no_media",
        "r016": "no_text",
        "r018": "missing_file",
    }
    assert threads.num_rows == 13
    for raw in (False, True):
        step = ClipEmbed(_config(clip_json, dtype="float32", decode_in="processes"))
        step.setup()
        step._towers["image"].decoder.raw = raw  # True: what a CUDA device chooses
        procs, why_procs = run_all(step, table, 7)
        assert why_procs == why
        assert procs.column(C.ID).to_pylist() == threads.column(C.ID).to_pylist()
        for column in (C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING):
            assert np.array_equal(matrix(procs, column), matrix(threads, column)), (raw, column)
    assert memfds() == []


def test_batches_decode_in_other_processes_and_their_buffers_are_let_go(clip_json):
    """The rows are written by other processes (their pids), straight into the shared
    buffer; a run stopped after its first batch closes every buffer of the batches ahead."""
    table = media_table([image_bytes(i, (50, 40)) for i in range(64)], ["t"] * 64)
    step = ClipEmbed(_config(clip_json, decode_in="processes", batch_size=8))
    step.setup()
    workers = step.start_workers()
    try:
        batch = table.to_batches()[0]
        bufs, jobs = step._submit(workers, batch)
        assert [r for f in jobs["image"] for r in f.result()] == [None] * 64
        pids = {p.pid for p in workers.procs._processes.values()}
        assert pids and os.getpid() not in pids
        copied = step._towers["image"].alloc(64, pin=False)  # what a GPU's pinned copy gets
        _, (done,) = workers.submit("image", 64, [(0, step._values("image", batch, 0, 64))], copied)
        assert done.result() == [None] * 64
        assert np.array_equal(copied["pixels"].numpy(), bufs["image"]["pixels"].numpy())
        assert np.abs(copied["pixels"].numpy()).sum() > 0
    finally:
        workers.close()
    del bufs, jobs  # a buffer's mapping holds its descriptor while the batch's arrays live
    assert memfds() == []
    run = step.run(table.to_batches(max_chunksize=8))
    next(run)  # three more batches are being decoded
    run.close()
    assert memfds() == []


def test_the_fork_server_imports_what_the_decoders_need_once(clip_json):
    """The fork server imports the modules the image decoder is rebuilt from (open_clip's
    transforms: seconds of import) before it forks: a decoding process does not import them
    again, nor does each pool a Ray call starts. (In a fresh process: a fork server is one
    per process, and an earlier test's would be used as it is.)"""
    code = (
        "import sys\n"
        "from multiprocessing import forkserver\n"
        "from mmtools.steps.embed import ClipEmbed, EmbedConfig\n"
        "def main():\n"
        f"    c = EmbedConfig(model={str(clip_json)!r}, pretrained='none', device='cpu',\n"
        "                    workers=2, decode_in='processes')\n"
        "    step = ClipEmbed(c)\n"
        "    step.setup()\n"
        "    workers = step.start_workers()\n"
        "    pid = forkserver._forkserver._forkserver_pid\n"
        "    sys.stdout.buffer.write(open(f'/proc/{pid}/cmdline', 'rb').read())\n"
        "    workers.close()\n"
        "if __name__ == '__main__':\n"
        "    main()\n"
    )
    script = clip_json.parent / "preload.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    preload = proc.stdout
    for module in ("open_clip.transform", "torchvision.transforms.transforms"):
        assert f"'{module}'".encode() in preload, module
    assert b"'builtins'" not in preload and b"'__main__'" not in preload


def _decoding_processes(run) -> list[int]:
    """The decoding processes of a running `step.run` generator (none of this process's
    other children: a Ray cluster an earlier test left joined must live on)."""
    workers = run.gi_frame.f_locals["workers"]
    return [p.pid for p in workers.procs._processes.values()]


@pytest.mark.parametrize("noticed", [False, True], ids=["at-once", "pool-known-broken"])
def test_a_killed_decoding_process_fails_the_run_with_one_line(clip_json, noticed):
    """Whether the next batch finds the pool already broken or one of its pieces dies."""
    table = media_table([image_bytes(i, (50, 40)) for i in range(80)], ["t"] * 80)
    step = ClipEmbed(_config(clip_json, decode_in="processes"))
    step.setup()
    run = step.run(table.to_batches(max_chunksize=8))
    first = next(run)
    assert first.batch.num_rows == 8
    victims = _decoding_processes(run)
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    if noticed:
        time.sleep(2)
    started = time.monotonic()
    with pytest.raises(MmtoolsError) as err:
        list(run)
    assert time.monotonic() - started < 30
    message = str(err.value)
    assert "process decoding images stopped abruptly" in message and "\n" not in message
    del err, run, first  # the traceback holds the run's frame, and its batches' arrays
    gc.collect()
    assert memfds() == []


def test_cli_decode_in_processes_and_its_usage_error(clip_json, tmp_path):
    table = photos_and_bad_rows(tmp_path)
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    common = ["--model", clip_json, "--pretrained", "none", "--batch-size", 5, "--workers", 2]
    plain = mmtools("embed", tmp_path / "in", *common, "-o", tmp_path / "threads")
    assert "decoding in" not in plain.stderr.decode()
    proc = mmtools(
        "embed", tmp_path / "in", *common, "--decode-in", "processes", "-v", "-o", tmp_path / "p"
    )
    assert "clip_embed: decoding in 2 processes" in proc.stderr.decode()
    assert "19 in, 13 out, 6 rejected" in proc.stderr.decode()
    assert reject_reasons(tmp_path / "p") == reject_reasons(tmp_path / "threads")
    ours, theirs = read_dataset(tmp_path / "p"), read_dataset(tmp_path / "threads")
    assert ours.column(C.ID).to_pylist() == theirs.column(C.ID).to_pylist()
    for column in (C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING):
        assert np.array_equal(matrix(ours, column), matrix(theirs, column))
    bad = mmtools(
        "embed", tmp_path / "in", "--decode-in", "forks", "-o", tmp_path / "x", check=False
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.decode()
        .strip()
        .splitlines()[-1]
        .endswith("--decode-in must be threads or processes, not 'forks'")
    )
    with pytest.raises(UsageError):
        ClipEmbed(_config(clip_json, decode_in="fork"))


def test_a_preprocessing_that_cannot_go_to_another_process_is_a_usage_error(clip_json):
    """A model whose transform holds a local function (it cannot be pickled) is refused
    up front, with the way out, rather than failing in the first batch with a traceback."""
    step = ClipEmbed(_config(clip_json, decode_in="processes"))
    step.setup()
    decoder = step._towers["image"].decoder
    resize = decoder.resize
    decoder.resize = lambda img: resize(img)
    table = media_table([image_bytes(i) for i in range(4)], ["t"] * 4)
    with pytest.raises(UsageError, match=r"cannot be sent to another process.*--decode-in threads"):
        list(step.run(table.to_batches()))
    step.config.decode_in = "threads"  # the way out works
    (result,) = list(step.run(table.to_batches()))
    assert result.batch.num_rows == 4


def test_ctrl_c_while_the_decoding_processes_start_stops_with_one_line(clip_json, tmp_path):
    """Ctrl-C in a terminal signals the whole process group, here while the fork server is
    still importing torch: exit 130, the one line of the parent, no process's traceback,
    no process left behind."""
    from conftest import MMTOOLS

    pq.write_table(media_table([image_bytes(i) for i in range(64)], ["t"] * 64), tmp_path / "in.pq")
    args = ["embed", tmp_path / "in.pq", "--model", clip_json, "--pretrained", "none"]
    args += ["--decode-in", "processes", "--workers", "2", "-o", tmp_path / "out"]
    proc = subprocess.Popen(
        [*MMTOOLS, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _children_named(proc.pid, "forkserver") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = err.decode()
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "Error" not in text, text
    assert text.strip().splitlines()[-1] == (
        "mmtools embed: error: stopped by SIGINT; rerun the command to resume"
    )
    # The fork server (and the resource tracker) notice the parent gone once the server's
    # imports are done: a few seconds.
    deadline, left = time.monotonic() + 30, [1]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in processes() if _in_session(p, proc.pid)]
    assert not left


def test_ctrl_c_the_moment_the_fork_server_is_started_is_not_lost(clip_json, tmp_path):
    """The fork server is started with Ctrl-C held back (inherited by it and every process
    it forks); a Ctrl-C that comes meanwhile still stops the run once the server is up."""
    pq.write_table(media_table([image_bytes(i) for i in range(64)], ["t"] * 64), tmp_path / "in.pq")
    args = ["embed", str(tmp_path / "in.pq"), "--model", str(clip_json), "--pretrained", "none"]
    args += ["--decode-in", "processes", "--workers", "2", "-o", str(tmp_path / "out")]
    code = (
        "import os, signal, sys\n"
        "from multiprocessing import forkserver\n"
        "real = forkserver.ensure_running\n"
        "def ensure_running():\n"
        "    real()\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the server has just started\n"
        "forkserver.ensure_running = ensure_running\n"
        f"sys.argv = ['mmtools', *{args!r}]\n"
        "from mmtools.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    text = proc.stderr.decode()
    assert proc.returncode == 130, text
    assert text.strip().splitlines()[-1] == (
        "mmtools embed: error: stopped by SIGINT; rerun the command to resume"
    )


def _children_named(parent: int, word: str) -> list[int]:
    return [pid for pid in naming(word) if (proc_stat(pid) or (0,))[0] == parent]


def _in_session(pid: int, session: int) -> bool:
    """Whether a live (not zombie) process belongs to `session`."""
    try:
        return proc_stat(pid) is not None and os.getsid(pid) == session
    except OSError:  # gone meanwhile
        return False
