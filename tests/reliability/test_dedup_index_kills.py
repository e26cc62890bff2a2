"""`dedup --index`: a run killed at any point of its output's and its index's commit loses
no key and adds none twice once rerun; the next day's run still sees every earlier row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from forked import INDEX_POINTS, run_to_end

from mmtools import columns as C
from mmtools import engines
from mmtools.io.dataset import DatasetSink
from mmtools.io.source import Source
from mmtools.steps.dedup.index import key_rows
from mmtools.steps.dedup.step import Dedup, DedupConfig

# (where, what the kill leaves): staged keys before the output commits; the output
# committed but nothing added; the generation renamed but unlisted; listed but still
# pending; and the pending record removed (all done but the process end).
POINTS = ["index-staged", "manifest", *[p for p in INDEX_POINTS if p != "index-staged"]]
POINTS.remove("index-model-renamed")  # only runs that fit a model pass it (semantic, below)


def days(tmp: Path) -> list[Path]:
    """Three days of captions: each repeats some of the days before and itself."""
    texts = [
        [f"scene {k}" for k in range(12)] + ["scene 3", "scene 5"],
        [f"scene {k}" for k in range(6, 18)] + ["scene 17"],
        [f"scene {k}" for k in range(0, 24, 2)],
    ]
    files = []
    for d, t in enumerate(texts):
        files.append(tmp / f"day{d}.parquet")
        pq.write_table(pa.table({C.ID: [f"d{d}-{k}" for k in range(len(t))], C.TEXT: t}), files[-1])
    return files


def index_ids(idx: Path) -> list[str]:
    """The ids of every key row the index's manifest lists, in generation order."""
    return key_rows(str(idx))[C.ID].to_pylist()


def kept(out: Path) -> list[str]:
    return pq.read_table(out, columns=[C.ID])[C.ID].to_pylist() if out.exists() else []


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_in_the_index_commit_is_repaired_by_the_rerun(point, tmp_path):
    files, idx = days(tmp_path), tmp_path / "idx"
    step = Dedup(DedupConfig())
    engines.run(
        "dedup",
        Source([str(f) for f in files]),
        [step],
        DatasetSink(str(tmp_path / "once")),
        quiet=True,
    )
    expected = kept(tmp_path / "once")

    def argv(d: int) -> list[str]:
        out = str(tmp_path / f"out{d}")
        return ["dedup", str(files[d]), "--index", str(idx), "-o", out, "--max-drop-rate", "1"]

    assert run_to_end(argv(0), tmp_path / "0.log") == 0
    log = tmp_path / "killed.log"
    assert run_to_end(argv(1), log, kill_at=(point, 1)) == -9, log.read_text()
    output_committed = (tmp_path / "out1" / "_manifest.json").exists()
    assert output_committed == (point != "index-staged")
    assert run_to_end(argv(1), tmp_path / "1.log") == 0, (tmp_path / "1.log").read_text()
    assert run_to_end(argv(2), tmp_path / "2.log") == 0, (tmp_path / "2.log").read_text()
    runs = [kept(tmp_path / f"out{d}") for d in range(3)]
    assert [i for r in runs for i in r] == expected
    assert index_ids(idx) == expected  # every kept row's keys, each once
    assert sorted(p.name for p in idx.iterdir()) == [
        "_index.json",
        "gen-000001.arrow",
        "gen-000002.arrow",
        "gen-000003.arrow",
    ]


def embedding_days(tmp: Path) -> list[Path]:
    """Three days of embeddings (30, 60, 20 rows, each with copies of earlier rows): day 2
    has more than doubled the index (30 -> 84), so it fits a new model and stages it."""
    rng = np.random.default_rng(4)
    base = rng.standard_normal((110, 16))
    spans, copies = [(0, 30), (30, 90), (90, 110)], [[], [2, 40, 40], [5, 60]]
    files = []
    for d, ((lo, hi), c) in enumerate(zip(spans, copies, strict=True)):
        x = np.r_[base[lo:hi], base[c] + 0.01 * rng.standard_normal((len(c), 16))]
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), 16)
        ids = [f"d{d}-{k}" for k in range(len(x))]
        files.append(tmp / f"day{d}.parquet")
        pq.write_table(pa.table({C.ID: ids, C.IMAGE_EMBEDDING: emb}), files[-1])
    return files


@pytest.mark.parametrize("point", ["manifest", *INDEX_POINTS])
def test_a_kill_while_a_semantic_index_takes_a_new_model_is_repaired(point, tmp_path):
    files, idx = embedding_days(tmp_path), tmp_path / "idx"

    def argv(d: int) -> list[str]:
        out = str(tmp_path / f"out{d}")
        return ["dedup", str(files[d]), "-m", "semantic", "--index", str(idx), "-o", out]

    assert run_to_end(argv(0), tmp_path / "0.log") == 0
    log = tmp_path / "killed.log"
    assert run_to_end(argv(1), log, kill_at=(point, 1)) == -9, log.read_text()
    assert run_to_end(argv(1), tmp_path / "1.log") == 0, (tmp_path / "1.log").read_text()
    assert run_to_end(argv(2), tmp_path / "2.log") == 0, (tmp_path / "2.log").read_text()
    runs = [kept(tmp_path / f"out{d}") for d in range(3)]
    assert [len(r) for r in runs] == [30, 60, 20]  # every copy found, once
    assert index_ids(idx) == [i for r in runs for i in r]
    names = sorted(p.name for p in idx.iterdir())
    # Day 1 fitted the model (the rerun, if the kill dropped its staged one); day 2 kept it.
    assert names == ["_index.json", *[f"gen-00000{g}.arrow" for g in (1, 2, 3)], "model-000002.npz"]
