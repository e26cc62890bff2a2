"""What README promises about reading and writing: batches sized by bytes for the commands that
run no model, a missing extra named with its pip install (search, audio), a failing reader
failing its pipeline, ingest's runs of local files, the quick decode of small images, and
export's durable commits."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MMTOOLS, encode, hiding, image_bytes, mmtools, read_dataset, wav_bytes
from test_durability import check_durable, folder_with_bad_files, run_inline, trace_calls

from mmtools import columns as C

ROW_BLOB = 65_536  # bytes of payload a wide row carries


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """150 rows of 64 KiB each (about 9.4 MiB) in one Parquet file, one row group."""
    root = tmp_path_factory.mktemp("wide")
    n = 150
    blobs = np.random.default_rng(0).bytes(ROW_BLOB * n)
    table = pa.table(
        {
            C.ID: [f"w{i:03d}" for i in range(n)],
            "blob": [blobs[i * ROW_BLOB : (i + 1) * ROW_BLOB] for i in range(n)],
        }
    )
    pq.write_table(table, root / "part-00000.parquet")
    return root


def filter_batches(monkeypatch, *args) -> list[int]:
    """Run `mmtools filter ARGS` in this process; the row counts of the batches its step got."""
    from mmtools.steps.filter.step import Filter

    seen: list[int] = []
    real = Filter.process

    def process(self, batch):
        seen.append(batch.num_rows)
        return real(self, batch)

    monkeypatch.setattr(Filter, "process", process)
    run_inline(["filter", *args, "-q"])
    return seen


# -- W6: batches sized by bytes --------------------------------------------------------------


def test_batches_sized_by_bytes_hold_at_most_8192_rows():
    from mmtools.io.source import AUTO_BATCH_ROWS, BATCH_BYTES

    assert AUTO_BATCH_ROWS == 8192
    assert BATCH_BYTES == 4 * 1024 * 1024


def test_filter_reads_wide_rows_about_4_mib_at_a_time(wide, tmp_path, monkeypatch):
    seen = filter_batches(monkeypatch, wide, "--where", "true", "-o", tmp_path / "out")
    # 4 MiB over rows of 64 KiB and a few bytes of id: 63 rows a batch, the rest last.
    assert seen == [63, 63, 24]
    assert read_dataset(tmp_path / "out").num_rows == 150


def test_filter_with_batch_size_given_uses_it_for_wide_rows(wide, tmp_path, monkeypatch):
    seen = filter_batches(
        monkeypatch, wide, "--where", "true", "--batch-size", "100", "-o", tmp_path / "out"
    )
    assert seen == [100, 50]


def test_filter_reads_narrow_rows_8192_at_a_time(tmp_path, monkeypatch):
    n = 20_000
    pq.write_table(pa.table({C.ID: [f"n{i:05d}" for i in range(n)]}), tmp_path / "narrow.parquet")
    out = tmp_path / "out"
    seen = filter_batches(
        monkeypatch, tmp_path / "narrow.parquet", "--where", "true", "-o", out,
        "--shard-rows", "100000",
    )  # fmt: skip
    assert seen == [8192, 8192, n - 2 * 8192]


# -- W7, U1: missing extras ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> Path:
    """An index over 12 rows of an 8-dimensional image embedding."""
    root = tmp_path_factory.mktemp("idx")
    n, dim = 12, 8
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    table = pa.table(
        {
            C.ID: [f"r{i:02d}" for i in range(n)],
            C.TEXT: [f"caption {i}" for i in range(n)],
            C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
        }
    )
    pq.write_table(table, root / "in.parquet")
    mmtools("index", root / "in.parquet", "-o", root / "idx", "-q")
    return root / "idx"


def test_search_without_faiss_is_a_one_line_error_naming_its_pip_install(small_index, tmp_path):
    out = tmp_path / "hits"
    env = hiding("faiss", root=tmp_path)
    proc = mmtools("search", small_index, "--id", "r03", "-o", out, check=False, env=env)
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode() == (
        "mmtools search: error: this needs the optional package 'faiss'; "
        "install it with pip install 'mmtools[index]'\n"
    )
    assert not out.exists()
    assert b"r03" in mmtools("search", small_index, "--id", "r03", "--json").stdout


def test_embedding_audio_without_transformers_is_a_one_line_error_naming_its_pip_install(
    tmp_path,
):
    table = pa.table(
        {C.ID: ["a0"], C.TEXT: ["a tone"], C.AUDIO: C.media_array([wav_bytes()], [None])}
    )
    pq.write_table(table, tmp_path / "a.parquet")
    out = tmp_path / "out"
    env = hiding("transformers", root=tmp_path)
    proc = mmtools("embed", tmp_path / "a.parquet", "-o", out, "-q", check=False, env=env)
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode() == (
        "mmtools embed: error: this needs the optional package 'transformers'; "
        "install it with pip install 'mmtools[audio]'\n"
    )
    assert not out.exists()


# -- U4: a failing reader fails its pipeline ---------------------------------------------------


def test_in_a_pipe_a_reader_that_fails_fails_the_pipeline_with_its_own_code(wide, tmp_path):
    """The upstream writes about 9 MiB, far more than a pipe holds: it is mid-stream when its
    reader refuses the input, and stops quietly with 0, so the pipeline's status is the
    reader's own code (a column named in --where that the input lacks: 2)."""
    out = tmp_path / "out"
    mm = " ".join(MMTOOLS)
    script = (
        f"set -o pipefail; {mm} filter {wide} --where 'true' -q | "
        f"{mm} filter --where 'no_such_column > 0' -o {out} -q; "
        'echo "${PIPESTATUS[*]} $?" >&2'
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, timeout=120)
    lines = proc.stderr.decode().strip().splitlines()
    assert lines == [  # the upstream says nothing
        "mmtools filter: error: --where 'no_such_column > 0': unknown column no_such_column; "
        "the input has columns id, blob",
        "0 2 2",  # each stage's status, then the pipeline's
    ]
    assert not (out / "_manifest.json").exists()


# -- U8: ingest's runs of local files ----------------------------------------------------------


def test_ingest_reads_local_files_in_runs_of_up_to_8():
    from mmtools.steps.ingest.step import LOCAL_TASK_ROWS, _tasks

    assert LOCAL_TASK_ROWS == 8
    for n in (1, 7, 8, 9, 16, 21):
        rows = [{"location": f"/data/f{i}.jpg", "n": i} for i in range(n)]
        tasks = _tasks(rows, LOCAL_TASK_ROWS)
        assert [len(t) for t in tasks] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
        assert [r["n"] for t in tasks for r in t] == list(range(n))  # in order, each once
    rows = [{"location": f"file:///data/f{i}.jpg", "n": i} for i in range(10)]
    assert [len(t) for t in _tasks(rows, LOCAL_TASK_ROWS)] == [8, 2]  # file:// is local


def test_ingest_reads_each_url_in_a_task_of_its_own():
    from mmtools.steps.ingest.step import LOCAL_TASK_ROWS, _tasks

    rows = [{"location": f"https://example.com/{i}.jpg", "n": i} for i in range(10)]
    tasks = _tasks(rows, LOCAL_TASK_ROWS)
    assert [[r["n"] for r in t] for t in tasks] == [[i] for i in range(10)]


def test_a_listing_mixing_urls_and_local_files_keeps_each_row_with_its_own_columns(
    tmp_path, http_server
):
    lines = ["url,caption,tag"]
    for i in range(32):  # 32 rows in one batch: runs of more than one local file
        if i % 4 == 1:
            lines.append(f"{http_server}/img/{i},c{i},t{i}")
        else:
            (tmp_path / f"f{i}.jpg").write_bytes(image_bytes(i))
            lines.append(f"{tmp_path / f'f{i}.jpg'},c{i},t{i}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    run_inline(["ingest", tmp_path / "list.csv", "-o", tmp_path / "out", "-q"])
    table = read_dataset(tmp_path / "out")
    captions, tags = table.column(C.TEXT).to_pylist(), table.column("tag").to_pylist()
    assert [t[1:] for t in tags] == [c[1:] for c in captions]  # each row its own tag
    assert captions == [f"c{i}" for i in range(32)]  # in the listing's order


# -- W51: small JPEGs and PNGs decode in the reading thread ------------------------------------


def _opened(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


def _gray(width: int, height: int, fmt: str) -> bytes:
    from PIL import Image

    return encode(Image.new("L", (width, height), 128), fmt)


def test_small_image_quick_decode_limits():
    from mmtools.media import QUICK_BYTES, QUICK_MIN_LIMIT, QUICK_PIXELS

    assert QUICK_PIXELS == 1024 * 1024
    assert QUICK_BYTES == 4 * 1024 * 1024
    assert QUICK_MIN_LIMIT == 1.0


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_jpeg_or_png_of_at_most_1_mi_pixels_and_4_mib_decodes_in_the_reading_thread(
    fmt, monkeypatch
):
    from mmtools.media import ENV_DECODE_TIMEOUT, _decodes_quickly

    monkeypatch.delenv(ENV_DECODE_TIMEOUT, raising=False)  # the default limit, 60 s
    at_limit = _opened(_gray(1024, 1024, fmt))
    one_more_row = _opened(_gray(1024, 1025, fmt))
    assert at_limit.format == fmt
    assert _decodes_quickly(at_limit, 4 << 20) is True
    assert _decodes_quickly(at_limit, (4 << 20) + 1) is False  # a byte over 4 MiB
    assert _decodes_quickly(one_more_row, 1000) is False  # 1024 pixels over


def test_the_quick_decode_stops_under_a_decode_limit_of_one_second(monkeypatch):
    from mmtools.media import ENV_DECODE_TIMEOUT, _decodes_quickly

    img = _opened(image_bytes(0))
    monkeypatch.setenv(ENV_DECODE_TIMEOUT, "1")
    assert _decodes_quickly(img, 1000) is True
    monkeypatch.setenv(ENV_DECODE_TIMEOUT, "0.99")
    assert _decodes_quickly(img, 1000) is False


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP"])
def test_other_formats_never_decode_in_the_reading_thread(fmt, monkeypatch):
    from mmtools.media import ENV_DECODE_TIMEOUT, _decodes_quickly

    monkeypatch.delenv(ENV_DECODE_TIMEOUT, raising=False)
    img = _opened(_gray(8, 8, fmt))
    assert img.format == fmt
    assert _decodes_quickly(img, 100) is False


# -- W28: export's durable commits -------------------------------------------------------------


def test_export_renames_each_shard_durably_before_recording_its_progress(tmp_path, monkeypatch):
    src = tmp_path / "ds"
    mmtools("ingest", folder_with_bad_files(tmp_path / "imgs"), "-o", src, "-q")
    monkeypatch.setenv("MMTOOLS_FSYNC", "1")
    out = tmp_path / "new" / "out"  # two new directories: their entries must be synced too
    trace = trace_calls(monkeypatch, tmp_path)
    run_inline(["export", src, "-o", out, "--shard-rows", 10, "--batch-size", 5, "-q"])
    monkeypatch.undo()
    problems = check_durable(trace)
    assert not problems, "\n".join(problems)
    manifest = json.loads((out / "_export.json").read_text())
    assert manifest["shards"] == ["00000.tar", "00001.tar", "00002.tar"]
    renamed = [dst for _, dst in trace.names("replace")]
    assert renamed[-1] == "new/out/_export.json"  # the record of a finished export is last
    for i, shard in enumerate(manifest["shards"]):
        record = renamed.index(f"new/out/_progress/{i:05d}.json")
        assert renamed.index(f"new/out/{shard}") < record
