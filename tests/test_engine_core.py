"""The run lifecycle in this process: engines.run over real Parquet input into a DatasetSink."""

from __future__ import annotations

import errno
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import read_dataset, write_shards

from mmtools import columns as C
from mmtools import engines as engine
from mmtools.errors import DriftError, Interrupted, PartialError, UsageError
from mmtools.io import layout as L
from mmtools.io.dataset import (
    DatasetSink,
    Position,
    dictionary_columns,
    read_dropped,
    read_rejects,
    write_batch_rows,
)
from mmtools.io.source import Source
from mmtools.io.stream import StreamWriter
from mmtools.step import Result, Step, ledger_rows, reject_batch


def table(n: int, start: int = 0) -> pa.Table:
    ids = [f"r{i:03d}" for i in range(start, start + n)]
    return pa.table(
        {
            C.ID: ids,
            "x": pa.array(range(start, start + n), pa.int64()),
            C.SOURCE: [f"file{i}" for i in range(start, start + n)],
        }
    )


class Sorter(Step):
    """Rejects x % 5 == 0 as "five", drops x % 3 == 0 by rule "three", adds a copy of x % 7
    == 1 (generated), counts the even rows in a note; adds a column y = 2x."""

    name = "sorter"
    requires = (C.ID, "x")

    def output_schema(self, schema):
        super().output_schema(schema)
        return schema.append(pa.field("y", pa.int64()))

    def column_info(self):
        return {"y": {"step": "sorter"}}

    def process(self, batch):
        x = batch.column("x").to_pylist()
        bad = [i for i, v in enumerate(x) if v % 5 == 0]
        rej = reject_batch(
            self.name,
            [batch.column(C.ID)[i].as_py() for i in bad],
            ["five"] * len(bad),
            [f"x={x[i]}" for i in bad],
        )
        drop = [v % 5 != 0 and v % 3 == 0 for v in x]
        keep = [v % 5 != 0 and v % 3 != 0 for v in x]
        out = batch.filter(pa.array(keep))
        copies = out.filter(pa.array([v % 7 == 1 for v in out.column("x").to_pylist()]))
        out = pa.concat_batches([out, copies]) if copies.num_rows else out
        out = out.append_column("y", pc.multiply(out.column("x"), 2))
        return Result(
            out,
            rej if bad else None,
            {"three": drop.count(True)},
            copies.num_rows,
            {"even_rows": sum(1 for v in x if v % 2 == 0)},
            self.drop_rows(batch, drop, "three", [float(v) for v in x]),
        )


def expected(n: int):
    x = range(n)
    kept = [v for v in x if v % 5 and v % 3]
    return {
        "out": kept + [v for v in kept if v % 7 == 1],
        "rejected": [v for v in x if v % 5 == 0],
        "dropped": [v for v in x if v % 5 and v % 3 == 0],
    }


@pytest.fixture
def src(tmp_path):
    return write_shards(tmp_path / "in", table(40), shards=2, row_group=6)


def test_run_writes_every_row_where_it_belongs_and_counts_it(src, tmp_path):
    out = tmp_path / "out"
    sink = DatasetSink(str(out), shard_rows=8, command=["mmtools", "t"])
    summary, manifest = engine.run(
        "t", Source([str(src)]), [Sorter()], sink, batch_size=7, quiet=True, argv=["t", "x"]
    )
    want = expected(40)
    rows = read_dataset(out)
    assert sorted(rows.column("x").to_pylist()) == sorted(want["out"])
    assert rows.column("y").to_pylist() == [2 * v for v in rows.column("x").to_pylist()]
    rejects = read_rejects(str(out))
    assert rejects.column(C.ID).to_pylist() == [f"r{v:03d}" for v in want["rejected"]]
    assert set(rejects.column(C.REJECT_REASON).to_pylist()) == {"five"}
    assert rejects.column(C.REJECT_DETAIL).to_pylist() == [f"x={v}" for v in want["rejected"]]
    ledger = read_dropped(str(out))
    assert ledger.column(C.ID).to_pylist() == [f"r{v:03d}" for v in want["dropped"]]
    assert ledger.column(C.DROP_VALUE).to_pylist() == [float(v) for v in want["dropped"]]
    assert ledger.column(C.REJECT_SOURCE).to_pylist() == [f"file{v}" for v in want["dropped"]]
    assert (summary.rows_in, summary.rows_out) == (40, len(want["out"]))
    assert summary.rejected == 8 and summary.reasons == {"five": 8}
    assert summary.dropped == {"three": 11}
    assert summary.generated == 4  # kept rows 1, 8, 22 and 29 (x % 7 == 1)
    assert summary.notes == {"even_rows": 20}
    assert summary.resumed_from == 0 and summary.success_rate is None
    assert not summary.already_complete and summary.upstream_rejected == 0
    assert manifest["rows"] == len(want["out"])
    assert manifest["rejects"]["rows"] == 8 and manifest["rejects"]["by_reason"] == {"five": 8}
    assert manifest["dropped"] == {"three": 11} and manifest["ledger"]["rows"] == 11
    assert manifest["generated"] == 4
    assert manifest["position"] == {"rows": 40, "upstream_rejects": 0, "upstream_drops": 0}
    assert manifest["columns"]["y"] == {"step": "sorter"}
    assert manifest["command"] == ["mmtools", "t"]
    last = manifest["lineage"][-1]
    assert last["argv"] == ["t", "x"] and last["steps"] == ["sorter"] and last["added"] == ["y"]
    assert last["inputs"] == [os.path.abspath(src)]
    assert last["rows_in"] == 40 and last["command"] == "t"
    # each shard closes at the first batch boundary at or after 8 rows
    assert all(s["rows"] >= 8 for s in manifest["shards"][:-1])
    assert sum(s["rows"] for s in manifest["shards"]) == len(want["out"])
    assert sorted(os.listdir(out)) == sorted(
        [s["name"] for s in manifest["shards"]]
        + [L.MANIFEST, L.REJECTS_DIR, L.DROPPED_DIR]
        + [L.LOCK_FILE] * (L.LOCK_FILE in os.listdir(out))
    )
    line = summary.line()
    assert line.startswith(
        "mmtools t: 40 in, 25 out, 4 generated, 8 rejected (five 8), 11 dropped (three 11), "
        "even rows 20, "
    )
    assert line.endswith(f" -> {out}")

    again = DatasetSink(str(out))
    summary2, manifest2 = engine.run("t", Source([str(src)]), [Sorter()], again, quiet=True)
    assert summary2.already_complete
    assert summary2.line() == f"mmtools t: {out} is already complete; nothing to do"
    assert manifest2["rows"] == manifest["rows"]


class Stop(Step):
    """Passes rows through and stops the run at batch `after`, like a kill."""

    name = "stop"

    def __init__(self, after):
        super().__init__(None)
        self.after = after

    def params(self):
        return {}

    def run(self, batches):
        for k, batch in enumerate(batches):
            if k == self.after:
                raise Interrupted(15)
            yield Result(batch)


def test_a_stopped_run_resumes_after_its_committed_rows(src, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        engine.run(
            "t",
            Source([str(src)]),
            [Stop(3)],
            DatasetSink(str(out), shard_rows=10),
            batch_size=5,
            quiet=True,
        )
    assert not (out / L.MANIFEST).exists()
    records = sorted(os.listdir(out / L.PROGRESS_DIR))
    assert records == ["00000.json"]  # 15 rows read, one unit of 10 committed
    assert not [n for n in os.listdir(out) if n.startswith(L.TMP_PREFIX)]
    summary, manifest = engine.run(
        "t",
        Source([str(src)]),
        [Stop(99)],
        DatasetSink(str(out), shard_rows=10),
        batch_size=5,
        quiet=True,
    )
    assert summary.resumed_from == 10
    assert summary.rows_in == 30 and summary.rows_out == 30
    assert "resumed after 10 rows" in summary.line()
    assert read_dataset(out).column(C.ID).to_pylist() == table(40).column(C.ID).to_pylist()
    assert manifest["rows"] == 40
    assert not (out / L.PROGRESS_DIR).exists() and not (out / L.RUN_FILE).exists()


class Ingestish(Step):
    """Every row succeeds or is rejected."""

    name = "ing"
    counts_successes = True

    def process(self, batch):
        x = batch.column("x").to_pylist()
        bad = [i for i, v in enumerate(x) if v % 4 == 0]
        n = len(bad)
        rej = reject_batch(self.name, [f"r{x[i]:03d}" for i in bad], ["e"] * n, [""] * n)
        return Result(batch.filter(pa.array([v % 4 != 0 for v in x])), rej)


def test_success_rate_is_rows_out_over_rows_in_for_steps_that_count_successes(src, tmp_path):
    summary, _ = engine.run(
        "t", Source([str(src)]), [Ingestish()], DatasetSink(str(tmp_path / "o")), quiet=True
    )
    assert summary.success_rate == 0.75
    assert "75.0% succeeded" in summary.line()
    summary, _ = engine.run(
        "t",
        Source([str(src)]),
        [Ingestish(), Stop(99)],
        DatasetSink(str(tmp_path / "o2")),
        quiet=True,
    )
    assert summary.success_rate is None  # not every step counts successes


def test_a_copy_with_no_steps_writes_the_input(src, tmp_path):
    summary, manifest = engine.run(
        "copy", Source([str(src)]), [], DatasetSink(str(tmp_path / "o")), batch_size=9, quiet=True
    )
    assert summary.rows_in == 40 and summary.rows_out == 40 and summary.success_rate is None
    assert manifest["lineage"][-1]["steps"] == []


def stream(t: pa.Table, rejects=None, drops=None, lineage=None) -> io.BytesIO:
    buf = io.BytesIO()
    w = StreamWriter(buf, t.schema, "upstream-fp")
    for b in t.to_batches(max_chunksize=10):
        w.write(b)
        if rejects is not None:
            w.write_rejects(rejects)
            rejects = None
        if drops is not None:
            w.write_drops(drops)
            drops = None
    w.close(lineage or [{"command": "up"}])
    buf.seek(0)
    return buf


def test_rejects_and_ledger_rows_from_upstream_are_forwarded_and_counted(tmp_path):
    from mmtools.step import ledger_rows

    up_rej = reject_batch("ingest", ["u1", "u2"], ["http", "decode"], ["404", "bad"])
    up_drops = ledger_rows("filter", table(3, 100).to_batches()[0], [True, False, True], "min")
    out = tmp_path / "o"
    summary, manifest = engine.run(
        "t",
        Source(["-"], stdin=stream(table(30), up_rej, up_drops)),
        [Sorter()],
        DatasetSink(str(out)),
        quiet=True,
    )
    assert summary.upstream_rejected == 2 and summary.upstream_dropped == 2
    assert summary.rejected == 6 and summary.reasons == {"five": 6}
    rejects = read_rejects(str(out))
    assert sorted(rejects.column(C.ID).to_pylist()) == sorted(
        ["u1", "u2", *(f"r{v:03d}" for v in range(0, 30, 5))]
    )
    ledger = read_dropped(str(out))
    assert sorted(ledger.column(C.ID).to_pylist()) == sorted(
        ["r100", "r102", *(f"r{v:03d}" for v in range(30) if v % 5 and v % 3 == 0)]
    )
    assert manifest["position"] == {"rows": 30, "upstream_rejects": 2, "upstream_drops": 2}
    assert manifest["lineage"][0] == {"command": "up"}
    assert manifest["lineage"][-1]["inputs"] == ["-"]

    # without the ledger, upstream ledger rows are not kept, nor the steps' own
    out2 = tmp_path / "o2"
    summary, manifest = engine.run(
        "t",
        Source(["-"], stdin=stream(table(30), up_rej, up_drops)),
        [Sorter()],
        DatasetSink(str(out2)),
        quiet=True,
        ledger=False,
    )
    assert read_dropped(str(out2)) is None and summary.upstream_dropped == 0
    assert summary.dropped == {"three": 8} and manifest["ledger"]["rows"] == 0


def test_upstream_rows_already_committed_are_not_written_twice():
    summary = engine.Summary("t", "o")
    batches = [pa.record_batch({"a": list(range(n))}) for n in (3, 4, 2)]
    up = engine._Upstream(list(batches), 5, summary, "upstream_rejected")
    assert up.position == 5
    got = up.take()
    assert [b.column("a").to_pylist() for b in got] == [[2, 3], [0, 1]]
    assert summary.upstream_rejected == 4 and up.position == 9 and up.received == 9
    assert up.take() == []


def test_summary_line_in_words():
    s = engine.Summary("filter", "out", rows_in=10, rows_out=4, seconds=2.0)
    assert s.line() == (
        "mmtools filter: 10 in, 4 out, 0 rejected, 0 dropped, 2.0 s (5 rows/s) -> out"
    )
    s = engine.Summary(
        "x",
        "o",
        rows_in=100,
        rows_out=90,
        generated=3,
        rejected=5,
        reasons={"http": 2, "decode": 3},
        dropped={"b": 1, "a": 4},
        success_rate=0.9,
        resumed_from=20,
        notes={"pairs_skipped": 2, "a_b": 1},
        skipped={"txt": 2, "pdf": 1},
        seconds=0.5,
    )
    assert s.line() == (
        "mmtools x: 100 in, 90 out, 3 generated, 5 rejected (decode 3, http 2), "
        "5 dropped (a 4, b 1), 90.0% succeeded, resumed after 20 rows, a b 1, pairs skipped 2, "
        "skipped 3 unsupported: txt 2, pdf 1, 0.5 s (200 rows/s) -> o"
    )
    assert s.as_dict()["reasons"] == {"http": 2, "decode": 3}
    assert s.as_dict() is not s.__dict__


@pytest.mark.parametrize(
    "rows, seconds, rate",
    [
        (0, 1.0, "0"),
        (10, 1.0, "10"),
        (5, 1.0, "5"),
        (1, 3.0, "0.33"),
        (12345, 1.0, "12345"),
        (9, 1.0, "9"),
        (3, 0.0, "3000"),
        (99, 10.0, "9.9"),
    ],
)
def test_per_second(rows, seconds, rate):
    assert engine.per_second(rows, seconds) == rate


class _Sink:
    def __init__(self, remote):
        self.path, self.remote = "/data/out", remote


def test_storage_errors_become_partial_runs():
    with pytest.raises(PartialError) as e:
        engine.raise_for_storage(OSError(errno.ENOSPC, "No space left on device"), _Sink(False))
    assert str(e.value) == (
        "out of space writing /data/out (No space left on device); the committed shards are "
        "kept: free space and rerun the same command to resume"
    )
    for n in (errno.EFBIG, errno.EDQUOT):
        with pytest.raises(PartialError, match=r"^out of space writing /data/out"):
            engine.raise_for_storage(OSError(n, os.strerror(n)), _Sink(False))
    with pytest.raises(PartialError, match=r"\(IOError: No space left on device\.\)"):
        engine.raise_for_storage(OSError("IOError:  No space left on device."), _Sink(False))
    with pytest.raises(PartialError) as e:
        engine.raise_for_storage(OSError("connection\n reset"), _Sink(True))
    assert str(e.value) == (
        "writing /data/out failed (connection reset); the committed shards are kept: rerun the "
        "same command to resume"
    )
    engine.raise_for_storage(OSError("connection reset"), _Sink(False))  # not ours to map
    engine.raise_for_storage(ValueError("No space left on device"), _Sink(True))


def test_fingerprint_names_command_params_input_and_schema(src):
    source = Source([str(src)])

    class P(Step):
        def params(self):
            return {"a": 1, "p": os}

    fp = engine.fingerprint("t", [P(), Sorter()], source)
    assert fp["command"] == "t"
    assert fp["params"] == {"a": 1, "p": str(os)}
    assert fp["input_schema"] == [["id", "string"], ["x", "int64"], ["source", "string"]]
    assert [i[0] for i in fp["inputs"]] == [
        os.path.abspath(src / "part-00000.parquet"),
        os.path.abspath(src / "part-00001.parquet"),
    ]
    assert json.loads(json.dumps(fp)) == fp


def test_output_schema_chains_the_steps_and_keeps_their_provenance():
    schema = pa.schema([(C.ID, pa.string()), ("x", pa.int64())])
    out, info = engine.output_schema(schema, [Sorter(), Sorter()])
    assert out.names == ["id", "x", "y", "y"] and info == {"y": {"step": "sorter"}}
    assert json.loads(out.metadata[C.MMTOOLS_META])["y"] == {"step": "sorter"}


def test_conform_casts_a_batch_to_the_output_schema():
    schema = pa.schema([("a", pa.int64()), ("b", pa.string())])
    same = pa.record_batch({"a": [1], "b": ["x"]}, schema=schema)
    assert engine._conform(same, schema) is same
    other = pa.record_batch({"b": ["y"], "a": pa.array([2], pa.int32())})
    got = engine._conform(other, schema)
    assert got.schema.equals(schema) and got.to_pylist() == [{"a": 2, "b": "y"}]


# -- DatasetSink ---------------------------------------------------------------------------


def test_sink_commits_units_at_shard_rows_and_bytes_and_records_them(tmp_path):
    out = str(tmp_path / "o")
    sink = DatasetSink(out, shard_rows=5)
    schema = table(1).schema
    assert sink.open(schema, {"command": "t"}) == Position()
    assert not sink.remote and not sink.complete
    rej = reject_batch("s", ["q"], ["why"], ["d"])
    sink.write(table(3).to_batches()[0], [rej, None], {"a": 1}, Position(4, 0, 0), 1)
    assert not (tmp_path / "o" / L.PROGRESS_DIR).exists()  # 3 < 5 rows: nothing committed
    sink.write(table(2, 3).to_batches()[0], [], {"a": 2, "b": 1}, Position(7, 1, 0))
    record = json.loads((tmp_path / "o" / L.PROGRESS_DIR / "00000.json").read_text())
    assert record["shard"] == "part-00000.parquet" and record["rows"] == 5
    assert record["rejects"] == "_rejects/part-00000.parquet" and record["rejected"] == 1
    assert record["reject_reasons"] == {"why": 1}
    assert record["dropped"] == {"a": 3, "b": 1} and record["generated"] == 1
    assert record["drops"] is None and record["drop_rows"] == 0
    assert record["position"] == {"rows": 7, "upstream_rejects": 1, "upstream_drops": 0}
    assert record["bytes"] == os.path.getsize(tmp_path / "o" / "part-00000.parquet")
    # a batch with no data rows still moves the position; close commits it without a shard
    sink.write(None, [reject_batch("s", ["z"], ["w2"], [""])], {}, Position(9, 1, 0))
    manifest = sink.close({"k": 1}, [{"c": 1}], {})
    assert manifest["rows"] == 5
    assert [s["name"] for s in manifest["shards"]] == ["part-00000.parquet"]
    assert manifest["rejects"] == {
        "rows": 2,
        "by_reason": {"why": 1, "w2": 1},
        "shards": ["_rejects/part-00000.parquet", "_rejects/part-00001.parquet"],
    }
    assert manifest["position"]["rows"] == 9 and manifest["summary"] == {"k": 1}
    assert sink.complete


def test_sink_rolls_shards_by_bytes(tmp_path):
    sink = DatasetSink(str(tmp_path / "o"), shard_rows=1000, shard_bytes=1)
    sink.open(table(1).schema, {})
    for k in range(3):
        sink.write(table(2, 2 * k).to_batches()[0], [], {}, Position(2 * k + 2))
    manifest = sink.close({}, [], {})
    assert [s["rows"] for s in manifest["shards"]] == [2, 2, 2]
    assert read_dataset(tmp_path / "o").column("x").to_pylist() == list(range(6))


def test_an_empty_run_still_writes_one_shard_with_the_schema(tmp_path):
    out = tmp_path / "o"
    sink = DatasetSink(str(out))
    schema = table(1).schema
    sink.open(schema, {})
    manifest = sink.close({}, [], {})
    assert [s["name"] for s in manifest["shards"]] == ["part-00000.parquet"]
    assert manifest["rows"] == 0 and manifest["position"]["rows"] == 0
    got = read_dataset(out)
    assert got.num_rows == 0 and got.schema.names == schema.names


def test_sink_refuses_another_command_and_foreign_directories(tmp_path):
    out = tmp_path / "o"
    sink = DatasetSink(str(out))
    sink.open(table(1).schema, {"command": "a", "params": {"x": 1, "y": 2}})
    sink.write(table(2).to_batches()[0], [], {}, Position(2))
    sink.abort()
    other = DatasetSink(str(out))
    with pytest.raises(DriftError) as e:
        other.open(table(1).schema, {"command": "a", "params": {"x": 1, "y": 3}})
    other.abort()
    assert str(e.value) == (
        f"{out} was made by a different command, input or model (options differ: y); use "
        "--overwrite to start over or choose another output"
    )
    for fp, why in [
        ({"command": "b"}, "command differs"),
        ({"command": "a", "params": {"x": 1, "y": 2}, "inputs": [1]}, "inputs differs"),
        ({"command": "a", "params": {"x": 1, "y": 2}, "input_schema": 1}, "input_schema differs"),
        ({"command": "a", "params": {"x": 1, "y": 2}, "z": 1}, "fingerprint differs"),
        ({"command": "a", "params": None}, "options differ: x, y"),
        ("x", "unknown format"),
    ]:
        other = DatasetSink(str(out))
        with pytest.raises(DriftError, match=f"model \\({why}\\);"):
            other.open(table(1).schema, fp)
        other.abort()
    # --overwrite starts over
    sink = DatasetSink(str(out), overwrite=True)
    assert sink.open(table(1).schema, {"command": "b"}) == Position()
    assert sorted(os.listdir(out)) in (sorted([L.RUN_FILE, L.LOCK_FILE]), [L.RUN_FILE])
    sink.close({}, [], {})
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    other = DatasetSink(str(foreign))
    with pytest.raises(UsageError) as e:
        other.open(table(1).schema, {})
    other.abort()
    assert str(e.value) == (
        f"output {foreign} is not empty and holds no mmtools run (found notes.txt); choose an "
        "empty or new directory, or pass --overwrite"
    )


def test_overwrite_removes_every_file_of_the_run_before(tmp_path):
    """Shards, rejects, the ledger, progress records, the manifest and temporaries of a
    finished run all go; the new run's files alone remain."""
    out = tmp_path / "o"
    sink = DatasetSink(str(out), shard_rows=2)
    sink.open(table(1).schema, {"command": "a"})
    rejects = reject_batch("s", ["r9"], ["not_image"], ["x"])
    drops = ledger_rows("s", table(1, 8).to_batches()[0], np.array([True]), "where")
    sink.write(table(2).to_batches()[0], [], {}, Position(2))
    sink.write(table(2, 2).to_batches()[0], [rejects], {"where": 1}, Position(6), drops=[drops])
    sink.close({}, [], {})
    (out / f"{L.TMP_PREFIX}part-00009.parquet").write_bytes(b"left by a kill")
    before = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert {"part-00000.parquet", "part-00001.parquet", L.MANIFEST} <= before
    assert {f"{L.REJECTS_DIR}/part-00001.parquet", f"{L.DROPPED_DIR}/part-00001.parquet"} <= before
    sink = DatasetSink(str(out), overwrite=True)
    sink.open(table(1).schema, {"command": "b"})
    sink.write(table(1).to_batches()[0], [], {}, Position(1))
    sink.close({}, [], {})
    after = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert after - {L.LOCK_FILE} == {"part-00000.parquet", L.MANIFEST}
    assert read_dataset(out)[C.ID].to_pylist() == ["r000"]


def test_sink_resume_removes_what_came_after_the_last_commit(tmp_path):
    out = tmp_path / "o"
    sink = DatasetSink(str(out), shard_rows=2)
    schema = table(1).schema
    sink.open(schema, {"c": 1})
    drops = [
        pa.RecordBatch.from_pylist(
            [{"id": "d", "step": "s", "rule": "r", "value": 1.0, "kept_id": None, "source": None}],
            schema=C.LEDGER_SCHEMA,
        )
    ]
    sink.write(
        table(2).to_batches()[0],
        [reject_batch("s", ["j"], ["r"], [""])],
        {"r": 1},
        Position(3, 0, 1),
        drops=drops,
    )
    sink.write(table(1, 2).to_batches()[0], [], {}, Position(4, 0, 1))
    sink.abort()  # the second unit was not committed
    (out / "part-00007.parquet").write_bytes(b"orphan")
    (out / L.REJECTS_DIR / "part-00009.parquet").write_bytes(b"orphan")
    (out / L.DROPPED_DIR / "part-00009.parquet").write_bytes(b"orphan")
    (out / L.PROGRESS_DIR / "00003.json").write_text("{}")  # after a gap: not this run's
    (out / (L.TMP_PREFIX + "x")).write_bytes(b"t")
    (out / L.REJECTS_DIR / (L.TMP_PREFIX + "x")).write_bytes(b"t")
    again = DatasetSink(str(out), shard_rows=2)
    assert again.open(schema, {"c": 1}) == Position(3, 0, 1)
    assert sorted(os.listdir(out / L.REJECTS_DIR)) == ["part-00000.parquet"]
    assert sorted(os.listdir(out / L.DROPPED_DIR)) == ["part-00000.parquet"]
    assert sorted(os.listdir(out / L.PROGRESS_DIR)) == ["00000.json"]
    assert not [n for n in os.listdir(out) if n.startswith(L.TMP_PREFIX)]
    assert "part-00007.parquet" not in os.listdir(out)
    again.write(table(1, 2).to_batches()[0], [], {}, Position(4, 0, 1))
    manifest = again.close({}, [], {})
    assert manifest["ledger"] == {"rows": 1, "shards": ["_dropped/part-00000.parquet"]}
    assert read_dataset(out).column("x").to_pylist() == [0, 1, 2]
    assert read_dropped(str(out)).column(C.ID).to_pylist() == ["d"]
    assert sorted(os.listdir(out)) in (
        sorted(
            [
                "part-00000.parquet",
                "part-00001.parquet",
                L.MANIFEST,
                L.REJECTS_DIR,
                L.DROPPED_DIR,
                L.LOCK_FILE,
            ]
        ),
        sorted(
            ["part-00000.parquet", "part-00001.parquet", L.MANIFEST, L.REJECTS_DIR, L.DROPPED_DIR]
        ),
    )


def test_parquet_writer_settings():
    assert write_batch_rows(0) == 1024
    assert write_batch_rows(100) == 1024
    assert write_batch_rows(1 << 20) == 1
    assert write_batch_rows(4 << 20) == 1
    assert write_batch_rows(4096) == 256
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("emb", pa.list_(pa.float16(), 4)),
            ("img", pa.binary()),
            ("lb", pa.large_binary()),
            ("ll", pa.large_list(pa.float32())),
            ("tags", pa.list_(pa.string())),
            ("v", pa.list_(pa.float64())),
        ]
    )
    assert dictionary_columns(schema) == ["id", "tags"]
    assert dictionary_columns(pa.schema([("id", pa.string())])) is True
    assert read_rejects("/nonexistent-dir-xyz") is None
    assert Position.of({"rows": 3, "upstream_rejects": 1}) == Position(3, 1, 0)


def test_progress_shows_the_further_of_rows_written_and_rows_reported():
    from tqdm import tqdm

    bar = tqdm(total=100, file=io.StringIO(), mininterval=0)
    progress = engine._Progress(bar)
    progress(3)
    progress(4)
    assert bar.n == 7
    progress.reach(5)  # fewer written than reported: stays
    assert bar.n == 7
    progress.reach(20)
    assert bar.n == 20
    bar.close()


def test_the_empty_shard_counts_nothing_in_the_manifest(tmp_path):
    sink = DatasetSink(str(tmp_path / "o"))
    sink.open(table(1).schema, {})
    manifest = sink.close({}, [], {})
    assert manifest["shards"][0]["rejected"] == 0 and manifest["shards"][0]["reject_reasons"] == {}
    assert manifest["stats"]["failed"] == 0 and manifest["stats"]["succeeded"] == 0
    assert manifest["ledger"] == {"rows": 0, "shards": []} and manifest["generated"] == 0
    # every row rejected: a committed unit without a shard, then the empty shard
    sink = DatasetSink(str(tmp_path / "r"))
    sink.open(table(1).schema, {})
    sink.write(None, [reject_batch("s", ["a", "b"], ["bad", "bad"], ["", ""])], {}, Position(2))
    manifest = sink.close({}, [], {})
    assert [(s["name"], s["rows"], s["rejected"]) for s in manifest["shards"]] == [
        ("part-00001.parquet", 0, 0)
    ]
    assert manifest["rejects"]["rows"] == 2 and manifest["stats"]["failed"] == 2
    assert manifest["stats"]["success_rate"] == 0.0 and manifest["position"]["rows"] == 2


def test_a_refused_output_leaves_its_lock_free_in_the_same_process(tmp_path):
    """Library use: a run refused because another command made the output (exit 6) lets go
    of the output's lock, so the next run in the same process is not told it is locked."""
    write_shards(tmp_path / "in", pa.table({C.ID: ["a", "b"], C.TEXT: ["x", "y"]}), 1, 10)
    engine.run(
        "copy", Source([str(tmp_path / "in")]), [], DatasetSink(str(tmp_path / "out")), quiet=True
    )
    with pytest.raises(DriftError):
        engine.run(
            "other",
            Source([str(tmp_path / "in")]),
            [],
            DatasetSink(str(tmp_path / "out")),
            quiet=True,
        )
    summary, _ = engine.run(
        "copy", Source([str(tmp_path / "in")]), [], DatasetSink(str(tmp_path / "out")), quiet=True
    )
    assert summary.already_complete


def _emb_table(n: int, start: int = 0, dim: int = 8) -> pa.Table:
    rng = np.random.default_rng(start)
    flat = pa.array(rng.standard_normal(n * dim).astype(np.float16))
    return table(n, start).append_column("emb", pa.FixedSizeListArray.from_arrays(flat, dim))


def test_row_groups_close_at_the_row_or_byte_limit_whichever_comes_first(tmp_path, monkeypatch):
    """Row groups of ROW_GROUP_ROWS rows (a group ends when the limit is reached, not passed)
    or ROW_GROUP_BYTES bytes; a shard of --shard-bytes; embeddings and media are written
    without dictionary or statistics, other columns with both."""
    import mmtools.io.dataset as dataset

    def groups(out) -> list[list[int]]:
        found = [pq.read_metadata(f) for f in sorted(out.glob("part-*.parquet"))]
        return [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in found]

    def run(out, batches, **sink_options):
        sink = DatasetSink(str(out), **sink_options)
        sink.open(batches[0].schema, {})
        done = 0
        for b in batches:
            done += b.num_rows
            sink.write(b.to_batches()[0], [], {}, Position(done))
        sink.close({}, [], {})

    monkeypatch.setattr(dataset, "ROW_GROUP_ROWS", 8)
    run(tmp_path / "rows", [_emb_table(4, k * 4) for k in range(5)])
    assert groups(tmp_path / "rows") == [[8, 8, 4]]
    monkeypatch.setattr(dataset, "ROW_GROUP_ROWS", 1000)
    one = _emb_table(4).to_batches()[0].nbytes
    monkeypatch.setattr(dataset, "ROW_GROUP_BYTES", 2 * one)
    run(tmp_path / "bytes", [_emb_table(4, k * 4) for k in range(5)])
    assert groups(tmp_path / "bytes") == [[8, 8, 4]]
    run(tmp_path / "shards", [_emb_table(4, k * 4) for k in range(5)], shard_bytes=2 * one)
    assert groups(tmp_path / "shards") == [[8], [8], [4]]
    group = pq.read_metadata(tmp_path / "rows" / "part-00000.parquet").row_group(0)
    column = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert column["id"].statistics is not None and column["id"].has_dictionary_page
    emb = next(c for name, c in column.items() if name.startswith("emb"))
    assert emb.statistics is None and not emb.has_dictionary_page


def test_a_unit_without_a_shard_adds_no_bytes_and_empty_ledger_batches_no_ledger(tmp_path):
    """Only rejects in a commit unit: no shard, 0 bytes in the run's stats; a step's empty
    ledger batch writes no ledger file."""
    out = tmp_path / "o"
    sink = DatasetSink(str(out), shard_rows=2)
    sink.open(table(1).schema, {})
    rejects = reject_batch("s", ["r0", "r1"], ["not_image"] * 2, ["x"] * 2)
    empty = ledger_rows("s", table(1).to_batches()[0], np.array([True]), "where").slice(0, 0)
    sink.write(table(2, 2).to_batches()[0], [], {}, Position(2), drops=[empty])
    sink.write(None, [rejects], {}, Position(4), drops=[empty])  # its unit: rejects alone
    manifest = sink.close({}, [], {})
    assert [r["shard"] for r in sink.records] == ["part-00000.parquet", None]
    sizes = sum(f.stat().st_size for f in out.glob("part-*.parquet"))
    assert manifest["stats"]["bytes"] == sizes and manifest["rejects"]["rows"] == 2
    assert not (out / L.DROPPED_DIR).exists() and manifest["ledger"] == {"rows": 0, "shards": []}
