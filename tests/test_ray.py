"""`--engine ray`: the same rows, rejects, manifest and resume as the local engine; retries.

One local Ray cluster (2 CPUs) serves the whole module. Each step runs under both engines,
in process, on the same input, and the two output datasets must be the same: rows and
values, shard layout, reject rows and manifest counts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    MMTOOLS,
    image_bytes,
    make_image_folder,
    mmtools,
    naming,
    proc_stat,
    wait_for,
)
from test_embed import tiny_clip

from mmtools import columns as C
from mmtools import engines
from mmtools.engines.local import LocalExecutor
from mmtools.engines.ray import executor as ray_engine
from mmtools.engines.ray import global_ops
from mmtools.engines.ray.cluster import ENV_CONCURRENCY, ENV_GPUS
from mmtools.errors import PartialError, UsageError
from mmtools.io.dataset import DatasetSink
from mmtools.io.layout import DROPPED_DIR, REJECTS_DIR
from mmtools.io.source import Source
from mmtools.step import GlobalStep, Result, Step

BATCH, SHARD = 8, 12
SUMMARY_KEYS = (
    "rows_in rows_out rejected reasons dropped generated upstream_rejected resumed_from notes"
)
MANIFEST_KEYS = "fingerprint schema columns rows rejects dropped ledger generated position"
# Model outputs may differ in the last bits: the workers run torch with other thread counts.
MODEL_COLUMNS = (C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING, C.CLIP_SCORE)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs, joined by this process; its address."""
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    # Workers cannot import this test module: the test steps below travel by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # An in-process `--engine ray` run of another test module may have left its own
    # cluster joined in this worker: leave it for this module's.
    ray.shutdown()
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(autouse=True)
def workers_for_small_inputs(monkeypatch):
    """Light steps compute on the workers, and global steps use Ray Data's sort and groupby,
    even on these small inputs."""
    monkeypatch.setattr(ray_engine, "SHUFFLE_MIN_ROWS", 0)
    monkeypatch.setattr(ray_engine, "DRIVER_ROWS", 0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """30 captioned JPEGs, two exact duplicates, a blank caption and a corrupt file."""
    root = make_image_folder(tmp_path_factory.mktemp("ray") / "imgs", 30)
    for name, seed in (("dup_a", 1), ("dup_b", 2)):
        (root / f"{name}.jpg").write_bytes(image_bytes(seed))
        (root / f"{name}.txt").write_text(f"a copy of photo {seed}")
    (root / "blank.jpg").write_bytes(image_bytes(99))
    (root / "blank.txt").write_text("   ")
    (root / "bad.jpg").write_bytes(b"not a jpeg at all")
    (root / "bad.txt").write_text("a broken file")
    return root


@pytest.fixture(scope="module")
def ingested(folder) -> Path:
    """The folder ingested by the local engine, in shards of about SHARD rows."""
    out = folder.parent / "ingested"
    mmtools("ingest", folder, "-o", out, "--shard-rows", SHARD, "-q")
    return out


@pytest.fixture(scope="module")
def clip_json(folder) -> Path:
    """A tiny random open_clip model config."""
    return tiny_clip(folder.parent)


def run_both(tmp: Path, command: str, make_steps, make_source) -> dict:
    """Run the same steps with each engine into tmp/local and tmp/ray; their manifests."""
    manifests = {}
    for name, executor in (("local", LocalExecutor), ("ray", ray_engine.RayExecutor)):
        source = make_source()
        sink = DatasetSink(str(tmp / name), shard_rows=SHARD)
        _, manifests[name] = engines.run(
            command,
            source,
            make_steps(source),
            sink,
            executor=executor(),
            batch_size=BATCH,
            quiet=True,
        )
    return manifests


def read(path: Path, sub: str = "") -> pa.Table | None:
    """All shards (or reject shards) of a dataset, in shard order."""
    files = sorted((path / sub).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def assert_same(tmp: Path, manifests: dict) -> pa.Table:
    """The local and Ray outputs hold the same rows, rejects, shards and counts."""
    ma, mb = manifests["local"], manifests["ray"]
    rows = assert_same_output(tmp / "local", tmp / "ray", ma, mb)
    summaries = [{k: m["summary"][k] for k in SUMMARY_KEYS.split()} for m in (ma, mb)]
    assert summaries[0] == summaries[1]
    assert ma["summary"]["dropped"] == ma["dropped"]
    return rows


def assert_same_output(one: Path, other: Path, ma: dict, mb: dict) -> pa.Table:
    """Two datasets (manifests `ma`, `mb`) hold the same rows, rejects, ledger, shards and
    manifest counts; the rows."""
    a, b = read(one), read(other)
    assert a.schema.equals(b.schema, check_metadata=True)
    for name in a.schema.names:
        if name in MODEL_COLUMNS:
            np.testing.assert_allclose(floats(a[name]), floats(b[name]), atol=2e-3)
        elif pa.types.is_floating(a.schema.field(name).type):  # NaN equals NaN here
            np.testing.assert_array_equal(a[name].to_numpy(), b[name].to_numpy())
        else:
            assert a[name].equals(b[name]), name
    ra, rb = read(one, REJECTS_DIR), read(other, REJECTS_DIR)
    assert (ra is None and rb is None) or ra.equals(rb)
    # The drop ledger: the same rows (ids, rules, values, kept rows), one per dropped row.
    da, db = read(one, DROPPED_DIR), read(other, DROPPED_DIR)
    assert (da is None and db is None) or da.equals(db)
    for m, ledger in ((ma, da), (mb, db)):
        rows = 0 if ledger is None else ledger.num_rows
        assert rows == m["ledger"]["rows"] == sum(m["dropped"].values())
    for key in MANIFEST_KEYS.split():
        assert ma[key] == mb[key], key
    shards = [[(s["name"], s["rows"], s["inputs"]) for s in m["shards"]] for m in (ma, mb)]
    assert shards[0] == shards[1]
    return a


def floats(column: pa.ChunkedArray) -> np.ndarray:
    """A float or embedding column as a float32 array."""
    array = column.combine_chunks()
    if pa.types.is_fixed_size_list(array.type):
        return np.asarray(array.flatten(), np.float32).reshape(len(array), -1)
    return np.asarray(array, np.float32)


def dataset_source(path: Path):
    """A factory of sources reading the dataset at `path`."""
    return lambda: Source([str(path)])


# -- each step kind under both engines -----------------------------------------------------


def ingest_both(tmp: Path, inputs: list) -> tuple[pa.Table, dict]:
    """`inputs` ingested by each engine; the (same) rows and the manifests."""
    from mmtools.steps.ingest.listing import ListingOptions
    from mmtools.steps.ingest.step import Ingest, IngestConfig, ListingSource

    manifests = run_both(
        tmp,
        "ingest",
        lambda src: [Ingest(IngestConfig(), src.kinds, workers=2)],
        lambda: ListingSource([str(p) for p in inputs], ListingOptions()),
    )
    return assert_same(tmp, manifests), manifests


@pytest.mark.ray
def test_ingest_on_ray_equals_local_with_the_same_rejects(cluster, folder, tmp_path):
    rows, manifests = ingest_both(tmp_path, [folder])
    assert rows.num_rows == 33
    assert manifests["ray"]["rejects"]["by_reason"] == {"not_image": 1}


@pytest.mark.ray
def test_listing_columns_on_ray_equal_local(cluster, folder, tmp_path):
    paths = sorted(str(p) for p in folder.glob("*.jpg"))
    listing = tmp_path / "laion.parquet"
    n = len(paths)
    extras = {"similarity": pa.array([i / n for i in range(n)], pa.float32()), "width": range(n)}
    pq.write_table(pa.table({"URL": paths, "TEXT": ["t"] * n, **extras}), listing)
    rows, _ = ingest_both(tmp_path, [listing])
    assert rows.schema.names[-2:] == ["similarity", "listing_width"]
    assert rows.schema.field("similarity").type == pa.float32()
    assert read(tmp_path / "ray", REJECTS_DIR)["source"].to_pylist() == [str(folder / "bad.jpg")]


@pytest.fixture(scope="module")
def scored(cluster, ingested, clip_json) -> tuple[Path, dict]:
    """embed (an actor pool, tiny model) then score (tasks), by both engines."""
    from mmtools.steps.embed import EmbedConfig
    from mmtools.steps.score.step import score_steps

    opts = EmbedConfig(
        model=str(clip_json), pretrained="none", device="cpu", batch_size=BATCH, workers=1
    )
    tmp = ingested.parent / "scored"
    manifests = run_both(
        tmp, "score", lambda src: score_steps(src.schema, None, opts), dataset_source(ingested)
    )
    return tmp, manifests


@pytest.mark.ray
def test_embed_and_score_on_ray_equal_local(scored):
    tmp, manifests = scored
    rows = assert_same(tmp, manifests)
    assert {C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING, C.CLIP_SCORE} <= set(rows.schema.names)
    assert manifests["ray"]["rejects"]["by_reason"] == {"no_text": 1}


@pytest.mark.ray
def test_embed_decoding_in_processes_on_ray_equals_local_threads(cluster, ingested, clip_json):
    """A Ray actor decodes its batches in worker processes (forked by a fork server of its
    own): the same rows, rejects and embeddings as the local engine's threads."""
    from mmtools.steps.embed import ClipEmbed, EmbedConfig

    tmp = ingested.parent / "decode-in"
    manifests = {}

    def embed(name: str, executor, where: str) -> None:
        config = EmbedConfig(
            model=str(clip_json),
            pretrained="none",
            device="cpu",
            batch_size=BATCH,
            workers=2,
            decode_in=where,
            modalities=("image",),
        )
        sink = DatasetSink(str(tmp / name), shard_rows=SHARD)
        source = Source([str(ingested)])
        _, manifests[name] = engines.run(
            "embed",
            source,
            [ClipEmbed(config)],
            sink,
            executor=executor(),
            batch_size=BATCH,
            quiet=True,
        )

    embed("local", LocalExecutor, "threads")
    above: set[str] = set()  # the names of the processes above the fork servers
    stop = threading.Event()
    watch = threading.Thread(target=_watch_fork_servers, args=(stop, above))
    watch.start()
    try:
        embed("ray", ray_engine.RayExecutor, "processes")
    finally:
        stop.set()
        watch.join()
    assert any(name.startswith("ray::") for name in above), above
    rows = assert_same(tmp, manifests)
    assert rows.num_rows == 33 and rows[C.IMAGE_EMBEDDING].null_count == 0
    assert len(np.unique(floats(rows[C.IMAGE_EMBEDDING]), axis=0)) == 31  # two are copies


def _watch_fork_servers(stop: threading.Event, found: set) -> None:
    """Until `stop`: the names of the processes above each fork server or decoding process."""
    while not stop.wait(0.05):
        for pid in naming("multiprocessing.forkserver"):
            for _ in range(4):
                if (stat := proc_stat(pid)) is None or (above := proc_stat(stat[0])) is None:
                    break
                pid = stat[0]
                found.add(above[2])


@pytest.mark.ray
@pytest.mark.parametrize(
    "config",
    [{"where": "clip_score > 0 AND width >= 32"}, {"top_fraction": 0.3, "by": C.CLIP_SCORE}],
    ids=["where", "top-fraction"],
)
def test_filter_on_ray_equals_local(scored, tmp_path, config):
    from mmtools.steps.filter.step import FilterConfig, make_filter

    manifests = run_both(
        tmp_path,
        "filter",
        lambda src: [make_filter(FilterConfig(**config))],
        dataset_source(scored[0] / "local"),
    )
    assert_same(tmp_path, manifests)
    assert sum(manifests["ray"]["dropped"].values()) > 0


@pytest.mark.ray
@pytest.mark.parametrize("fraction", [0.3, 0.55, 0.9])
def test_top_fraction_cut_by_rays_sort_equals_local_with_ties_and_bad_keys(
    cluster, tmp_path, fraction
):
    """Ties across shards, NaN, null and infinite keys; at 0.9 the cut falls among the bad."""
    from mmtools.steps.filter.step import FilterConfig, make_filter

    rng = np.random.default_rng(3)
    for k in range(4):
        n = 10
        keys = rng.choice([0.1, 0.2, 0.2, 0.3, np.nan, np.inf, -np.inf], size=n).tolist()
        keys[0] = None
        ids = [f"r{i:03d}" for i in rng.permutation(100)[:n] + 100 * k]
        table = pa.table({C.ID: ids, "key": pa.array(keys, pa.float64())})
        pq.write_table(table, tmp_path / f"in-{k}.parquet")
    config = FilterConfig(top_fraction=fraction, by="key")
    manifests = run_both(
        tmp_path,
        "filter",
        lambda src: [make_filter(config)],
        lambda: Source([str(tmp_path / "in-*.parquet")]),
    )
    assert_same(tmp_path, manifests)
    assert manifests["ray"]["rows"] == int(40 * fraction)


@pytest.mark.ray
@pytest.mark.parametrize(("n", "fraction", "k"), [(10, 0.25, 2), (7, 0.35, 2), (100, 0.29, 29)])
def test_top_fraction_by_rays_sort_keeps_floor_of_a_non_integer_share(
    cluster, tmp_path, n, fraction, k
):
    """F·N not a whole number: Ray's sort cuts at the same floor(F·N)-th row as the local
    engine (0.29 × 100 is 29, though 0.29 * 100 is 28.999... in floating point)."""
    from mmtools.steps.filter.step import FilterConfig, make_filter

    rng = np.random.default_rng(n)
    table = pa.table({C.ID: [f"r{i:03d}" for i in range(n)], "key": rng.permutation(n) / n})
    for part, rows in enumerate(table.to_batches(max_chunksize=n // 2 + 1)):
        pq.write_table(pa.Table.from_batches([rows]), tmp_path / f"in-{part}.parquet")
    manifests = run_both(
        tmp_path,
        "filter",
        lambda src: [make_filter(FilterConfig(top_fraction=fraction, by="key"))],
        lambda: Source([str(tmp_path / "in-*.parquet")]),
    )
    out = assert_same(tmp_path, manifests)
    best = np.argsort(-table["key"].to_numpy())[:k]
    assert sorted(out[C.ID].to_pylist()) == sorted(table[C.ID].take(best).to_pylist())
    assert manifests["ray"]["rows"] == k and manifests["ray"]["dropped"] == {"top_fraction": n - k}


@pytest.mark.ray
@pytest.mark.parametrize(
    ("methods", "keep", "mark", "dropped"),
    [
        (("exact",), f"highest:{C.CLIP_SCORE}", False, {"exact": 2}),  # Ray's groupby
        (("exact", "phash"), "first", True, {}),  # then pHashes made on the workers
        (("phash", "minhash"), "first", False, {"phash": 2, "minhash": 28}),
        (("minhash", "semantic"), "first", False, None),  # minhash by Ray's groupby too
    ],
    ids=["exact", "exact-phash-mark", "phash-minhash", "minhash-semantic"],
)
def test_dedup_on_ray_equals_local(scored, tmp_path, methods, keep, mark, dropped):
    from mmtools.steps.dedup.step import Dedup, DedupConfig

    config = DedupConfig(methods=methods, keep=keep, mark=mark, threshold=0.5)  # "a photo number N"
    manifests = run_both(
        tmp_path, "dedup", lambda src: [Dedup(config)], dataset_source(scored[0] / "local")
    )
    out = assert_same(tmp_path, manifests)
    assert dropped is None or manifests["ray"]["dropped"] == dropped
    if mark:
        assert out[C.IS_DUPLICATE].to_pylist().count(True) == 2


@pytest.mark.ray
@pytest.mark.parametrize("clusters", [6, 70], ids=["flat", "tree"])
def test_semantic_dedup_by_rays_groupby_equals_local(cluster, tmp_path, clusters):
    """k-means fitted on the same sample, rows assigned on the workers, close pairs found
    per cluster by Ray's groupby: the same duplicates and rejects as the local engine."""
    from test_dedup_semantic import embedding_table, planted

    from mmtools.steps.dedup.step import Dedup, DedupConfig

    x, groups = planted(150, 32, seed=clusters)
    x[3], x[7] = np.nan, 0.0
    table = embedding_table(x)
    for k, part in enumerate(table.to_batches(max_chunksize=len(x) // 3 + 1)):
        pq.write_table(pa.Table.from_batches([part]), tmp_path / f"in-{k}.parquet")
    config = DedupConfig(methods=("semantic",), mark=True, clusters=clusters)
    manifests = run_both(
        tmp_path,
        "dedup",
        lambda src: [Dedup(config)],
        lambda: Source([str(tmp_path / "in-*.parquet")]),
    )
    out = assert_same(tmp_path, manifests)
    assert manifests["ray"]["rejects"]["by_reason"] == {"invalid_embedding": 2}
    assert out[C.IS_DUPLICATE].to_pylist().count(True) >= len(groups) // 2


@pytest.mark.ray
def test_small_input_is_grouped_on_the_driver_with_the_same_result(scored, tmp_path, monkeypatch):
    """Below SHUFFLE_MIN_ROWS rows no Ray groupby runs (seconds of fixed cost)."""
    from mmtools.steps.dedup.step import Dedup, DedupConfig

    monkeypatch.setattr(ray_engine, "SHUFFLE_MIN_ROWS", 1000)
    monkeypatch.setattr(
        global_ops, "decide", lambda *a: pytest.fail("a shuffle ran on a small input")
    )
    config = DedupConfig(methods=("exact", "phash"), mark=True)
    manifests = run_both(
        tmp_path, "dedup", lambda src: [Dedup(config)], dataset_source(scored[0] / "local")
    )
    out = assert_same(tmp_path, manifests)
    assert out[C.IS_DUPLICATE].to_pylist().count(True) == 2


@pytest.mark.ray
def test_mixup_on_ray_equals_local(cluster, ingested, tmp_path):
    from mmtools.steps.mixup import Mixup, MixupConfig

    manifests = run_both(
        tmp_path,
        "mixup",
        lambda src: [Mixup(MixupConfig(fraction=0.5, keep_originals=True, seed=3))],
        dataset_source(ingested),
    )
    rows = assert_same(tmp_path, manifests)
    assert manifests["ray"]["generated"] > 0
    mixed = rows.num_rows - rows.column(C.MIXUP_PARENTS).null_count
    assert mixed == manifests["ray"]["generated"]


# -- where the steps compute ---------------------------------------------------------------


class Pid(Step):
    """Adds the id of the process that computed each row; `light` as given."""

    name = "pid"

    def __init__(self, light: bool):
        super().__init__()
        self.light = light

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        return schema.append(pa.field("pid", pa.int64()))

    def process(self, batch: pa.RecordBatch) -> Result:
        pids = pa.array([os.getpid()] * batch.num_rows, pa.int64())
        return Result(batch.append_column("pid", pids))


def pids(tmp: Path, source, steps: list, caplog) -> set[int]:
    """The processes that computed the rows of one Ray run of `steps` over `source`."""
    caplog.clear()
    with caplog.at_level("INFO", logger="mmtools"):
        run_ray("pid", source, steps, DatasetSink(str(tmp), shard_rows=SHARD), quiet=True)
    return set(read(tmp)["pid"].to_pylist())


@pytest.mark.ray
def test_light_steps_over_a_small_input_compute_in_the_driver(
    cluster, ingested, tmp_path, monkeypatch, caplog
):
    """Below DRIVER_ROWS input rows; heavy steps, larger inputs and streams go to the workers."""
    from mmtools.steps.filter.step import FilterConfig, make_filter

    monkeypatch.setattr(ray_engine, "DRIVER_ROWS", 34)  # the input has 33 rows
    source = dataset_source(ingested)
    me = os.getpid()
    light = [make_filter(FilterConfig(where="true")), Pid(light=True)]
    assert pids(tmp_path / "light", source(), light, caplog) == {me}
    assert "pid: 33 input rows, no model and no media to decode" in caplog.text
    assert read(tmp_path / "light").drop_columns("pid").equals(read(ingested))
    heavy = [make_filter(FilterConfig(where="true")), Pid(light=False)]
    assert me not in pids(tmp_path / "heavy", source(), heavy, caplog)
    assert "computed in this process" not in caplog.text
    monkeypatch.setattr(ray_engine, "DRIVER_ROWS", 33)
    assert me not in pids(tmp_path / "large", source(), [Pid(light=True)], caplog)
    monkeypatch.setattr(ray_engine, "DRIVER_ROWS", 34)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, read(ingested).schema) as writer:
        writer.write_table(read(ingested))
    stream = Source(["-"], stdin=pa.BufferReader(sink.getvalue()))
    assert me not in pids(tmp_path / "stream", stream, [Pid(light=True)], caplog)


class PidKeys(GlobalStep, Pid):
    """A global step whose pass 1 notes the processes that computed its keys; a heavy pass 2
    (its rows computed on the workers), keys `light_keys` as given."""

    name = "pid_keys"
    scan_columns = (C.ID,)
    light, light_keys = False, False

    def __init__(self, light_keys: bool):
        Step.__init__(self)
        self.light_keys, self.key_pids = light_keys, set()

    def keys(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return pa.record_batch({"pid": [os.getpid()] * batch.num_rows})

    def scan(self, batch: pa.RecordBatch) -> None:
        self.key_pids |= set(batch.column(0).to_pylist())


@pytest.mark.ray
def test_light_keys_over_a_small_input_compute_in_the_driver(
    cluster, ingested, tmp_path, monkeypatch, caplog
):
    """A global step's pass 1 (mixup's: ids) below DRIVER_ROWS rows; its pass 2 on the
    workers."""
    from mmtools.steps.mixup import Mixup, MixupConfig

    assert Mixup(MixupConfig(fraction=0.3)).light_keys and not Mixup(MixupConfig()).light
    monkeypatch.setattr(ray_engine, "DRIVER_ROWS", 34)  # the input has 33 rows
    source, me = dataset_source(ingested), os.getpid()
    step = PidKeys(light_keys=True)
    assert me not in pids(tmp_path / "light", source(), [step], caplog)
    assert step.key_pids == {me}
    assert "pid_keys keys: 33 input rows" in caplog.text
    heavy = PidKeys(light_keys=False)
    assert me not in pids(tmp_path / "heavy", source(), [heavy], caplog)
    assert heavy.key_pids and me not in heavy.key_pids
    monkeypatch.setattr(ray_engine, "DRIVER_ROWS", 33)
    large = PidKeys(light_keys=True)
    assert me not in pids(tmp_path / "large", source(), [large], caplog)
    assert large.key_pids and me not in large.key_pids


@pytest.mark.ray
@pytest.mark.parametrize(
    ("methods", "light"), [(("exact", "minhash"), True), (("exact", "phash"), False)]
)
def test_dedup_is_light_unless_a_method_decodes_images(methods, light):
    from mmtools.steps.dedup.step import Dedup, DedupConfig
    from mmtools.steps.filter.step import FilterConfig, make_filter

    assert Dedup(DedupConfig(methods=methods)).light is light
    assert make_filter(FilterConfig(where="true", presets=("laion", "datacomp-basic"))).light
    assert not make_filter(FilterConfig(presets=("audio-basic",))).light
    assert not make_filter(FilterConfig(max_silence=0.5)).light


@pytest.mark.ray
def test_light_dedup_on_the_driver_equals_local(scored, tmp_path, monkeypatch):
    """The same rows, ledger and manifest as the local engine, computed in the driver."""
    from mmtools.steps.dedup.step import Dedup, DedupConfig

    monkeypatch.setattr(ray_engine, "DRIVER_ROWS", 100_000)
    config = DedupConfig(methods=("exact", "minhash"), threshold=0.5)
    manifests = run_both(
        tmp_path, "dedup", lambda src: [Dedup(config)], dataset_source(scored[0] / "local")
    )
    rows = assert_same(tmp_path, manifests)
    assert rows.num_rows < 33 and sum(manifests["ray"]["dropped"].values()) > 0


class CallSize(Step):
    """Adds to each row how many input batches the call that computed it was given."""

    name = "call_size"

    def __init__(self, loads_model: bool):
        super().__init__()
        self.loads_model = loads_model

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        return schema.append(pa.field("call_batches", pa.int64()))

    def run(self, batches):
        batches = list(batches)
        for batch in batches:
            given = pa.array([len(batches)] * batch.num_rows, pa.int64())
            yield Result(batch.append_column("call_batches", given))


@pytest.mark.ray
@pytest.mark.parametrize("actor", [False, True], ids=["tasks", "actors"])
def test_each_ray_call_gets_several_batches_but_every_cpu_gets_calls(
    cluster, ingested, tmp_path, monkeypatch, actor
):
    """33 rows in batches of 2: 17 batches, and at least 4 calls for each of the 2 CPUs, so
    2 batches a call; with CALL_ROWS at 2 rows, one. The rows are the input's either way."""

    def call_sizes(out: Path, **kw) -> list[int]:
        sink = DatasetSink(str(out), shard_rows=SHARD)
        steps = [CallSize(actor)]
        ex = ray_engine.RayExecutor()
        engines.run("calls", Source([str(ingested)]), steps, sink, executor=ex, batch_size=2)
        rows = read(out)
        assert rows.drop_columns("call_batches").equals(read(ingested))
        return rows["call_batches"].to_pylist()

    assert ray_engine.CALL_ROWS == 2048 and ray_engine.CALLS_PER_CPU == 4
    sizes = call_sizes(tmp_path / "default")
    assert max(sizes) == 2 and sizes.count(2) >= 28
    monkeypatch.setattr(ray_engine, "CALL_ROWS", 2)
    assert set(call_sizes(tmp_path / "one")) == {1}


# -- failures: retried, reported, resumed ---------------------------------------------------


class Flaky(Step):
    """Passes rows through; at the batch holding `target` it fails while `marker` says so.

    Every attempt at that batch appends a byte to `marker`. `how`: "raise" fails on the first
    attempt, "kill" SIGKILLs its own worker process on the first attempt, "kill-always" on
    every attempt, "usage" raises a usage error while the file `marker + '.fail'` exists.
    """

    name = "flaky"

    def __init__(self, marker: str, target: str, how: str, loads_model: bool = False):
        super().__init__()
        self.marker, self.target, self.how = marker, target, how
        self.loads_model = loads_model

    def process(self, batch: pa.RecordBatch) -> Result:
        """The batch, unchanged, unless this is the attempt that fails."""
        if self.target in batch.column(C.ID).to_pylist():
            with open(self.marker, "ab") as f:
                f.write(b".")
            first = os.path.getsize(self.marker) == 1
            if (self.how == "kill" and first) or self.how == "kill-always":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "raise" and first:
                raise RuntimeError("injected failure")
            if self.how == "usage" and os.path.exists(self.marker + ".fail"):
                raise UsageError("injected usage error")
        return Result(batch)


def run_ray(command: str, source, steps: list, sink, **kw):
    """One run on the Ray engine, in batches of BATCH rows."""
    executor = ray_engine.RayExecutor()
    return engines.run(command, source, steps, sink, executor=executor, batch_size=BATCH, **kw)


def attempts(marker: Path) -> int:
    """How many times the target batch was attempted."""
    return marker.stat().st_size


@pytest.mark.ray
@pytest.mark.parametrize(
    ("how", "actor"), [("raise", False), ("kill", True)], ids=["task-raises", "actor-killed"]
)
def test_failed_or_killed_worker_is_retried_and_no_row_is_lost(
    cluster, ingested, tmp_path, how, actor
):
    marker = tmp_path / "attempts"
    target = read(ingested).column(C.ID)[17].as_py()
    sink = DatasetSink(str(tmp_path / "out"), shard_rows=SHARD)
    steps = [Flaky(str(marker), target, how, actor)]
    summary, manifest = run_ray("flaky", Source([str(ingested)]), steps, sink, quiet=True)
    assert attempts(marker) == 2
    assert read(tmp_path / "out").equals(read(ingested))
    assert summary.rows_out == manifest["rows"] == 33


@pytest.mark.ray
def test_worker_that_always_dies_stops_the_run_after_bounded_retries(cluster, ingested, tmp_path):
    marker = tmp_path / "attempts"
    target = read(ingested).column(C.ID)[17].as_py()
    sink = DatasetSink(str(tmp_path / "out"), shard_rows=SHARD)
    steps = [Flaky(str(marker), target, "kill-always")]
    with pytest.raises(PartialError, match="one batch kept failing on the Ray workers"):
        run_ray("flaky", Source([str(ingested)]), steps, sink)
    assert attempts(marker) == ray_engine.RETRIES + 1
    assert not (tmp_path / "out" / "_manifest.json").exists()


@pytest.mark.ray
def test_step_error_is_not_retried_and_a_rerun_resumes(cluster, ingested, tmp_path):
    marker = tmp_path / "attempts"
    Path(str(marker) + ".fail").touch()
    ids = read(ingested).column(C.ID)
    target = ids[len(ids) - 1].as_py()  # in the last batch: earlier shards get committed
    out = tmp_path / "out"

    def run():
        sink = DatasetSink(str(out), shard_rows=SHARD)
        steps = [Flaky(str(marker), target, "usage")]
        return run_ray("flaky", Source([str(ingested)]), steps, sink, quiet=True)

    with pytest.raises(UsageError, match="injected usage error"):
        run()
    assert attempts(marker) == 1  # a data or usage error is reported, not retried
    assert not (out / "_manifest.json").exists()
    committed = read(out).num_rows
    assert committed >= 2 * SHARD
    os.unlink(str(marker) + ".fail")
    summary, manifest = run()
    assert summary.resumed_from == committed
    assert read(out).equals(read(ingested))
    assert manifest["summary"]["rows_in"] == 33 - summary.resumed_from


# -- a run resumed on the other engine ------------------------------------------------------


ENGINES = {"local": LocalExecutor, "ray": ray_engine.RayExecutor}


class StoppedAfterOneShard(DatasetSink):
    """A dataset sink whose run is stopped (Ctrl-C) once it has committed its first shard."""

    def write(self, *args, **kwargs) -> None:
        """Write as usual; then stop the run if a shard is committed."""
        super().write(*args, **kwargs)
        if self.records:
            raise KeyboardInterrupt


def switch_steps(kind: str) -> list[Step]:
    """A streaming step, a global step that drops rows, a global step that makes rows."""
    from mmtools.steps.dedup.step import Dedup, DedupConfig
    from mmtools.steps.filter.step import FilterConfig, make_filter
    from mmtools.steps.mixup import Mixup, MixupConfig

    if kind == "filter":
        return [make_filter(FilterConfig(where="text NOT LIKE '%2%'"))]
    if kind == "dedup":
        return [Dedup(DedupConfig(methods=("exact",), keep="first"))]
    return [Mixup(MixupConfig(fraction=0.5, keep_originals=True, seed=3))]


@pytest.mark.ray
@pytest.mark.parametrize(
    ("kind", "first", "then"),
    # each kind of step once, and each direction for a global step
    [("filter", "local", "ray"), ("dedup", "ray", "local"), ("mixup", "local", "ray")],
)
def test_run_stopped_on_one_engine_is_resumed_on_the_other(
    cluster, ingested, tmp_path, kind, first, then
):
    """Stopped after its first shard (two batches, 16 input rows), the run goes on from there
    on the other engine, and the output is the one an uninterrupted local run makes."""

    def run(engine: str, sink: DatasetSink):
        source, steps = Source([str(ingested)]), switch_steps(kind)
        executor = ENGINES[engine]()
        return engines.run(
            kind, source, steps, sink, executor=executor, batch_size=BATCH, quiet=True
        )

    out, whole = tmp_path / "out", tmp_path / "whole"
    with pytest.raises(KeyboardInterrupt):
        run(first, StoppedAfterOneShard(str(out), shard_rows=SHARD))
    assert not (out / "_manifest.json").exists()
    summary, manifest = run(then, DatasetSink(str(out), shard_rows=SHARD))
    assert summary.resumed_from == 16
    assert summary.rows_in == 33 - 16
    _, expected = run("local", DatasetSink(str(whole), shard_rows=SHARD))
    assert_same_output(out, whole, manifest, expected)


# -- the command line -------------------------------------------------------------------------


def _stream(data: bytes) -> tuple[pa.Table, list]:
    """Rows and reject side-records of an mmtools Arrow stream."""
    reader = pa.ipc.open_stream(data)
    batches, rejects = [], []
    while True:
        try:
            batch, meta = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            break
        if meta is not None and b"mmtools.rejects" in meta:
            rejects += json.loads(meta[b"mmtools.rejects"])
        batches.append(batch)
    return pa.Table.from_batches(batches, reader.schema).combine_chunks(), rejects


@pytest.mark.ray
def test_pipe_through_ray_gives_the_local_stream_and_nothing_else_on_stdout(cluster, folder):
    ingest = subprocess.run([*MMTOOLS, "ingest", str(folder)], capture_output=True, check=True)
    where = ["filter", "--where", "width >= 32 AND text LIKE '%photo%'", "-q"]
    local = mmtools(*where, input=ingest.stdout)
    ray = mmtools(*where, "--engine", "ray", "--ray-address", cluster, input=ingest.stdout)
    assert ray.stderr == b""
    rows, rejects = _stream(ray.stdout)
    assert rows.num_rows == 32  # not the blank caption
    assert _stream(ray.stdout) == _stream(local.stdout)
    assert [r[2] for r in rejects] == ["not_image"]  # upstream rejects travel on


def stream_head(data: bytes, batches: int) -> bytes:
    """The bytes of an Arrow stream up to the end of its first `batches` batches with rows."""
    at = pa.BufferReader(data)
    reader = pa.ipc.open_stream(at)
    while batches:
        batches -= reader.read_next_batch().num_rows > 0
    return data[: at.tell()]


@pytest.mark.ray
def test_local_run_killed_is_finished_by_the_same_command_with_engine_ray(
    cluster, folder, tmp_path
):
    """`kill -9` on a local run fed by a pipe, once it has committed its first shard (the
    pipe's first two batches: 15 rows, the corrupt file being a reject); the same command with
    `--engine ray` resumes after it; the output, the upstream reject included, is the one an
    unbroken run makes."""
    stream = mmtools("ingest", folder, "--batch-size", BATCH).stdout
    where = "text LIKE '%photo%'"
    command = ["filter", "--where", where, "--shard-rows", SHARD, "--batch-size", BATCH, "-q"]
    out, whole = tmp_path / "out", tmp_path / "whole"
    argv = [*MMTOOLS, *map(str, command), "-o", str(out)]
    killed = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        killed.stdin.write(stream_head(stream, 2))
        killed.stdin.flush()
        wait_for(out / "_progress" / "00000.json", killed)
    finally:
        killed.kill()
        killed.stdin.close()
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "_manifest.json").exists()
    ray = ["--engine", "ray", "--ray-address", cluster, "--json"]
    resumed = mmtools(*command, "-o", out, *ray, input=stream)
    summary = json.loads(resumed.stderr)
    assert (summary["resumed_from"], summary["rows_in"], summary["rows_out"]) == (15, 18, 18)
    mmtools(*command, "-o", whole, input=stream)
    manifests = [json.loads((d / "_manifest.json").read_text()) for d in (out, whole)]
    assert_same_output(out, whole, *manifests)
    assert read(out, REJECTS_DIR)["reason"].to_pylist() == ["not_image"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    """40 rows of random 8-dimensional image embeddings in 4 Parquet files."""
    from test_dedup_semantic import embedding_table

    root = tmp_path_factory.mktemp("embedded")
    table = embedding_table(np.random.default_rng(0).normal(size=(40, 8)))
    for k, part in enumerate(table.to_batches(max_chunksize=10)):
        pq.write_table(pa.Table.from_batches([part]), root / f"part-{k:05d}.parquet")
    return root


def map_actors() -> set[str]:
    """The ids of every Ray Data map actor the cluster has started (alive or dead).

    Ray's public listing (`ray.util.state`) needs the dashboard, which this cluster runs without.
    """
    from ray._private import state

    return {k for k, v in state.actors().items() if v["ActorClassName"].startswith("MapWorker")}


@pytest.mark.ray
@pytest.mark.parametrize(
    ("command", "args", "env", "actors"),
    [
        ("rewrite", ["--concurrency", "1"], {}, 1),
        ("rewrite", ["--ray-concurrency", "1"], {}, 1),
        ("rewrite", [], {ENV_CONCURRENCY: "1"}, 1),
        ("filter", ["--concurrency", "1"], {}, 1),
    ],
    ids=["rewrite-requests-in-flight", "ray-concurrency", "env", "concurrency"],
)
def test_concurrency_option_or_variable_sets_the_actors_of_a_model_step(
    cluster, ingested, embedded, tmp_path, command, args, env, actors
):
    """`rewrite` and `filter --near` run in an actor pool. Without a Ray concurrency the pool
    grows to one actor per CPU but one, left to read the input (1 here): rewrite's own
    --concurrency is requests in flight."""
    inputs = {
        "rewrite": [ingested, "--backend", "template"],
        "filter": [embedded, "--near", embedded, "--min-sim", 0.5],
    }
    before = map_actors()
    ray = ["--engine", "ray", "--ray-address", cluster, "-q"]
    out = tmp_path / "out"
    mmtools(command, *inputs[command], *args, "--batch-size", 2, "-o", out, *ray, env=env)
    assert len(map_actors() - before) == actors


def gpu_requests(address: str) -> list[tuple[dict, int]]:
    """The requests for a GPU waiting on the cluster, as (resources, count)."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    demands = get_cluster_status(address).resource_demands.ray_task_actor_demand
    found = [(b.bundle, b.count) for d in demands for b in d.bundles_by_count]
    return [f for f in found if "GPU" in f[0]]


def gpu_demand(address: str, run: subprocess.Popen) -> list[tuple[dict, int]]:
    """The requests for a GPU waiting on the cluster once there are (`run`'s own: the test
    waits for an earlier run's to clear before starting it)."""
    deadline = time.monotonic() + 60
    while not (found := gpu_requests(address)):
        assert run.poll() is None, f"it ended with no GPU asked for: {run.stderr.read()}"
        assert time.monotonic() < deadline, "no GPU was asked for"
        time.sleep(0.1)
    return found


def no_gpu_demand(address: str) -> None:
    """Wait for the requests of an earlier, stopped run to leave the cluster's status: seen
    by the next run's test, they would have it signal a process still starting up."""
    deadline = time.monotonic() + 60
    while gpu_requests(address):
        assert time.monotonic() < deadline, "an earlier run's GPU request never cleared"
        time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.parametrize(
    ("args", "env"),
    [(["--num-gpus-per-worker", "0.5"], {}), ([], {ENV_GPUS: "0.5"})],
    ids=["option", "env"],
)
def test_gpu_request_on_a_cluster_without_gpus_waits_for_a_gpu_until_stopped(
    cluster, ingested, tmp_path, args, env
):
    """Not in the README: each actor asks Ray for its share of a GPU and the run waits for
    one, with no timeout; SIGTERM stops it as any run (exit 143, nothing committed)."""
    out = tmp_path / "out"
    argv = [*MMTOOLS, "rewrite", str(ingested), "--backend", "template", "-o", str(out)]
    argv += ["--engine", "ray", "--ray-address", cluster, "-q", *args]
    no_gpu_demand(cluster)
    run = subprocess.Popen(argv, env={**os.environ, **env}, stderr=subprocess.PIPE)
    try:
        demand = gpu_demand(cluster, run)
    finally:
        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=60)
    stderr = run.stderr.read().decode()
    assert demand == [({"CPU": 1.0, "GPU": 0.5}, 1)]
    assert code == 143, stderr
    assert stderr.splitlines()[-1] == (
        "mmtools rewrite: error: stopped by SIGTERM; rerun the command to resume"
    )
    assert not (out / "_manifest.json").exists()


@pytest.mark.ray
def test_unreachable_cluster_is_one_clear_line(cluster, ingested, tmp_path):
    proc = mmtools(
        "filter",
        ingested,
        "--where",
        "width > 0",
        "-o",
        tmp_path / "out",
        "--engine",
        "ray",
        check=False,
        env={ray_engine.ENV_ADDRESS: "127.0.0.1:1"},
    )
    assert proc.returncode == 75
    err = proc.stderr.decode()
    assert err.startswith("mmtools filter: error: cannot reach the Ray cluster at 127.0.0.1:1")
    assert err.count("\n") == 1


def test_local_engine_never_imports_ray(ingested, tmp_path):
    code = (
        "import sys; from mmtools.cli import main; sys.argv = ['mmtools', 'filter', "
        f"{str(ingested)!r}, '--where', 'width > 0', '-o', {str(tmp_path / 'out')!r}, '-q']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (tmp_path / "out" / "_manifest.json").exists()


def test_missing_ray_says_how_to_install_it(ingested, tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None\nfrom mmtools.cli import main\n"
        f"sys.argv = ['mmtools', 'filter', {str(ingested)!r}, '--where', 'width > 0', "
        f"'--engine', 'ray', '-o', {str(tmp_path / 'out')!r}]\nmain()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == (
        "mmtools filter: error: this needs the optional package 'ray'; install it with "
        "pip install 'mmtools[ray]'"
    )
    assert not (tmp_path / "out").exists()  # refused before the output is touched


def test_model_actors_that_would_take_every_cpu_are_refused_on_a_cluster_of_the_runs_own(
    caplog,
):
    """Ray Data starts a model step's actors first: holding every CPU, they leave none for
    the tasks that read their input, and the run would wait for ever. A cluster joined may
    add nodes: a warning."""
    from mmtools.engines.ray.cluster import RayOptions

    own = RayOptions()
    with pytest.raises(UsageError) as e:
        ray_engine.check_cpus(2, 2, own)
    assert str(e.value) == (
        "2 model actors of 1 CPU each would leave no CPU of the 2-CPU Ray cluster to read "
        "their input: ask for at most 1 (--concurrency; rewrite: --ray-concurrency)"
    )
    with pytest.raises(UsageError, match="run with --engine local, or join a larger cluster"):
        ray_engine.check_cpus(1, 1, own)
    for fits in ((1, 2), (7, 8)):
        ray_engine.check_cpus(*fits, own)
    with caplog.at_level("WARNING", logger="mmtools"):
        ray_engine.check_cpus(4, 4, RayOptions(address="auto"))
    assert caplog.messages == [
        "4 model actors of 1 CPU each would leave no CPU of the 4-CPU Ray cluster to read "
        "their input; waiting until the cluster adds CPUs (stop the run to give up)"
    ]


@pytest.mark.ray
def test_a_gpu_request_no_gpu_can_meet_is_refused_on_a_cluster_of_the_runs_own(caplog):
    """A cluster the run starts itself gets no GPU later: refused at once, in one line. A
    cluster joined may add GPU nodes on demand: a warning, and the run waits."""
    from mmtools.errors import UsageError

    with pytest.raises(UsageError) as e:
        ray_engine.check_gpus(0.5, 0, None)
    assert str(e.value) == (
        "each worker asks for 0.5 GPU and the Ray cluster has 0: run where there are GPUs, "
        "join a cluster with them (--ray-address), or leave --num-gpus-per-worker out"
    )
    for fits in ((0.0, 0, None), (1.0, 1, None), (0.5, 2, None)):
        ray_engine.check_gpus(*fits)
    with caplog.at_level("WARNING", logger="mmtools"):
        ray_engine.check_gpus(1.0, 0, "auto")
    assert caplog.messages == [
        "each worker asks for 1 GPU and the Ray cluster has 0; waiting until the cluster adds "
        "GPUs (stop the run to give up)"
    ]
