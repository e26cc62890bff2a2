"""Reads kept to what a command needs: `search` and `sheet` read only the Parquet row groups
of the rows they show; a finished pipeline that is rerun passes little down its pipes."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MMTOOLS, image_bytes, mmtools, read_dataset
from test_sheet import html_ids

from mmtools import columns as C
from mmtools.tools.sheet import SheetConfig, tile_size

GROUP = 10  # rows per Parquet row group
ROWS = 200


def damage_row_groups(path: Path, keep: set[int], spare: set[str] = frozenset()) -> None:
    """Overwrite the pages of every row group not in `keep` (all columns but `spare`) with
    bytes Parquet cannot decode; the footer, the size and the mtime stay as they were."""
    before = os.stat(path)
    meta = pq.ParquetFile(path).metadata
    with open(path, "r+b") as f:
        for g in set(range(meta.num_row_groups)) - keep:
            for j in range(meta.num_columns):
                chunk = meta.row_group(g).column(j)
                if chunk.path_in_schema.split(".")[0] in spare:
                    continue
                start = (
                    chunk.dictionary_page_offset
                    if chunk.has_dictionary_page
                    else chunk.data_page_offset
                )
                f.seek(start)
                f.write(b"\xff" * chunk.total_compressed_size)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.path.getsize(path) == before.st_size
    damaged = pq.ParquetFile(path)
    for g in set(range(meta.num_row_groups)) - keep:
        with pytest.raises(OSError):
            damaged.read_row_group(g)


# -- search ---------------------------------------------------------------------------------

# Rows near the query (row 23) and how far from it: the six nearest sit in row groups 2 and 7,
# the seventh in group 14; every other row is orthogonal to the query.
NEAR = {23: 0.0, 71: 0.1, 25: 0.2, 78: 0.3, 27: 0.4, 74: 0.5, 140: 1.0}
HIT_GROUPS = {2, 7}


def _near_vectors(dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(3)
    x = np.zeros((ROWS, dim), np.float32)
    x[:, dim // 2 :] = rng.standard_normal((ROWS, dim - dim // 2))
    for k, (row, eps) in enumerate(NEAR.items()):
        x[row] = 0.0
        x[row, 0] = 1.0
        x[row, 1 + k] = eps
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def indexed(tmp_path) -> tuple[Path, pa.Table]:
    """An index over one shard of 200 rows in row groups of 10, with every row group but
    those of the six nearest hits damaged after the index was built."""
    x = _near_vectors()
    table = pa.table(
        {
            C.ID: [f"r{i:05d}" for i in range(ROWS)],
            C.TEXT: [f"caption of row {i}" for i in range(ROWS)],
            C.IMAGE: C.media_array(
                [image_bytes(i, size=(12, 12)) for i in range(ROWS)], [None] * ROWS
            ),
            C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(
                pa.array(x.astype(np.float16).ravel()), x.shape[1]
            ),
        }
    )
    (tmp_path / "ds").mkdir()
    shard = tmp_path / "ds" / "part-00000.parquet"
    pq.write_table(table, shard, row_group_size=GROUP)
    mmtools("index", tmp_path / "ds", "-o", tmp_path / "idx", "-q")
    damage_row_groups(shard, HIT_GROUPS)
    return tmp_path, table


def test_search_reads_only_the_row_groups_that_hold_the_hits(indexed):
    from PIL import Image

    root, table = indexed
    want = [row for row in NEAR if row != 140]
    args = ["search", root / "idx", "--id", "r00023", "-k", "6"]
    shown = mmtools(*args, "-o", root / "hits", "--sheet", root / "hits.png", "--json", "-q")
    hits = read_dataset(root / "hits")
    assert hits.drop_columns([C.SIMILARITY]).to_pylist() == table.take(want).to_pylist()
    found = json.loads(shown.stdout)["hits"]
    assert [(h["id"], h["caption"]) for h in found] == [
        (f"r{i:05d}", f"caption of row {i}") for i in want
    ]
    near = np.array([NEAR[i] for i in want])
    np.testing.assert_allclose(hits.column(C.SIMILARITY), 1 / np.sqrt(1 + near**2), atol=2e-3)
    tw, th = tile_size(SheetConfig(), 1)
    with Image.open(root / "hits.png") as img:
        assert img.size == (8 * tw, th)
    seventh = mmtools(*args[:-1], "7", "-o", root / "more", check=False)
    assert seventh.returncode == 3 and "cannot read" in seventh.stderr.decode()


# -- sheet ----------------------------------------------------------------------------------

TOP = {31: 0.99, 152: 0.98, 38: 0.97, 157: 0.96, 90: 0.95}  # the fifth best is in group 9
TOP_GROUPS = {3, 15}


def test_sheet_reads_only_the_sort_column_and_the_row_groups_of_the_chosen_rows(tmp_path):
    """Choosing the rows reads the sort column; everything else comes from the chosen rows'
    row groups."""
    scores = np.random.default_rng(5).uniform(0.1, 0.9, ROWS).astype(np.float32)
    for row, score in TOP.items():
        scores[row] = score
    table = pa.table(
        {
            C.ID: [f"row{i:03d}" for i in range(ROWS)],
            C.IMAGE: C.media_array(
                [image_bytes(i, size=(12, 12)) for i in range(ROWS)], [None] * ROWS
            ),
            C.TEXT: [f"caption of row {i}" for i in range(ROWS)],
            C.CLIP_SCORE: pa.array(scores, pa.float32()),
        }
    )
    (tmp_path / "ds").mkdir()
    shard = tmp_path / "ds" / "part-00000.parquet"
    pq.write_table(table, shard, row_group_size=GROUP)
    damage_row_groups(shard, TOP_GROUPS, spare={C.CLIP_SCORE})
    args = ["sheet", tmp_path / "ds", "--sort", C.CLIP_SCORE, "--cols", "4"]
    mmtools(*args, "-n", "4", "-o", tmp_path / "top.png", "--html", tmp_path / "top.html")
    assert html_ids(tmp_path / "top.html") == ["row031", "row152", "row038", "row157"]
    fifth = mmtools(*args, "-n", "5", "-o", tmp_path / "five.png", check=False)
    assert fifth.returncode == 3 and "cannot read" in fifth.stderr.decode()


# -- a finished pipeline rerun --------------------------------------------------------------

BATCH = 256  # rows of 4 KiB: a batch (1 MiB) is far larger than a pipe's buffer (64 KiB)
BATCHES = 6
HOLD = 2 * 65536  # bytes the last stage's relay gathers before its command reads any


class Relay(threading.Thread):
    """Copy one process's stdout into another's stdin, keeping all it took; when the reader
    has gone, close the writer's pipe as a shell pipe would. With `hold`, nothing is passed
    on until that many bytes have been taken: a reader slow to start."""

    def __init__(self, src, dst, hold: int = 0):
        super().__init__(daemon=True)
        self.src, self.dst, self.hold = src, dst, hold
        self.taken, self.passed = bytearray(), 0

    def run(self) -> None:
        try:
            while chunk := os.read(self.src.fileno(), 65536):
                self.taken += chunk
                while len(self.taken) >= self.hold and self.passed < len(self.taken):
                    self.passed += os.write(self.dst.fileno(), self.taken[self.passed :])
        except BrokenPipeError:
            pass
        finally:
            self.src.close()
            self.dst.close()

    def data_batches(self) -> int:
        """Whole data batches in what the writer wrote (the schema and side records aside)."""
        reader = pa.ipc.open_stream(pa.BufferReader(bytes(self.taken)))
        whole = 0
        while True:
            try:
                whole += reader.read_next_batch().num_rows > 0
            except (StopIteration, pa.ArrowInvalid, OSError):
                return whole


def _three_stages(big: Path, out: Path) -> tuple[list[subprocess.Popen], list[Relay]]:
    """`filter BIG -o - | filter - -o - | filter - -o OUT`, each pipe through a relay; the
    last stage's relay holds the stream until the middle stage is inside its first batch."""
    where = ["--where", "n >= 0", "--batch-size", str(BATCH)]
    stages = [
        [*MMTOOLS, "filter", str(big), *where, "-o", "-", "-q"],
        [*MMTOOLS, "filter", "-", *where, "-o", "-", "-q"],
        [*MMTOOLS, "filter", "-", *where, "-o", str(out)],
    ]
    procs = [
        subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL if i == 0 else subprocess.PIPE,
            stdout=subprocess.PIPE if i < 2 else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i, args in enumerate(stages)
    ]
    relays = [Relay(procs[0].stdout, procs[1].stdin), Relay(procs[1].stdout, procs[2].stdin, HOLD)]
    for relay in relays:
        relay.start()
    for p in procs:
        p.wait(timeout=120)
    for relay in relays:
        relay.join(timeout=30)
    return procs, relays


@pytest.fixture(scope="module")
def rerun(tmp_path_factory):
    """A three-stage pipeline run to completion, then run again: both runs' processes and
    relays, and the output's files after each."""
    root = tmp_path_factory.mktemp("rerun")
    rng = np.random.default_rng(9)
    n = BATCH * BATCHES
    big = root / "big.parquet"
    blobs = [rng.bytes(4096) for _ in range(n)]
    ids = [f"b{i:05d}" for i in range(n)]
    pq.write_table(pa.table({C.ID: ids, "n": pa.array(range(n), pa.int64()), "blob": blobs}), big)
    out = root / "out"

    def files() -> dict:
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    first = _three_stages(big, out)
    made = files()
    second = _three_stages(big, out)
    return out, first, made, second, files()


def test_rerun_of_a_finished_pipeline_writes_nothing_and_feeds_its_last_stage_no_batch(rerun):
    """The last stage decides from the stream's schema, before any batch of it."""
    out, (procs, relays), made, (again, relays_again), after = rerun
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert [r.data_batches() for r in relays] == [BATCHES, BATCHES]
    assert read_dataset(out).column("n").to_pylist() == list(range(BATCH * BATCHES))
    assert [p.returncode for p in again] == [0, 0, 0]
    assert [p.stderr.read() for p in again] == [
        b"",
        b"",
        f"mmtools filter: {out} is already complete; nothing to do\n".encode(),
    ]
    assert relays_again[1].data_batches() == 0
    assert after == made


def test_rerun_of_a_finished_pipeline_stops_an_earlier_stage_after_at_most_one_batch(rerun):
    """The middle stage was writing its first batch when the last stage left: it needs that
    one batch of its input and no other."""
    _, _, _, (_, relays), _ = rerun
    assert relays[0].data_batches() == 1
