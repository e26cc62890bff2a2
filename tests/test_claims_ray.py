"""`--engine ray` and object stores as the README tells them: a step that keeps raising is
retried 3 times, then exit 4 and a rerun resumes; a step's own counters add up the same on
both engines; a cluster out of reach is exit 75; `--ray-address auto` joins the cluster that
`ray start --head` recorded; an object store lost mid-run is exit 4, and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import test_object_store
import test_ray
from conftest import MMTOOLS, mmtools, naming, proc_stat, processes, read_dataset, write_shards
from test_mixup import embedding_file
from test_ray import (
    BATCH,
    SHARD,
    assert_same,
    assert_same_output,
    dataset_source,
    read,
    run_both,
    stream_head,
)

from mmtools import columns as C
from mmtools import engines
from mmtools.engines.local import LocalExecutor
from mmtools.errors import EXIT_LOCKED, EXIT_TEMPORARY, PartialError, TemporaryError
from mmtools.io.dataset import DatasetSink
from mmtools.io.source import Source
from mmtools.step import Result, Step

ROWS = pa.table({C.ID: [f"r{i:03d}" for i in range(40)], C.TEXT: [f"t{i}" for i in range(40)]})

# Their module-scoped Ray cluster and S3 server, started once for this module too.
cluster = test_ray.cluster
s3 = test_object_store.s3


@pytest.fixture(scope="module")
def ray_address(cluster) -> str:
    """test_ray's cluster of 2 CPUs; the steps of this module travel to it by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return cluster


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    """40 rows (ids r000 to r039) in 5 Parquet files: 5 batches, 3 shards (16, 16, 8 rows)."""
    return write_shards(tmp_path_factory.mktemp("rows") / "in", ROWS, shards=5)


# -- a step that raises on a batch ------------------------------------------------------------


class RaisesOnTarget(Step):
    """Passes rows through, but raises on the batch holding `target` until that batch has
    been tried more than `failures` times; each try appends a byte to the file `tries`, which
    every worker process sees."""

    name = "raises"

    def __init__(self, tries: str, target: str, failures: int):
        super().__init__()
        self.tries, self.target, self.failures = tries, target, failures

    def process(self, batch: pa.RecordBatch) -> Result:
        """The batch, unchanged, unless this try of the target batch is to fail."""
        if self.target in batch.column(C.ID).to_pylist():
            with open(self.tries, "ab") as f:
                f.write(b".")
            if os.path.getsize(self.tries) <= self.failures:
                raise RuntimeError("injected failure")
        return Result(batch)


def run_raising(executor, source: Path, out: Path, tries: Path, failures: int):
    """A run of RaisesOnTarget on the last input row's batch by an `executor` class; its
    summary and manifest."""
    step = RaisesOnTarget(str(tries), "r039", failures)
    sink = DatasetSink(str(out), shard_rows=SHARD)
    return engines.run(
        "raises",
        Source([str(source)]),
        [step],
        sink,
        executor=executor(),
        batch_size=BATCH,
        quiet=True,
    )


@pytest.mark.ray
def test_step_raising_three_times_on_a_batch_is_retried_to_the_whole_output(
    ray_address, rows, tmp_path
):
    from mmtools.engines.ray.executor import RayExecutor

    tries = tmp_path / "tries"
    summary, manifest = run_raising(RayExecutor, rows, tmp_path / "out", tries, failures=3)
    assert tries.stat().st_size == 4
    assert read(tmp_path / "out").equals(read_dataset(rows))
    assert summary.rows_out == manifest["rows"] == 40


@pytest.mark.ray
def test_step_raising_a_fourth_time_is_exit_4_and_a_rerun_resumes(ray_address, rows, tmp_path):
    """The batch that keeps failing is the last: the shards before it stay committed."""
    from mmtools.engines.ray.executor import RayExecutor

    out, whole, tries = tmp_path / "out", tmp_path / "whole", tmp_path / "tries"
    with pytest.raises(PartialError, match="rerun the same command to resume") as failed:
        run_raising(RayExecutor, rows, out, tries, failures=4)
    assert failed.value.exit_code == 4
    assert tries.stat().st_size == 4
    assert not (out / "_manifest.json").exists()
    committed = read(out).num_rows
    assert committed >= 16
    summary, manifest = run_raising(RayExecutor, rows, out, tmp_path / "healthy", failures=0)
    assert summary.resumed_from == committed
    assert (tmp_path / "healthy").stat().st_size == 1
    _, expected = run_raising(LocalExecutor, rows, whole, tmp_path / "local", failures=0)
    assert_same_output(out, whole, manifest, expected)


@pytest.mark.ray
def test_a_killed_workers_task_is_rerun_and_its_actor_restarted_up_to_3_times(ray_address, rows):
    """The bounds the executor hands Ray Data for each kind of stage. A real kill on every try
    is test_ray's test_worker_that_always_dies_stops_the_run_after_bounded_retries (tasks);
    an actor pool killed on every try takes about 10 s to spend its 3 restarts."""
    from mmtools.engines.ray import executor as ray_engine
    from mmtools.engines.ray.cluster import RayOptions, connect

    ray = connect(RayOptions())
    ds, per_call = ray_engine._input(ray, Source([str(rows)]), BATCH, 0)
    bounds = {}
    for actor in (False, True):
        step = test_ray.Flaky("unused", "no such id", "raise", loads_model=actor)
        stage = ray_engine._stage(ray, ds, step, False, RayOptions(), per_call)
        bounds[actor] = stage._logical_plan.dag.ray_remote_args
    assert bounds[False]["max_retries"] == 3  # a task whose worker died
    assert (bounds[True]["max_restarts"], bounds[True]["max_task_retries"]) == (3, 3)


def test_below_100_000_input_rows_a_global_step_is_decided_on_the_driver():
    """test_ray's test_small_input_is_grouped_on_the_driver_with_the_same_result shows the
    driver deciding below the threshold (lowered there to 1,000); this pins the threshold."""
    from mmtools.engines.ray import executor as ray_engine

    assert ray_engine.SHUFFLE_MIN_ROWS == 100_000


def test_below_100_000_input_rows_light_steps_compute_on_the_driver():
    """test_ray's test_light_steps_over_a_small_input_compute_in_the_driver shows it (the
    threshold lowered there); this pins the threshold."""
    from mmtools.engines.ray import executor as ray_engine

    assert ray_engine.DRIVER_ROWS == 100_000


# -- counters beside the row counts -----------------------------------------------------------


@pytest.mark.ray
def test_filter_invert_counts_per_rule_add_up_the_same_on_both_engines(
    ray_address, tmp_path, monkeypatch
):
    """Two rules, each the only one to drop its rows: `where` the 5 highest keys, the top
    fraction the 20 lowest; spread over 4 files in shuffled order; on the Ray workers."""
    from mmtools.engines.ray import executor as ray_engine
    from mmtools.steps.filter.step import FilterConfig, make_filter

    monkeypatch.setattr(ray_engine, "DRIVER_ROWS", 0)

    order = np.random.default_rng(5).permutation(40)
    table = pa.table({C.ID: [f"r{i:03d}" for i in order], "key": order.astype(np.float64)})
    write_shards(tmp_path / "in", table, shards=4)
    config = FilterConfig(where="key < 35", top_fraction=0.5, by="key", invert=True)
    source = dataset_source(tmp_path / "in")
    manifests = run_both(tmp_path, "filter", lambda src: [make_filter(config)], source)
    out = assert_same(tmp_path, manifests)
    for m in manifests.values():
        assert m["summary"]["notes"] == {"would_drop_where": 5, "would_drop_top_fraction": 20}
        assert m["dropped"] == {"inverted": 15}
    expected = {f"r{i:03d}" for i in [*range(20), *range(35, 40)]}
    assert set(out[C.ID].to_pylist()) == expected


@pytest.mark.ray
def test_mixups_skipped_pairs_add_up_the_same_on_both_engines(ray_address, tmp_path):
    """Three rows with unusable embeddings: each pair they are a parent of is skipped, on the
    driver's plan, counted by the workers that would have made it."""
    from mmtools.steps.mixup import Mixup, MixupConfig

    clean = embedding_file(tmp_path / "clean.parquet", 40)
    vectors = clean["image_embedding"].to_pylist()
    bad = {"e00004": [float("nan")] * 16, "e00009": [0.0] * 16, "e00031": None}
    for row_id, vector in bad.items():
        vectors[int(row_id[1:])] = vector
    column = pa.array(vectors, clean.schema.field("image_embedding").type)
    write_shards(tmp_path / "in", clean.set_column(3, "image_embedding", column), shards=3)
    config = MixupConfig(mode="embedding", fraction=0.5, keep_originals=True, seed=3)
    engines.run(
        "mixup",
        Source([str(tmp_path / "clean.parquet")]),
        [Mixup(config)],
        DatasetSink(str(tmp_path / "unbroken"), shard_rows=SHARD),
        batch_size=BATCH,
        quiet=True,
    )
    parents = read(tmp_path / "unbroken")[C.MIXUP_PARENTS].to_pylist()
    skipped = sum(1 for pair in parents if pair and set(pair) & set(bad))
    assert skipped >= 3
    source = dataset_source(tmp_path / "in")
    manifests = run_both(tmp_path, "mixup", lambda src: [Mixup(config)], source)
    assert_same(tmp_path, manifests)
    for m in manifests.values():
        assert m["summary"]["notes"] == {"pairs_skipped": skipped}


# -- reaching the cluster ---------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_address_nothing_listens_on_is_exit_75_in_one_line(rows, tmp_path):
    pytest.importorskip("ray")
    port = closed_port()
    proc = mmtools(
        "filter",
        rows,
        "--where",
        "true",
        "-o",
        tmp_path / "out",
        "--engine",
        "ray",
        "--ray-address",
        f"127.0.0.1:{port}",
        check=False,
        timeout=60,
    )
    assert proc.returncode == 75
    assert proc.stderr.decode() == (
        f"mmtools filter: error: cannot reach the Ray cluster at 127.0.0.1:{port} ([Errno 111] "
        "Connection refused); start it (ray start --head) or leave out --ray-address "
        "(MMTOOLS_RAY_ADDRESS) to run a local one\n"
    )


@pytest.mark.parametrize("how", ["RAY_ADDRESS", "recorded"])
def test_an_address_ray_finds_itself_that_nothing_listens_on_is_exit_75_too(how, rows, tmp_path):
    """Ray would retry such an address for minutes: RAY_ADDRESS with no --ray-address, and
    `--ray-address auto` with a stale address recorded by an earlier `ray start --head`."""
    pytest.importorskip("ray")
    from ray._private.utils import get_ray_address_file

    port = closed_port()
    ray_tmp = tmp_path / "raytmp"
    env = {"RAY_TMPDIR": str(ray_tmp)}
    args = ["filter", rows, "--where", "true", "-o", tmp_path / "out", "--engine", "ray"]
    if how == "RAY_ADDRESS":
        env["RAY_ADDRESS"], named = f"127.0.0.1:{port}", "RAY_ADDRESS"
    else:
        env["RAY_ADDRESS"] = ""
        old = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(ray_tmp)
        try:
            record = Path(get_ray_address_file(None))
        finally:
            os.environ.pop("RAY_TMPDIR") if old is None else os.environ.update(RAY_TMPDIR=old)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"127.0.0.1:{port}")
        args += ["--ray-address", "auto"]
        named = "the address ray start recorded"
    proc = mmtools(*args, env=env, check=False, timeout=60)
    assert proc.returncode == 75
    assert proc.stderr.decode() == (
        f"mmtools filter: error: cannot reach the Ray cluster at 127.0.0.1:{port} ([Errno 111] "
        f"Connection refused); start it (ray start --head) or leave out {named} to run a local "
        "one\n"
    )


@contextlib.contextmanager
def silent_listener():
    """A loopback port whose accept queue is full: a new connection's SYN goes unanswered, as
    with a host that drops packets. Yields the port."""
    server = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = [socket.socket() for _ in range(4)]
    try:
        for s in fillers:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(server.getsockname())
        time.sleep(0.05)
        yield server.getsockname()[1]
    finally:
        for s in [*fillers, server]:
            s.close()


def test_ray_address_that_never_answers_is_exit_75_after_the_5_s_connect_timeout(monkeypatch):
    """The check waits CONNECT_TIMEOUT (5 s), then gives up: shortened here so that the test
    shows the wait is that timeout, not the system's minutes of SYN retries."""
    from mmtools.engines.ray import cluster

    assert cluster.CONNECT_TIMEOUT == 5.0
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 0.5)
    with silent_listener() as port:
        started = time.monotonic()
        with pytest.raises(TemporaryError) as unreachable:
            cluster._check_reachable(f"127.0.0.1:{port}", "--ray-address (MMTOOLS_RAY_ADDRESS)")
        waited = time.monotonic() - started
    assert 0.45 <= waited < 2
    assert unreachable.value.exit_code == EXIT_TEMPORARY == 75
    assert str(unreachable.value) == (
        f"cannot reach the Ray cluster at 127.0.0.1:{port} (timed out); start it (ray start "
        "--head) or leave out --ray-address (MMTOOLS_RAY_ADDRESS) to run a local one"
    )


def jobs() -> int:
    """How many drivers have joined the cluster this process is joined to."""
    from ray._private import state

    return len(state.jobs())


@pytest.mark.ray
def test_ray_address_auto_joins_the_cluster_ray_start_recorded(ray_address, rows, tmp_path):
    """`ray start --head` records its address in ray/ray_current_cluster under Ray's temporary
    directory (RAY_TMPDIR): here the address of the module's cluster."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(ray_address)
    before = jobs()
    ray = ["--engine", "ray", "--ray-address", "auto", "-q"]
    env = {"RAY_TMPDIR": str(tmp_path)}
    mmtools("filter", rows, "--where", "id < 'r010'", "-o", tmp_path / "out", *ray, env=env)
    assert jobs() == before + 1
    assert read(tmp_path / "out")[C.ID].to_pylist() == [f"r{i:03d}" for i in range(10)]


@pytest.mark.ray
def test_with_no_ray_address_ray_joins_the_cluster_ray_address_names(ray_address, rows, tmp_path):
    """Ray's own variable: mmtools leaves the choice to Ray when --ray-address is not given."""
    env = {"RAY_ADDRESS": ray_address, "MMTOOLS_RAY_ADDRESS": "", "RAY_TMPDIR": str(tmp_path)}
    before = jobs()
    where = ["--where", "id >= 'r030'", "-o", tmp_path / "out", "--engine", "ray", "-q"]
    mmtools("filter", rows, *where, env=env)
    assert jobs() == before + 1
    assert read(tmp_path / "out")[C.ID].to_pylist() == [f"r{i:03d}" for i in range(30, 40)]


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """The live processes under `root`: pid -> (start time, name)."""
    table = processes()
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, start, name) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (start, name)
                todo.append(pid)
    return found


def still_running(seen: dict[int, tuple[int, str]]) -> set[int]:
    """Those of the processes `seen` (pid -> (start time, name)) still running."""
    return {pid for pid, (start, _) in seen.items() if (proc_stat(pid) or (0, -1))[1] == start}


@pytest.mark.ray
def test_run_with_no_ray_address_starts_its_own_cluster_holds_the_lock_and_stops_it_at_exit(
    rows, tmp_path
):
    """A pipe keeps the run going once its cluster is up. Its Ray processes are told apart
    from other tests' clusters as its descendants, and by its own Ray temporary directory (a
    short path: Ray's socket paths have a length limit)."""
    pytest.importorskip("ray")
    ray_tmp = tempfile.mkdtemp(prefix="mmtools-ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    for name in ("RAY_ADDRESS", "MMTOOLS_RAY_ADDRESS"):
        env.pop(name, None)
    stream, out = arrow_stream(ROWS, 8), tmp_path / "out"
    head = stream_head(stream, 2)
    command = ["filter", "-", "--where", "id < 'r020'", "--batch-size", "8", "--engine", "ray"]
    argv = [*MMTOOLS, *command, "-q", "-o", str(out)]
    run = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen: dict[int, tuple[int, str]] = {}
    try:
        run.stdin.write(head)
        run.stdin.flush()
        deadline = time.monotonic() + 60
        while not {"raylet", "gcs_server"} <= {name for _, name in seen.values()}:
            assert run.poll() is None, run.stderr.read().decode()
            assert time.monotonic() < deadline, f"no cluster started: {seen}"
            seen |= descendants(run.pid)
            time.sleep(0.1)
        assert (out / "_lock").read_text() == str(run.pid)
        # A second writer with --engine ray is refused before it looks for a cluster (past
        # the lock, this unreachable address would be exit 75).
        ray = ["--engine", "ray", "--ray-address", "127.0.0.1:1"]
        second = mmtools("filter", rows, "--where", "true", "-o", out, *ray, check=False)
        seen |= descendants(run.pid)
        run.stdin.write(stream[len(head) :])
        run.stdin.close()
        code = run.wait(timeout=120)
        assert code == 0, run.stderr.read().decode()
        assert second.returncode == EXIT_LOCKED == 5
        assert second.stderr.decode() == (
            f"mmtools filter: error: {out} is being written by another mmtools process "
            f"(pid {run.pid}); wait for it to finish, or pass --wait-lock\n"
        )
        assert read(out)[C.ID].to_pylist() == [f"r{i:03d}" for i in range(20)]
        deadline = time.monotonic() + 10
        while (left := still_running(seen)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, [seen[p] for p in left]
        assert not naming(ray_tmp)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for pid in still_running(seen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.parametrize(
    ("ask", "error"),
    [
        (["--num-gpus-per-worker", "0.5"], "each worker asks for 0.5 GPU and the Ray cluster"),
        (["--ray-concurrency", "64"], "64 model actors of 1 CPU each would leave no CPU of the"),
    ],
    ids=["gpu", "every-cpu"],
)
def test_a_run_that_fails_after_starting_its_own_cluster_stops_it(rows, tmp_path, ask, error):
    """An error leaves the process without Python's teardown (Ray's, at exit, could turn the
    exit code into another); the cluster the run started is stopped first. Here the error
    comes once the cluster is up: a GPU asked of a cluster with none, or model actors that
    would hold every CPU (Ray Data would wait for ever to read their input). Its processes are told
    apart by its own Ray temporary directory, in their environment (Ray's agents rename
    themselves, which clears it from their command lines)."""
    pytest.importorskip("ray")
    ray_tmp = tempfile.mkdtemp(prefix="mmtools-ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    for name in ("RAY_ADDRESS", "MMTOOLS_RAY_ADDRESS"):
        env.pop(name, None)
    try:
        argv = [*MMTOOLS, "rewrite", str(rows), "--backend", "template", "--engine", "ray"]
        run = subprocess.run(
            [*argv, *ask, "-q", "-o", str(tmp_path / "out")], env=env, capture_output=True
        )
        assert run.returncode == 2, run.stderr.decode()
        last = run.stderr.decode().splitlines()[-1]
        assert last.startswith(f"mmtools rewrite: error: {error}"), last
        # A cluster left behind goes on starting its agents for a while: watch for 8 s.
        seen: set[int] = set()
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            seen |= naming(ray_tmp, ("environ", "cmdline"))
            time.sleep(0.1)
        left = seen & naming(ray_tmp, ("environ", "cmdline"))
        assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left]
    finally:
        for pid in naming(ray_tmp, ("environ", "cmdline")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.ray
def test_main_called_from_python_with_a_cluster_already_joined_returns_its_error(rows, tmp_path):
    """Only a command that joined Ray itself leaves without Python's teardown. In a process
    that had joined a cluster before (a notebook, a test; here an earlier `main()` whose
    command started one), a failing command returns SystemExit as usual."""
    pytest.importorskip("ray")
    good = ["filter", str(rows), "--where", "true", "--engine", "ray", "-q"]
    bad = ["filter", str(rows), "--where", "no_such_column > 1", "--engine", "ray", "-q"]
    code = (
        "import sys, ray\n"
        "from mmtools.cli import main\n"
        "def run(argv):\n"
        "    sys.argv = ['mmtools', *argv]\n"
        "    try:\n        main()\n    except SystemExit as e:\n        print('returned', e.code)\n"
        f"run({[*good, '-o', str(tmp_path / 'a')]!r})\n"
        f"run({[*bad, '-o', str(tmp_path / 'b')]!r})\n"
        "print('cluster still joined:', ray.is_initialized())\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MMTOOLS_RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120)
    lines = ["returned 0", "returned 2", "cluster still joined: True"]
    assert proc.stdout.decode().splitlines() == lines, proc.stderr.decode()[-2000:]


# -- an object store lost mid-run -------------------------------------------------------------


class Proxy:
    """A loopback TCP proxy to `upstream` that can be cut (the store lost: connections reset,
    nothing listening) and restored on the same port."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream, self.port, self.sockets = upstream, 0, []
        self.restore()

    def restore(self) -> None:
        """Listen (again) and forward each connection."""
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening and reset every open connection."""
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.sockets = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client = listener.accept()[0]
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def arrow_stream(table: pa.Table, batch: int) -> bytes:
    """`table` as an Arrow IPC stream of `batch`-row batches."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for part in table.to_batches(max_chunksize=batch):
            writer.write_batch(part)
    return sink.getvalue().to_pybytes()


def missing(admin: pafs.FileSystem, key: str) -> bool:
    """Whether `key` is absent from the store."""
    return admin.get_file_info(key).type == pafs.FileType.NotFound


@pytest.fixture(scope="module")
def store_lost(s3) -> dict:
    """`filter` from a pipe to S3 through a Proxy, cut off once the first shard is committed
    (the pipe's first two batches, 16 rows) while the run waits for more input; the same
    command rerun once the store is back; the command run unbroken to another output.

    Its exit code and stderr, the rerun's summary, and the manifests of both outputs.
    """
    env, admin = s3
    host, port = env["AWS_ENDPOINT_URL"].removeprefix("http://").split(":")
    proxy = Proxy((host, int(port)))
    env = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    stream = arrow_stream(ROWS, 8)
    head = stream_head(stream, 2)
    command = ["filter", "-", "--where", "true", "--batch-size", "8", "--shard-rows", "12", "-q"]
    argv = [*MMTOOLS, *command, "-o", "s3://data/lost"]
    try:
        lost = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env}
        )
        with lost.stdin:
            lost.stdin.write(head)
            lost.stdin.flush()
            # The record is copied to its key, then its temporary key deleted: the commit is over.
            while missing(admin, "data/lost/_progress/00000.json") or not missing(
                admin, "data/lost/_progress/.tmp-00000.json"
            ):
                assert lost.poll() is None, lost.stderr.read().decode()
                time.sleep(0.01)
            proxy.cut()
            lost.stdin.write(stream[len(head) :])
        code = lost.wait(timeout=120)
        run = {"code": code, "error": lost.stderr.read().decode()}
        run["complete"] = not missing(admin, "data/lost/_manifest.json")
        proxy.restore()
        resumed = mmtools(*command, "-o", "s3://data/lost", "--json", input=stream, env=env)
    finally:
        proxy.cut()
    run["resumed"] = json.loads(resumed.stderr)
    mmtools(*command, "-o", "s3://data/whole", input=stream, env=s3[0])
    for name in ("lost", "whole"):
        with admin.open_input_stream(f"data/{name}/_manifest.json") as f:
            run[name] = json.loads(f.read())
    return run


def test_store_lost_mid_run_is_exit_4_in_one_line(store_lost):
    assert store_lost["code"] == 4, store_lost["error"]
    assert store_lost["error"].count("\n") == 1
    assert store_lost["error"].startswith("mmtools filter: error: writing s3://data/lost failed (")
    assert store_lost["error"].endswith(
        "); the committed shards are kept: rerun the same command to resume\n"
    )


def test_run_that_lost_its_store_is_resumed_by_a_rerun_to_the_unbroken_output(s3, store_lost):
    admin = s3[1]
    assert store_lost["code"] != 0 and not store_lost["complete"]
    summary = store_lost["resumed"]
    assert (summary["resumed_from"], summary["rows_in"], summary["rows_out"]) == (16, 24, 24)
    outputs = ("lost", "whole")
    shards = {k: [(s["name"], s["rows"]) for s in store_lost[k]["shards"]] for k in outputs}
    assert shards["lost"] == shards["whole"]
    for name in outputs:
        parts = [pq.read_table(f"data/{name}/{s}", filesystem=admin) for s, _ in shards[name]]
        assert pa.concat_tables(parts).equals(ROWS), name
        assert store_lost[name]["rows"] == 40


@pytest.mark.ray
def test_a_model_step_on_ray_leaves_nothing_of_rays_own_on_stderr(rows, tmp_path):
    """A model step's actors would each put a line of Ray's core on stderr, and the log level
    that keeps them off is announced with a line of its own: a quiet run's stderr is empty."""
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MMTOOLS_RAY"))}
    argv = [*MMTOOLS, "rewrite", str(rows), "--backend", "template", "--engine", "ray", "-q"]
    run = subprocess.run([*argv, "-o", str(tmp_path / "out")], env=env, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    assert run.stderr.decode() == ""
