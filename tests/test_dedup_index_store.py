"""The dedup index on disk, in-process: `_pending.json` and `_index.json` as a run stages and
promotes a generation (fsync on), the model file's pending and final names, what `load`
skips, and which files a reopening removes as strays of a killed run."""

from __future__ import annotations

import calendar
import json
import os
import re
import time

import numpy as np
import pyarrow as pa
import pytest

from mmtools.errors import UsageError
from mmtools.steps.dedup.index import GEN, SeenIndex

PARAMS = {"methods": ["exact"], "key": "text"}
CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@pytest.fixture(autouse=True)
def durable(monkeypatch):
    """Every commit of this module syncs its files and directory, as by default."""
    monkeypatch.setenv("MMTOOLS_FSYNC", "1")


@pytest.fixture
def new_york():
    """Local time 4 or 5 hours behind UTC: the times an index records are UTC all the same."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TZ", "America/New_York")
        time.tzset()
        yield
    time.tzset()


def keys(*ids: str) -> pa.Table:
    return pa.table({"id": list(ids), "digest": pa.array(range(len(ids)), pa.uint64())})


def files(path) -> set[str]:
    return set(os.listdir(path)) - {".lock"}


def read(path) -> dict:
    return json.loads(path.read_text())


def test_a_staged_generation_is_pending_until_promoted_then_listed_with_its_record(
    tmp_path, new_york
):
    idx = SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    before = time.time()
    idx.stage(keys("a", "b", "c"), "/data/out", "fp-1")
    pending = read(tmp_path / "idx" / "_pending.json")
    assert files(tmp_path / "idx") == {"pending-000001.arrow", "_pending.json"}
    created = pending.pop("created")
    assert pending == {"gen": 1, "rows": 3, "output": "/data/out", "fingerprint": "fp-1"}
    assert CREATED.fullmatch(created)
    stamp = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
    assert before - 2 <= stamp <= time.time() + 1

    idx.promote()
    assert files(tmp_path / "idx") == {"gen-000001.arrow", "_index.json"}
    size = os.path.getsize(tmp_path / "idx" / "gen-000001.arrow")
    entry = {"gen": 1, "rows": 3, "output": "/data/out", "fingerprint": "fp-1"}
    assert read(tmp_path / "idx" / "_index.json") == {
        "params": PARAMS,
        "format": "mmtools-dedup-index",
        "version": 1,
        "generations": [{**entry, "created": created, "bytes": size}],
        "rows": 3,
    }
    idx.promote()  # nothing staged any more: nothing changes
    idx.close()
    assert SeenIndex(str(tmp_path / "idx")).open(PARAMS).manifest["rows"] == 3


def test_a_fitted_model_is_staged_under_a_pending_name_and_kept_with_its_size(tmp_path):
    idx = SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    idx.stage(keys("a"), "/o1", "fp-1", model={"centroids": np.arange(6.0).reshape(2, 3)})
    assert files(tmp_path / "idx") == {
        "pending-000001.arrow",
        "pending-model-000001.npz",
        "_pending.json",
    }
    assert read(tmp_path / "idx" / "_pending.json")["model"] == 1
    idx.promote()
    assert files(tmp_path / "idx") == {"gen-000001.arrow", "model-000001.npz", "_index.json"}
    manifest = read(tmp_path / "idx" / "_index.json")
    size = os.path.getsize(tmp_path / "idx" / "model-000001.npz")
    assert manifest["model"] == {"gen": 1, "bytes": size}
    assert manifest["generations"][0]["model"] == 1
    model = idx.model()
    assert (model.gen, model.own) == (1, frozenset({1}))
    np.testing.assert_array_equal(model.arrays["centroids"], np.arange(6.0).reshape(2, 3))

    idx.stage(keys("b"), "/o2", "fp-2", modelled=True)  # keys made with the index's model
    assert read(tmp_path / "idx" / "_pending.json")["model"] == 1
    idx.promote()
    idx.stage(keys("c"), "/o3", "fp-3")  # keys made without it
    assert "model" not in read(tmp_path / "idx" / "_pending.json")
    idx.promote()
    assert idx.model().own == frozenset({1, 2})


def test_modelled_keys_on_an_index_without_a_model_record_none(tmp_path):
    idx = SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    idx.promote()  # nothing staged yet: nothing to do
    idx.stage(keys("a"), "/o1", "fp-1", modelled=True)
    assert "model" not in read(tmp_path / "idx" / "_pending.json")
    idx.promote()
    assert idx.model() is None


def test_load_skips_the_generations_of_the_output_being_rewritten(tmp_path):
    idx = SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    for gen, output in ((1, "/a"), (2, "/b")):
        idx.stage(keys(f"{output[1]}1", f"{output[1]}2"), output, f"fp-{gen}")
        idx.promote()
    everything = idx.load()
    assert everything["id"].to_pylist() == ["a1", "a2", "b1", "b2"]
    assert everything[GEN].to_pylist() == [1, 1, 2, 2]
    but_a = idx.load("/a")
    assert but_a["id"].to_pylist() == ["b1", "b2"] and but_a[GEN].to_pylist() == [2, 2]


def test_reopening_removes_what_a_killed_run_left_and_keeps_what_is_listed(tmp_path):
    idx = SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    idx.stage(keys("a"), "/o1", "fp-1", model={"centroids": np.zeros((1, 2))})
    idx.promote()
    idx.close()
    strays = [
        "pending-000002.arrow",
        "pending-model-000002.npz",
        ".tmp-pending-000003.arrow",
        "gen-000009.arrow",
        "model-000007.npz",
    ]
    for name in strays:
        (tmp_path / "idx" / name).write_bytes(b"left by a killed run")
    SeenIndex(str(tmp_path / "idx")).open(PARAMS).close()
    assert files(tmp_path / "idx") == {"gen-000001.arrow", "model-000001.npz", "_index.json"}


def test_a_directory_of_only_index_files_is_an_index_and_one_file_more_is_refused(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / ".tmp-gen-000001.arrow").write_bytes(b"")
    (tmp_path / "idx" / "pending-000001.arrow").write_bytes(b"")
    SeenIndex(str(tmp_path / "idx")).open(PARAMS).close()
    assert files(tmp_path / "idx") == set()
    (tmp_path / "idx" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"holds other files and no _index\.json"):
        SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    assert files(tmp_path / "idx") == {"notes.txt"}


@pytest.mark.parametrize("with_model", [False, True], ids=["keys", "model"])
def test_a_stage_killed_while_writing_leaves_a_tmp_file_that_reopening_removes(
    tmp_path, monkeypatch, with_model
):
    """The power goes while a generation's first file is written (its sync is where it stops):
    that file is named as a temporary, so the directory is still an index, and reopening it
    removes the file and keeps the generation before."""
    import mmtools.steps.dedup.index as index_module

    idx = SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    idx.stage(keys("a"), "/o1", "fp-1")
    idx.promote()

    def power_cut(path):
        raise OSError(f"power cut syncing {os.path.basename(path)}")

    monkeypatch.setattr(index_module, "fsync_path", power_cut)
    model = {"centroids": np.zeros((1, 2))} if with_model else None
    with pytest.raises(OSError, match="power cut"):
        idx.stage(keys("b"), "/o2", "fp-2", model=model)
    idx.close()
    monkeypatch.undo()
    left = ".tmp-model-000002.npz" if with_model else ".tmp-pending-000002.arrow"
    assert files(tmp_path / "idx") == {"gen-000001.arrow", "_index.json", left}
    again = SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    assert files(tmp_path / "idx") == {"gen-000001.arrow", "_index.json"}
    assert again.load()["id"].to_pylist() == ["a"]


def test_keys_staged_by_a_run_whose_output_never_committed_are_dropped_on_reopening(tmp_path):
    """A run killed between staging its keys and committing its output: the next opener finds
    the pending record, sees no committed output with that fingerprint, and drops the keys."""
    out = tmp_path / "out"
    idx = SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    idx.stage(keys("a", "b"), str(out), "fp-1")
    idx.close()
    assert files(tmp_path / "idx") == {"pending-000001.arrow", "_pending.json"}
    again = SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    assert files(tmp_path / "idx") == set() and again.generations == []
    assert again.load() is None and again.next_gen == 1


@pytest.mark.parametrize("case", ["committed", "other run", "stream"])
def test_keys_staged_by_a_run_stopped_after_its_output_committed_are_kept_on_reopening(
    case, tmp_path
):
    """A run killed after committing its output but before promoting its keys: the next
    opener finds that output's manifest made by the same run and lists the keys. The same
    output made by another run, or a run that wrote to a pipe, leaves nothing to check: the
    keys are dropped."""
    from conftest import write_shards

    from mmtools import engines
    from mmtools.io.dataset import DatasetSink
    from mmtools.io.manifest import fingerprint_digest
    from mmtools.io.source import Source

    write_shards(tmp_path / "in", pa.table({"id": ["a", "b"], "text": ["x", "y"]}), 2)
    out = tmp_path / "out"
    _, manifest = engines.run("copy", Source([str(tmp_path / "in")]), [], DatasetSink(str(out)))
    made_by = fingerprint_digest(manifest["fingerprint"])
    output, fp = {
        "committed": (str(out), made_by),
        "other run": (str(out), "0" * len(made_by)),
        "stream": ("-", made_by),
    }[case]
    idx = SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    idx.stage(keys("a", "b"), output, fp)
    idx.close()
    again = SeenIndex(str(tmp_path / "idx")).open(PARAMS)
    if case == "committed":
        assert files(tmp_path / "idx") == {"gen-000001.arrow", "_index.json"}
        assert [g["gen"] for g in again.generations] == [1]
        assert again.load()["id"].to_pylist() == ["a", "b"]
    else:
        assert files(tmp_path / "idx") == set() and again.generations == []
