"""The dataset contract: manifest, resume after SIGKILL, drift, overwrite, lock, bad Parquet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MMTOOLS, make_image_folder, mmtools, read_dataset, wait_for

from mmtools import columns as C
from mmtools.errors import EXIT_DATA, EXIT_DRIFT, EXIT_LOCKED, DataContractError


def _rows(path) -> list[tuple]:
    t = read_dataset(path)
    return list(zip(t.column("id").to_pylist(), t.column("image_sha256").to_pylist(), strict=True))


def test_manifest_records_lineage_and_counts(dataset):
    m = json.loads((dataset / "_manifest.json").read_text())
    assert m["rows"] == 30 and [s["rows"] for s in m["shards"]] == [10, 10, 10]
    assert m["shards"][1]["inputs"] == [{"shard": "listing", "start": 10, "end": 20}]
    assert m["command"][:2] == ["mmtools", "ingest"]
    assert m["versions"]["mmtools"] and m["versions"]["pyarrow"] == pa.__version__
    assert {f["name"] for f in m["schema"]} >= {"id", "image", "text", "image_sha256"}
    assert not list(dataset.glob(".tmp-*")) and not (dataset / "_progress").exists()
    assert not (dataset / "_run.json").exists() and not (dataset / "_lock").exists()


def test_hf_datasets_decodes_images(dataset):
    datasets = pytest.importorskip("datasets")
    files = sorted(str(p) for p in dataset.glob("part-*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert isinstance(ds.features["image"], datasets.Image)
    row = ds[0]
    assert row["image"].size == (48, 32)
    assert row["text"].startswith("a photo number")


def test_rerun_of_complete_output_does_nothing(dataset, image_folder):
    before = {p.name: p.read_bytes() for p in dataset.iterdir() if p.is_file()}
    proc = mmtools("ingest", image_folder, "-o", dataset, "--shard-rows", 10, "--json")
    summary = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    assert summary["already_complete"] and summary["rows_in"] == 0
    after = {p.name: p.read_bytes() for p in dataset.iterdir() if p.is_file()}
    assert after == before


def test_changed_input_is_refused_then_overwritten(dataset, image_folder):
    make_image_folder(image_folder, 2, start=500)
    proc = mmtools("ingest", image_folder, "-o", dataset, check=False)
    assert proc.returncode == EXIT_DRIFT
    assert "--overwrite" in proc.stderr.decode()
    mmtools("ingest", image_folder, "-o", dataset, "--overwrite", "-q")
    assert len(_rows(dataset)) == 32


def test_changed_option_is_refused(dataset, image_folder):
    proc = mmtools("ingest", image_folder, "-o", dataset, "--paths-only", check=False)
    assert proc.returncode == EXIT_DRIFT
    assert "embed_media" in proc.stderr.decode()


def test_foreign_directory_is_refused(tmp_path, image_folder):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    proc = mmtools("ingest", image_folder, "-o", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr.decode()
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


def test_run_killed_while_writing_its_first_file_is_rerun(tmp_path, image_folder):
    """A kill between the run file's temporary write and its rename leaves only the
    temporary: the rerun takes the directory as its own, not as someone else's."""
    out = tmp_path / "o"
    out.mkdir()
    (out / ".tmp-_run.json").write_text('{"fingerpr')  # cut short by the kill
    mmtools("ingest", image_folder, "-o", out, "-q")
    mmtools("ingest", image_folder, "-o", tmp_path / "fresh", "-q")
    assert _rows(out) == _rows(tmp_path / "fresh") and len(_rows(out)) > 0
    assert not (out / ".tmp-_run.json").exists()


def _start_slow_ingest(listing, out):
    return subprocess.Popen(
        [
            *MMTOOLS,
            "ingest",
            str(listing),
            "-o",
            str(out),
            "--shard-rows",
            "20",
            "--workers",
            "4",
            "-q",
        ],
        stderr=subprocess.PIPE,
    )


def test_resume_after_sigkill(tmp_path, slow_listing):
    reference = tmp_path / "ref"
    mmtools("ingest", slow_listing, "-o", reference, "--shard-rows", 20, "-q", "--workers", 16)
    out = tmp_path / "out"
    for record in ("00002.json", "00005.json"):  # two kills, the second during the resume
        proc = _start_slow_ingest(slow_listing, out)
        wait_for(out / "_progress" / record, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "_manifest.json").exists()
    with pytest.raises(DataContractError):
        read_dataset(out)  # an incomplete dataset is never read as done
    proc = mmtools("ingest", slow_listing, "-o", out, "--shard-rows", 20, "--json", "--workers", 16)
    summary = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    assert summary["resumed_from"] >= 120
    assert _rows(out) == _rows(reference)
    assert not list(out.glob(".tmp-*"))


def test_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path, slow_listing):
    out = tmp_path / "out"
    first = _start_slow_ingest(slow_listing, out)
    wait_for(out / "_progress" / "00000.json", first)
    second = mmtools("ingest", slow_listing, "-o", out, "--shard-rows", 20, check=False)
    assert second.returncode == EXIT_LOCKED
    assert f"pid {first.pid}" in second.stderr.decode()
    first.send_signal(signal.SIGKILL)
    first.wait()
    # The lock died with its holder: the next run takes over and resumes.
    mmtools("ingest", slow_listing, "-o", out, "--shard-rows", 20, "-q", "--workers", 16)
    assert len(_rows(out)) == 400


def test_sigterm_exits_promptly_and_resumes(tmp_path, slow_listing):
    out = tmp_path / "out"
    proc = _start_slow_ingest(slow_listing, out)
    wait_for(out / "_progress" / "00001.json", proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 143
    assert time.monotonic() - t0 < 5
    assert not list(out.glob(".tmp-*")) and not (out / "_manifest.json").exists()
    mmtools("ingest", slow_listing, "-o", out, "--shard-rows", 20, "-q", "--workers", 16)
    assert len(_rows(out)) == 400 and len(set(_rows(out))) == 400


def test_schema_drift_between_shards_is_a_clear_error(tmp_path):
    d = tmp_path / "drift"
    d.mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), d / "a.parquet")
    pq.write_table(pa.table({"id": ["b"], "text": [1]}), d / "b.parquet")
    proc = mmtools("head", d, check=False)
    assert proc.returncode == EXIT_DATA
    err = proc.stderr.decode()
    assert "schema drift" in err and "text is int64, was string" in err
    assert "Traceback" not in err


def test_corrupt_parquet_footer_is_a_clear_error(tmp_path, dataset):
    shard = tmp_path / "broken.parquet"
    data = (dataset / "part-00000.parquet").read_bytes()
    shard.write_bytes(data[:-12] + b"\x00" * 12)
    proc = mmtools("info", shard, check=False)
    assert proc.returncode == EXIT_DATA
    assert "is not a readable Parquet file" in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


def test_incomplete_dataset_is_not_read_as_done(tmp_path, dataset):
    os.rename(dataset / "_manifest.json", dataset / "_run.json")
    proc = mmtools("head", dataset, check=False)
    assert proc.returncode == EXIT_DATA and "incomplete" in proc.stderr.decode()


def test_an_empty_result_is_still_a_dataset_with_a_schema(tmp_path, dataset):
    out = tmp_path / "empty"
    mmtools("filter", dataset, "--where", "width < 0", "-o", out)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == 0 and manifest["dropped"] == {"where": 30}
    assert "rows:    0" in mmtools("info", out).stdout.decode()
    assert read_dataset(out).schema.names == read_dataset(dataset).schema.names


@pytest.mark.parametrize("skip", [0, 3, 7, 10, 11, 25, 40])
def test_resume_offsets_read_exactly_the_remaining_rows(tmp_path, skip):
    from mmtools.io.source import Source

    path = tmp_path / "groups.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(40)]})
    with pq.ParquetWriter(path, table.schema) as w:
        for start, size in ((0, 10), (10, 2), (12, 3), (15, 20), (35, 5)):  # uneven row groups
            w.write_table(table.slice(start, size))
    got = [
        v
        for b in Source([str(path)]).batches(batch_size=4, skip_rows=skip)
        for v in b.column("id").to_pylist()
    ]
    assert got == table.column("id").to_pylist()[skip:]


def test_wide_rows_reach_the_parquet_encoder_a_page_at_a_time():
    """About a MiB of rows at a time: 11 rows of 90 KB images; small rows as pyarrow does."""
    from mmtools.io.dataset import write_batch_rows

    assert write_batch_rows(90_000) == 11
    assert write_batch_rows(5_000_000) == 1
    assert write_batch_rows(100) == 1024 and write_batch_rows(0) == 1024


def test_a_local_parquet_file_streams_in_whole_batches_whatever_its_row_groups(tmp_path):
    """The fast local reader hands out chunks of its own sizes; a Source's batches are still
    `batch_size` rows (the last shorter), from any resume point, with every value intact."""
    from mmtools.io.source import Source

    n = 2345
    emb = pa.FixedSizeListArray.from_arrays(
        pa.array(np.arange(n * 4, dtype=np.float16)), type=C.embedding_type(4, "float16")
    )
    table = pa.table({"id": [f"r{i:05d}" for i in range(n)], C.IMAGE_EMBEDDING: emb})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=700)
    for skip, sizes in ((0, [500] * 4 + [345]), (3, [500] * 4 + [342]), (1999, [346])):
        got = list(Source([str(tmp_path / "t.parquet")]).batches(batch_size=500, skip_rows=skip))
        assert [b.num_rows for b in got] == sizes
        assert pa.Table.from_batches(got, schema=table.schema).equals(table.slice(skip))


def test_a_batch_size_left_to_mmtools_holds_about_4_mib_of_the_columns_read(tmp_path):
    """Wide rows get few rows a batch, narrow rows at most 8192, only the columns read count,
    and a stream keeps the most (its batches come as the upstream made them)."""
    from mmtools.io.source import AUTO_BATCH_ROWS, BATCH_BYTES, Source

    n = 130
    table = pa.table(
        {
            "id": [f"r{i:03d}" for i in range(n)],
            "blob": list(np.random.default_rng(0).bytes(65_536 * n)[i::n] for i in range(n)),
        }
    )
    for name, part in (("a", table.slice(0, 100)), ("b", table.slice(100))):
        pq.write_table(part, tmp_path / f"{name}.parquet", compression="zstd")
    source = Source([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")])
    assert source.batch_rows() == BATCH_BYTES // 65_536 - 1  # 64 KiB and a little a row
    assert source.batch_rows(most=10) == 10
    assert source.batch_rows(["id"]) == AUTO_BATCH_ROWS
    sizes = [b.num_rows for b in source.batches(batch_size=source.batch_rows())]
    assert sizes == [63, 37, 30]  # each file in its own batches


def _embedding_files(root, sizes: list[int]) -> pa.Table:
    """Files of ids and a 4-d float16 embedding (the reader threads' kind), `sizes` rows each;
    the rows of all of them, in order."""
    root.mkdir()
    tables, start = [], 0
    for k, n in enumerate(sizes):
        emb = pa.FixedSizeListArray.from_arrays(
            pa.array(np.arange(start * 4, (start + n) * 4, dtype=np.float16)),
            type=C.embedding_type(4, "float16"),
        )
        t = pa.table({"id": [f"r{i:05d}" for i in range(start, start + n)], C.IMAGE_EMBEDDING: emb})
        pq.write_table(t, root / f"part-{k}.parquet", row_group_size=300)
        tables.append(t)
        start += n
    return pa.concat_tables(tables)


def _readers() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("read part-")]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="files are read ahead on 2+ CPUs")
def test_files_read_at_once_come_out_in_order_from_any_resume_point(tmp_path):
    """On two or more CPUs the next file is read while one is consumed (two reader threads at
    the first batch); the batches are those of one file after the other: `batch_size` rows,
    each file's last one shorter, every value in place, from any resume point."""
    from mmtools.io.source import Source

    table = _embedding_files(tmp_path / "in", [700, 450, 1000, 1])
    source = Source([str(tmp_path / "in")])
    batches = source.batches(batch_size=40)  # the second file: more than its reader may hold
    first = next(batches)
    assert len(_readers()) == 2
    got = [first, *batches]
    assert [b.num_rows for b in got] == [40] * 17 + [20] + [40] * 11 + [10] + [40] * 25 + [1]
    assert pa.Table.from_batches(got, schema=table.schema).equals(table)
    for skip in (3, 700, 1149, 1151, 2150):
        got = list(source.batches(batch_size=400, skip_rows=skip))
        assert pa.Table.from_batches(got, schema=table.schema).equals(table.slice(skip)), skip


def test_files_over_the_read_ahead_budget_are_read_one_at_a_time(tmp_path, monkeypatch):
    from mmtools.io import source as S

    table = _embedding_files(tmp_path / "in", [500, 500, 500])
    monkeypatch.setattr(S, "READ_AHEAD_BYTES", 1000)  # less than one file
    seen = []
    for b in S.Source([str(tmp_path / "in")]).batches(batch_size=200):
        seen.append(len(_readers()))
        assert b.num_rows
    assert max(seen) <= 1
    monkeypatch.setattr(S, "READ_AHEAD_BYTES", 1 << 30)
    got = list(S.Source([str(tmp_path / "in")]).batches(batch_size=200))
    assert pa.Table.from_batches(got, schema=table.schema).equals(table)


def test_a_reader_stopped_early_lets_go_of_its_threads(tmp_path):
    """A consumer that stops after one batch (an error downstream, `head`) leaves no reader
    thread behind, even one blocked on its full queue."""
    from mmtools.io.source import Source

    _embedding_files(tmp_path / "in", [3000, 3000, 3000])
    batches = Source([str(tmp_path / "in")]).batches(batch_size=10)
    next(batches)
    batches.close()
    deadline = time.monotonic() + 5
    while _readers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _readers()


def test_a_damaged_file_among_those_read_ahead_is_a_clear_error_after_the_rows_before_it(
    tmp_path,
):
    """A page of the second file is overwritten (its footer intact): the first file's rows come
    out whole, then the error names the second file; the third is never handed out."""
    from mmtools.io.source import Source

    table = _embedding_files(tmp_path / "in", [600, 600, 600])
    bad = tmp_path / "in" / "part-1.parquet"
    data = bytearray(bad.read_bytes())
    data[4:2000] = b"\xff" * 1996
    bad.write_bytes(bytes(data))
    got = []
    with pytest.raises(DataContractError, match=r"cannot read .*part-1\.parquet"):
        for b in Source([str(tmp_path / "in")]).batches(batch_size=250):
            got.append(b)
    assert pa.Table.from_batches(got, schema=table.schema).equals(table.slice(0, 600))


def test_batches_polars_reads_reach_the_steps_without_a_copy(tmp_path):
    """polars' chunks of `batch_size` rows pass as they are: holding every batch of a file
    takes next to nothing from Arrow's memory pool (a copy would take the embeddings' size)."""
    from mmtools.io.source import Source

    n, dim = 20_000, 64
    values = np.random.default_rng(0).standard_normal(n * dim).astype(np.float16)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(values), type=C.embedding_type(dim, "float16"))
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(n)], C.IMAGE_EMBEDDING: emb}),
        tmp_path / "t.parquet",
    )
    before = pa.total_allocated_bytes()
    got = list(Source([str(tmp_path / "t.parquet")]).batches(batch_size=1000))
    assert sum(b.num_rows for b in got) == n
    assert pa.total_allocated_bytes() - before < values.nbytes / 4
