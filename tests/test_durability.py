"""Durable commits (fsync on, the default): the order of syncs and renames, and a kill/resume.

The rest of the suite runs with MMTOOLS_FSYNC=0 (see conftest), so here the default path runs.
Each run is traced at the system-call level (`os.fsync`, `os.replace`, `os.rename`,
`os.mkdir`, `os.unlink`, `os.rmdir`, each still doing its real work) and the trace is replayed
against a model of what a power cut can lose: a file's content until it is fsynced, a new
directory entry (a rename or mkdir) until its directory is fsynced. Every rename must find
its file synced and every earlier entry durable, so a progress record or the manifest is
never on disk ahead of what it names; the manifest is the last rename, durable before the
run's bookkeeping is removed.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import make_image_folder, mmtools, read_dataset, wait_for

from mmtools import columns as C

# -- tracing ----------------------------------------------------------------------------------


@dataclass
class Trace:
    """The file-system calls of one run under `root`, in order: (call, path, path or kind)."""

    root: str
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, call: str, path, other: str = "") -> None:
        path = os.path.realpath(os.fspath(path))
        if path == self.root or path.startswith(self.root + os.sep):
            self.events.append((call, path, other))

    def relative(self) -> list[tuple[str, str, str]]:
        """The events with paths relative to the root."""
        rel = os.path.relpath
        return [
            (c, rel(p, self.root), rel(o, self.root) if o[:1] == "/" else o)
            for c, p, o in self.events
        ]

    def names(self, call: str) -> list[tuple[str, str]]:
        """(path, other) of each `call`, paths relative to the root."""
        return [(p, o) for c, p, o in self.relative() if c == call]


def trace_calls(monkeypatch, root: Path) -> Trace:
    """Record the commit-related calls under `root`; each still calls the real function."""
    trace = Trace(os.path.realpath(root))
    real = {n: getattr(os, n) for n in ("fsync", "replace", "rename", "mkdir", "unlink", "rmdir")}

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        trace.add("fsync", os.readlink(f"/proc/self/fd/{fd}"), kind)
        return real["fsync"](fd)

    def moving(name):
        def move(src, dst, *args, **kwargs):
            result = real[name](src, dst, *args, **kwargs)
            trace.add("replace", src, os.path.realpath(os.fspath(dst)))
            return result

        return move

    def at_dir(name):
        def call(path, *args, dir_fd=None, **kwargs):
            result = real[name](path, *args, dir_fd=dir_fd, **kwargs)
            where = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
            trace.add(name, os.path.join(where, path))
            return result

        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moving("replace"))
    monkeypatch.setattr(os, "rename", moving("rename"))
    for name in ("mkdir", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, at_dir(name))
    return trace


def check_durable(trace: Trace) -> list[str]:
    """Replay `trace` against a power cut; what it could lose at each rename or removal."""
    synced: set[str] = set()  # files whose content is on disk, by current name
    pending: set[str] = set()  # directory entries (renames, mkdirs) not yet on disk
    problems = []
    for call, path, other in trace.events:
        if call == "fsync" and other == "file":
            synced.add(path)
        elif call == "fsync":
            pending = {p for p in pending if os.path.dirname(p) != path}
        elif call == "mkdir":
            pending.add(path)
        elif call == "replace":
            rel = os.path.relpath(other, trace.root)
            if path not in synced:
                problems.append(f"{rel}: renamed before its content was synced")
            if pending:
                lost = sorted(os.path.relpath(p, trace.root) for p in pending)
                problems.append(f"{rel}: renamed while {lost} could still be lost")
            synced.discard(path)
            synced.add(other)
            pending.add(other)
        elif pending:  # unlink, rmdir: removing bookkeeping needs what it stood for on disk
            lost = sorted(os.path.relpath(p, trace.root) for p in pending)
            problems.append(f"{os.path.relpath(path, trace.root)} removed while {lost} pending")
    if pending:
        problems.append(f"the run ended with {sorted(pending)} not synced")
    return problems


# -- one traced run ------------------------------------------------------------------------


def run_inline(args: list) -> None:
    """The `mmtools` command `args` in this process (so its calls can be traced)."""
    from typer.testing import CliRunner

    from mmtools.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output


def folder_with_bad_files(root: Path) -> Path:
    """25 captioned JPEGs and two files ingest rejects (so reject shards are committed too)."""
    make_image_folder(root, 25)
    (root / "img00004z.jpg").write_bytes(b"\xff\xd8\xff not really")
    (root / "img00017z.jpg").write_bytes(b"just text")
    return root


SMALL = ["--shard-rows", 10, "--batch-size", 5, "-q"]  # several commit units of each kind
COMMANDS = {
    "ingest": lambda src, out: ["ingest", src, "-o", out, *SMALL],
    "filter": lambda src, out: ["filter", src, "--where", "width > 0", "-o", out, *SMALL],
    "dedup": lambda src, out: ["dedup", src, "-m", "exact", "-o", out, *SMALL],
}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """A 25-row dataset in 3 shards, with 2 reject rows, for the commands that read one."""
    root = tmp_path_factory.mktemp("durable-input")
    out = root / "ds"
    mmtools(*COMMANDS["ingest"](folder_with_bad_files(root / "imgs"), out))
    return out


def traced_run(kind: str, ingested: Path, tmp_path: Path, monkeypatch) -> tuple[Path, Trace]:
    """Run command `kind` into a fresh output with fsync on; its output and its trace."""
    monkeypatch.setenv("MMTOOLS_FSYNC", "1")
    source = folder_with_bad_files(tmp_path / "imgs") if kind == "ingest" else ingested
    out = tmp_path / "new" / "out"  # two new directories: their entries must be synced too
    trace = trace_calls(monkeypatch, tmp_path)
    run_inline(COMMANDS[kind](source, out))
    monkeypatch.undo()
    return out, trace


# -- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(COMMANDS))
def test_every_rename_finds_its_file_synced_and_every_earlier_entry_durable(
    kind, ingested, tmp_path, monkeypatch
):
    out, trace = traced_run(kind, ingested, tmp_path, monkeypatch)
    problems = check_durable(trace)
    assert not problems, "\n".join(problems)
    manifest = json.loads((out / "_manifest.json").read_text())
    renamed = [dst for _, dst in trace.names("replace")]
    assert renamed[-1] == "new/out/_manifest.json"  # the manifest is the last rename
    committed = [s["name"] for s in manifest["shards"]] + manifest["rejects"]["shards"]
    assert {f"new/out/{n}" for n in committed} <= set(renamed[:-1])
    if kind == "ingest":
        assert manifest["rejects"]["rows"] == 2 and len(manifest["shards"]) == 3


def durable_commit(directory: str, tmp: str, final: str) -> list[tuple[str, str, str]]:
    """The calls of one commit: the file synced, renamed, then its directory synced."""
    src, dst = f"{directory}/{tmp}", f"{directory}/{final}"
    return [("fsync", src, "file"), ("replace", src, dst), ("fsync", directory, "dir")]


def durable_mkdir(path: str) -> list[tuple[str, str, str]]:
    """The calls of making a directory: made, then its parent synced."""
    return [("mkdir", path, ""), ("fsync", os.path.dirname(path), "dir")]


def test_a_shard_is_synced_then_renamed_then_its_directory_synced_before_its_record(
    ingested, tmp_path, monkeypatch
):
    """The order for the first unit, spelled out: the record never precedes the shard."""
    _, trace = traced_run("ingest", ingested, tmp_path, monkeypatch)
    out = "new/out"
    expected = [
        *durable_commit(out, ".tmp-part-00000.parquet", "part-00000.parquet"),
        *durable_mkdir(f"{out}/_rejects"),
        *durable_commit(f"{out}/_rejects", ".tmp-00000", "part-00000.parquet"),
        *durable_mkdir(f"{out}/_progress"),
        *durable_commit(f"{out}/_progress", ".tmp-00000.json", "00000.json"),
    ]
    calls = trace.relative()
    steps = iter(calls)
    missing = [e for e in expected if e not in steps]  # each found after the one before
    assert missing == [], calls


def test_the_manifest_is_synced_renamed_and_its_directory_synced_before_cleanup(
    ingested, tmp_path, monkeypatch
):
    _, trace = traced_run("filter", ingested, tmp_path, monkeypatch)
    calls = [(c, p) for c, p, _ in trace.relative()]
    at = calls.index(("replace", "new/out/.tmp-_manifest.json"))
    assert calls[at - 1] == ("fsync", "new/out/.tmp-_manifest.json")
    assert calls[at + 1] == ("fsync", "new/out")
    removed = [p for c, p in calls[at:] if c in ("unlink", "rmdir")]
    assert "new/out/_run.json" in removed and "new/out/_progress" in removed
    assert not [c for c, _ in calls[at + 2 :] if c in ("replace", "mkdir")]


# Broken commits the model must catch, or a passing check above would prove nothing.
def _rename_unsynced(self, tmp, final):
    os.replace(self.path(tmp), self.path(final))
    os.fsync(fd := os.open(os.path.dirname(self.path(final)), os.O_RDONLY))
    os.close(fd)


def _directory_synced_first(self, tmp, final):
    from mmtools.io.manifest import fsync_path

    fsync_path(self.path(tmp))
    fsync_path(os.path.dirname(self.path(final)))
    os.replace(self.path(tmp), self.path(final))


def _makedirs_unsynced(self, name=""):
    os.makedirs(self.path(name), exist_ok=True)


BROKEN = {
    "file not synced": ("commit", _rename_unsynced, "renamed before its content was synced"),
    "directory synced first": ("commit", _directory_synced_first, "could still be lost"),
    "new directory not synced": ("makedirs", _makedirs_unsynced, "could still be lost"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_the_check_catches_a_broken_commit(broken, ingested, tmp_path, monkeypatch):
    from mmtools.io.fs import Store

    method, replacement, message = BROKEN[broken]
    monkeypatch.setattr(Store, method, replacement)
    _, trace = traced_run("ingest", ingested, tmp_path, monkeypatch)
    assert any(message in p for p in check_durable(trace)), check_durable(trace)


def test_fsync_off_skips_every_sync_but_keeps_the_renames(ingested, tmp_path, monkeypatch):
    out, trace = traced_run("filter", ingested, tmp_path, monkeypatch)
    assert trace.names("fsync")
    monkeypatch.setenv("MMTOOLS_FSYNC", "0")
    quiet = trace_calls(monkeypatch, tmp_path)
    run_inline(COMMANDS["filter"](ingested, tmp_path / "off"))
    monkeypatch.undo()
    assert quiet.names("fsync") == []
    assert [d.replace("off/", "new/out/") for _, d in quiet.names("replace")] == [
        d for _, d in trace.names("replace")
    ]
    assert read_dataset(tmp_path / "off").equals(read_dataset(out))


# -- kill and resume with fsync on -------------------------------------------------------

# `mmtools` with each fsync appended to a log, so the test sees that the durable path ran.
LAUNCHER = """
import os, sys
real, log = os.fsync, os.environ["FSYNC_LOG"]
def fsync(fd):
    real(fd)
    with open(log, "a") as f:
        f.write(os.readlink(f"/proc/self/fd/{fd}") + "\\n")
os.fsync = fsync
sys.argv = ["mmtools", *sys.argv[1:]]
from mmtools.cli import main
main()
"""


def start_ingest(listing: Path, out: Path, log: Path, workers: int) -> subprocess.Popen:
    """`mmtools ingest` with fsync on (each fsync logged to `log`), started."""
    argv = ["ingest", listing, "-o", out, "--shard-rows", 20, "--workers", workers, "-q"]
    env = {**os.environ, "MMTOOLS_FSYNC": "1", "FSYNC_LOG": str(log)}
    command = [sys.executable, "-c", LAUNCHER, *map(str, argv)]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, log: Path) -> list[str]:
    """Wait for a run to succeed; the paths it fsynced."""
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    return log.read_text().splitlines()


def test_a_run_killed_with_fsync_on_resumes_to_the_same_rows(tmp_path, slow_listing):
    reference, out = tmp_path / "ref", tmp_path / "out"
    finish(start_ingest(slow_listing, reference, tmp_path / "ref.log", 16), tmp_path / "ref.log")
    proc = start_ingest(slow_listing, out, tmp_path / "killed.log", 4)
    wait_for(out / "_progress" / "00003.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "_manifest.json").exists()
    synced = (tmp_path / "killed.log").read_text().splitlines()
    assert str(out / ".tmp-part-00002.parquet") in synced and str(out) in synced
    synced = finish(
        start_ingest(slow_listing, out, tmp_path / "resumed.log", 16), tmp_path / "resumed.log"
    )
    assert str(out / ".tmp-_manifest.json") in synced
    assert str(out / ".tmp-part-00000.parquet") not in synced  # resumed, not redone
    got, want = read_dataset(out), read_dataset(reference)
    assert got.num_rows == want.num_rows == 400
    for column in (C.ID, C.IMAGE_SHA256, C.TEXT):
        assert got.column(column).to_pylist() == want.column(column).to_pylist()
    assert not list(out.rglob(".tmp-*")) and not (out / "_progress").exists()
