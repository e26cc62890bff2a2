"""`dedup --index DIR`: dedup each new batch against every row kept by earlier runs.

The reference is one dedup run over all batches at once: run batch by batch against a
growing index, the union of the kept rows must be the same rows (identical for exact and
pHash keys on real photographs; >= 99% agreement for MinHash and semantic keys, whose
groups are found by LSH bands and k-means clusters fitted to the rows each run sees).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MMTOOLS, mmtools, read_dataset

from mmtools import columns as C
from mmtools import engines
from mmtools.errors import EXIT_DRIFT, EXIT_LOCKED
from mmtools.io.dataset import DatasetSink, read_dropped
from mmtools.io.source import Source
from mmtools.steps.dedup.index import SeenIndex, key_rows
from mmtools.steps.dedup.step import Dedup, DedupConfig

sys.path.insert(0, str(Path(__file__).parent / "bench"))
import bench_phash_curve as curve

BATCHES = 10


def index_ids(idx: Path) -> list[str]:
    """The ids of every key row the index's manifest lists, in generation order."""
    return key_rows(str(idx))[C.ID].to_pylist()


def batch_files(tmp: Path, table: pa.Table, batch: np.ndarray) -> list[Path]:
    """`table`'s rows split into BATCHES Parquet files by `batch` (row order kept)."""
    files = []
    for b in range(BATCHES):
        files.append(tmp / f"batch{b}.parquet")
        pq.write_table(table.filter(pa.array(batch == b)), files[-1], row_group_size=16)
    return files


def dedup(files: list[Path], out: Path, config: DedupConfig) -> tuple[pa.Table, Dedup]:
    step = Dedup(config)
    engines.run("dedup", Source([str(f) for f in files]), [step], DatasetSink(str(out)), quiet=True)
    return read_dataset(out), step


def one_run_and_batches(tmp: Path, files: list[Path], config: DedupConfig):
    """Kept ids of one run over all files, and of a run per file against one index."""
    once, _ = dedup(files, tmp / "once", config)
    kept, earlier = [], 0
    for b, f in enumerate(files):
        config_b = DedupConfig(**{**config.__dict__, "index": str(tmp / "idx")})
        out, step = dedup([f], tmp / f"day{b}", config_b)
        kept += out[C.ID].to_pylist()
        earlier += sum(s.get("of_earlier_runs", 0) for s in step.stats.values())
    return once[C.ID].to_pylist(), kept, earlier


@pytest.fixture(scope="module")
def photos():
    """48 photo tiles, and resized and cropped (re-encoded) copies of them, plus
    byte-for-byte copies; spread over the batches at random (copies before originals too)."""
    blobs, photo, edit = curve.corpus()
    edits = {"original", "resize50", "resize150", "crop2_centre"}
    at = [k for k, e in enumerate(edit) if e in edits]
    at += [k for k, e in enumerate(edit) if e == "original"][::3]  # exact copies
    ids = [f"r{n:03d}-p{photo[k]:02d}-{edit[k]}" for n, k in enumerate(at)]
    table = pa.table({C.ID: ids, C.IMAGE: C.media_array([blobs[k] for k in at], [None] * len(at))})
    return table, np.random.default_rng(5).integers(0, BATCHES, len(at))


def test_ten_batches_against_an_index_keep_what_one_run_keeps_exact_and_phash(photos, tmp_path):
    table, batch = photos
    files = batch_files(tmp_path, table, batch)
    config = DedupConfig(methods=("exact", "phash"))
    once, kept, earlier = one_run_and_batches(tmp_path, files, config)
    assert kept == sorted(kept, key=once.index) and sorted(kept) == sorted(once)
    assert len(once) == 48  # one row per photo: every copy found, no two photos merged
    # Most copies sit in a later batch than a row of their photo: the index found them.
    firsts = {}
    for b, i in zip(batch, table[C.ID].to_pylist(), strict=True):
        firsts.setdefault(i.split("-")[1], []).append(b)
    later = sum(len(bs) - bs.count(min(bs)) for bs in firsts.values())
    # (less the few byte copies that exact dedup ties to a row of their own batch first)
    assert later > 100 and later - 3 <= earlier <= later
    assert index_ids(tmp_path / "idx") == kept  # each kept row's keys once, in run order


def captions_and_embeddings(n_base: int = 150, copies: int = 2, dim: int = 64):
    """Distinct captions (12 random words) and embeddings, and copies of each with the last
    word replaced and the embedding nudged (cosine ~0.995 to the original, ~0.99 to each
    other). Copies that met only through their original (each a different word changed) would
    be grouped by one run and not by runs that see them on different days: that chain is the
    one way batch runs and one run can differ."""
    rng = np.random.default_rng(11)
    vocab = [f"w{k}" for k in range(3000)]
    base_text = [list(rng.choice(vocab, 12)) for _ in range(n_base)]
    base_x = rng.standard_normal((n_base, dim))
    texts, xs, ids = [], [], []
    for b in range(n_base):
        for c in range(copies + 1):
            words = list(base_text[b])
            if c:
                words[-1] = str(rng.choice(vocab))  # copies stay within reach of each other
            texts.append(" ".join(words))
            xs.append(base_x[b] + (0.1 * rng.standard_normal(dim) if c else 0))
            ids.append(f"b{b:03d}-c{c}")
    order = rng.permutation(len(ids))
    x = np.asarray(xs, np.float32)[order]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), dim)
    table = pa.table(
        {C.ID: [ids[k] for k in order], C.TEXT: [texts[k] for k in order], C.IMAGE_EMBEDDING: emb}
    )
    return table, rng.integers(0, BATCHES, len(ids))


@pytest.mark.parametrize("method", ["minhash", "semantic"])
def test_ten_batches_against_an_index_agree_with_one_run_minhash_and_semantic(method, tmp_path):
    """Differences can come only from where a group's edges fall: one run groups all rows
    with LSH/k-means over all of them, a batch run over its rows and the index's. With
    one copy family per caption and well-separated embeddings, none is expected; the bound
    allows 1% of the rows."""
    table, batch = captions_and_embeddings()
    files = batch_files(tmp_path, table, batch)
    once, kept, earlier = one_run_and_batches(tmp_path, files, DedupConfig(methods=(method,)))
    assert len(set(once) ^ set(kept)) <= 0.01 * table.num_rows
    assert len(once) == 150 and len(kept) == len(set(kept))
    assert earlier > 200  # most copies arrive after their family's first row


def test_marked_duplicates_name_the_row_an_earlier_run_kept(tmp_path):
    pq.write_table(
        pa.table({C.ID: ["a", "b"], C.TEXT: ["a red circle", "a blue star"]}),
        tmp_path / "1.parquet",
    )
    pq.write_table(
        pa.table({C.ID: ["c", "d", "e"], C.TEXT: ["A red circle!", "new", "new"]}),
        tmp_path / "2.parquet",
    )
    idx = str(tmp_path / "idx")
    dedup([tmp_path / "1.parquet"], tmp_path / "o1", DedupConfig(index=idx))
    out, step = dedup([tmp_path / "2.parquet"], tmp_path / "o2", DedupConfig(index=idx, mark=True))
    assert list(
        zip(
            out[C.ID].to_pylist(),
            out[C.IS_DUPLICATE].to_pylist(),
            out[C.DUP_KEPT_ID].to_pylist(),
            strict=True,
        )
    ) == [("c", True, "a"), ("d", False, None), ("e", True, "d")]
    assert step.stats["exact"] == {"clusters": 2, "duplicates": 2, "of_earlier_runs": 1}
    assert index_ids(tmp_path / "idx") == ["a", "b", "d"]  # marked rows are not kept rows
    # The same rows again into another output: all three are now rows seen before (d and e
    # by the marking run), and the ledger ties each to the row kept then.
    dedup([tmp_path / "2.parquet"], tmp_path / "o3", DedupConfig(index=idx))
    ledger = read_dropped(str(tmp_path / "o3"))
    assert ledger.select([C.ID, "kept_id"]).to_pylist() == [
        {C.ID: "c", "kept_id": "a"},
        {C.ID: "d", "kept_id": "d"},
        {C.ID: "e", "kept_id": "d"},
    ]
    assert read_dataset(tmp_path / "o3").num_rows == 0


def test_a_rerun_into_the_same_output_replaces_its_generation(tmp_path):
    pq.write_table(pa.table({C.ID: ["a", "b"], C.TEXT: ["x y", "z"]}), tmp_path / "1.parquet")
    idx, out = tmp_path / "idx", tmp_path / "o"
    for _ in range(2):
        mmtools("dedup", tmp_path / "1.parquet", "--index", idx, "-o", out, "--overwrite")
        assert read_dataset(out)[C.ID].to_pylist() == ["a", "b"]  # not its own duplicates
        assert index_ids(idx) == ["a", "b"]
    manifest = json.loads((idx / "_index.json").read_text())
    assert [g["gen"] for g in manifest["generations"]] == [2]
    assert sorted(p.name for p in idx.iterdir()) == ["_index.json", "gen-000002.arrow"]


def test_other_settings_exit_6_and_a_held_index_exits_5_or_waits(tmp_path):
    pq.write_table(pa.table({C.ID: ["a"], C.TEXT: ["x"]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({C.ID: ["a2", "b"], C.TEXT: ["x", "y"]}), tmp_path / "2.parquet")
    idx = tmp_path / "idx"
    mmtools("dedup", tmp_path / "1.parquet", "--index", idx, "-o", tmp_path / "o1")
    other = mmtools(
        "dedup",
        tmp_path / "1.parquet",
        "--index",
        idx,
        "-m",
        "minhash",
        "-o",
        tmp_path / "o2",
        check=False,
    )
    assert other.returncode == EXIT_DRIFT
    assert other.stderr.decode().strip().splitlines()[-1] == (
        f"mmtools dedup: error: --index {idx} was built with other dedup settings (methods: "
        "['exact'] then, ['minhash'] now); use another directory or the settings it was built "
        "with"
    )
    held = SeenIndex(str(idx)).open(None)
    try:
        busy = mmtools(
            "dedup", tmp_path / "1.parquet", "--index", idx, "-o", tmp_path / "o3", check=False
        )
        assert busy.returncode == EXIT_LOCKED and "being written by another" in busy.stderr.decode()
        assert not (tmp_path / "o3" / "_manifest.json").exists()
        waiting = subprocess.Popen(
            [
                *MMTOOLS,
                "dedup",
                str(tmp_path / "2.parquet"),
                "--index",
                str(idx),
                "-o",
                str(tmp_path / "o4"),
                "--wait-lock",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        assert waiting.poll() is None  # still waiting for the index
    finally:
        held.close()
    assert waiting.wait(timeout=60) == 0, waiting.stderr.read()
    assert read_dataset(tmp_path / "o4")[C.ID].to_pylist() == ["b"]  # "x" was seen by o1's run


def test_info_and_rebuild_from_the_datasets_that_fed_it(tmp_path):
    pq.write_table(pa.table({C.ID: ["a", "b"], C.TEXT: ["x", "y"]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({C.ID: ["c", "d"], C.TEXT: ["y", "w"]}), tmp_path / "2.parquet")
    idx = tmp_path / "idx"
    for day in (1, 2):
        mmtools("dedup", tmp_path / f"{day}.parquet", "--index", idx, "-o", tmp_path / f"o{day}")
    info = json.loads(mmtools("info", idx, "--json").stdout)
    assert (info["rows"], info["methods"], len(info["runs"])) == (3, ["exact"], 2)
    assert [r["output"] for r in info["runs"]] == [str(tmp_path / "o1"), str(tmp_path / "o2")]
    text = mmtools("dedup-index", idx).stdout.decode()
    assert "rows:     3" in text and "exact: fields=['text']" in text
    for gen in idx.glob("gen-*.arrow"):
        gen.unlink()  # a lost generation: rebuild from the datasets
    mmtools(
        "dedup-index", idx, "--rebuild-from", tmp_path / "o1", "--rebuild-from", tmp_path / "o2"
    )
    assert sorted(index_ids(idx)) == ["a", "b", "d"]
    pq.write_table(pa.table({C.ID: ["e", "f"], C.TEXT: ["w", "v"]}), tmp_path / "3.parquet")
    mmtools("dedup", tmp_path / "3.parquet", "--index", idx, "-o", tmp_path / "o3")
    assert read_dataset(tmp_path / "o3")[C.ID].to_pylist() == ["f"]
    not_index = mmtools("dedup-index", tmp_path / "o1", check=False)
    assert not_index.returncode == 2 and "is not a dedup index" in not_index.stderr.decode()


def test_index_dedup_on_ray_equals_local(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from test_ray import assert_same, run_both

    from mmtools.engines.ray import executor as ray_engine

    monkeypatch.setattr(ray_engine, "DRIVER_ROWS", 0)  # on the workers

    table, batch = captions_and_embeddings(n_base=40)
    files = batch_files(tmp_path, table, batch % 2)[:2]
    idx = tmp_path / "idx"
    dedup([files[0]], tmp_path / "day0", DedupConfig(methods=("minhash",), index=str(idx)))
    shutil.copytree(idx, tmp_path / "idx-day0")

    def steps(_source):
        shutil.rmtree(idx)
        shutil.copytree(tmp_path / "idx-day0", idx)  # each engine meets the same index
        return [Dedup(DedupConfig(methods=("minhash",), index=str(idx)))]

    manifests = run_both(tmp_path, "dedup", steps, lambda: Source([str(files[1])]))
    out = assert_same(tmp_path, manifests)
    assert manifests["ray"]["dropped"]["minhash"] > out.num_rows  # most met day 0's rows
    assert index_ids(idx)[-out.num_rows :] == out[C.ID].to_pylist()


@pytest.mark.parametrize("radius", [0, 3, 4, 10, 15])
def test_index_pairs_are_exactly_the_hashes_within_the_radius(radius):
    """A run's pHashes against an index's: every pair within the radius (planted at exactly
    the radius and one past), none beyond, as brute force finds them."""
    from mmtools.steps.dedup.phash import cross_pairs, popcount

    rng = np.random.default_rng(radius)
    old = rng.integers(0, 2**64, 4000, dtype=np.uint64)
    new = old[:400].copy()
    for k in range(400):  # flip exactly radius + (k % 3) - 1 bits: one under, at, one past
        bits = rng.choice(64, max(0, radius + k % 3 - 1), replace=False)
        for b in bits:
            new[k] ^= np.uint64(1) << np.uint64(int(b))
    i, j = cross_pairs(new, old, radius)
    brute_i, brute_j = np.nonzero(
        popcount((new[:, None] ^ old[None, :]).ravel()).reshape(len(new), len(old)) <= radius
    )
    found, brute = zip(i.tolist(), j.tolist(), strict=True), zip(brute_i, brute_j, strict=True)
    assert sorted(found) == sorted((int(a), int(b)) for a, b in brute)
    at_radius = [k for k in range(400) if (k % 3 == 1 and radius > 0) or k % 3 == 0]
    assert {(k, k) for k in at_radius} <= set(zip(i.tolist(), j.tolist(), strict=True))


def test_minhash_band_matches_are_exactly_the_shared_codes():
    """A run's captions against an index's by LSH band code: each (index row, caption) pair
    sharing a code in any band, once, found without sorting the index's codes."""
    from mmtools.steps.dedup.minhash import matches

    rng = np.random.default_rng(3)
    fresh = rng.integers(0, 2**64, (2000, 9), dtype=np.uint64)
    stored = rng.integers(0, 2**64, (50000, 9), dtype=np.uint64)
    stored[::100] = fresh[:500]  # every band equal
    stored[7::100, 4] = fresh[600:1100, 4]  # one band equal
    stored[9::100, 2] = fresh[0:500, 2] ^ np.uint64(1)  # one bit off: no match
    fresh[1500:1510, 3] = fresh[1500, 3]  # ten captions of the run share a code...
    stored[11, 3] = fresh[1500, 3]  # ...that one index row has: ten pairs
    s, f = matches(fresh, [stored[:20001], stored[20001:20001], stored[20001:]])  # any chunks
    expected = {(k * 100, k) for k in range(500)} | {(7 + k * 100, 600 + k) for k in range(500)}
    expected |= {(11, 1500 + k) for k in range(10)}
    assert sorted(zip(s.tolist(), f.tolist(), strict=True)) == sorted(expected)


def embedding_file(path: Path, ids: list[str], x: np.ndarray) -> Path:
    flat = pa.array(x.astype(np.float32).ravel())
    emb = pa.FixedSizeListArray.from_arrays(flat, x.shape[1])
    pq.write_table(pa.table({C.ID: ids, C.IMAGE_EMBEDDING: emb}), path)
    return path


def test_semantic_index_keeps_its_model_until_the_rows_double(tmp_path):
    """Run 1 fits the model; run 2 (160 rows <= 2 x 100) clusters by it and fits nothing; run
    3 (220 > 200) fits again and keeps the new cluster of every earlier row in the model's
    file; run 4 finds copies of rows of each generation, before and after the refit."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((280, 32))
    idx = tmp_path / "idx"
    days = [(0, 100, []), (100, 160, [5, 50]), (160, 220, [120, 7]), (220, 280, [3, 130, 170])]
    models, found = [], []
    for d, (lo, hi, copies) in enumerate(days):
        ids = [f"r{k}" for k in range(lo, hi)] + [f"copy-of-r{k}" for k in copies]
        x = np.r_[base[lo:hi], base[copies] + 0.01 * rng.standard_normal((len(copies), 32))]
        f = embedding_file(tmp_path / f"day{d}.parquet", ids, x)
        config = DedupConfig(methods=("semantic",), index=str(idx), clusters=None)
        out, step = dedup([f], tmp_path / f"out{d}", config)
        assert out[C.ID].to_pylist() == ids[: hi - lo]  # each copy, and only copies, dropped
        found.append(step.stats["semantic"].get("of_earlier_runs", 0))
        manifest = json.loads((idx / "_index.json").read_text())
        models.append(manifest["model"]["gen"])
        assert [g["model"] for g in manifest["generations"]][-1] == models[-1]
    assert models == [1, 1, 3, 3] and found == [0, 2, 2, 3]
    assert sorted(p.name for p in idx.iterdir()) == [
        "_index.json",
        *[f"gen-00000{g}.arrow" for g in range(1, 5)],
        "model-000003.npz",  # the first model's file went with its replacement
    ]
    with np.load(idx / "model-000003.npz") as model:  # gens 1-2 clustered by the new model
        assert model["gens"].tolist() == [1] * 100 + [2] * 60 and int(model["rows"]) == 222


def test_semantic_fresh_pairs_are_the_pairs_within_a_cluster_above_the_threshold():
    """Against brute force over every pair with a new row in it, including a cluster of 900
    identical rows (whose dense blocks are reduced to spanning forests: same components).
    Rows are float16 values, as an index stores them, and the threshold is one no pair is
    within 2e-5 of, so float32 and float64 agree on every pair."""
    from mmtools.steps.dedup.groups import components
    from mmtools.steps.dedup.semantic import StoredRows, fresh_pairs, unit_rows

    rng = np.random.default_rng(8)
    raw = rng.standard_normal((1500, 16)).astype(np.float16).astype(np.float64)
    raw[600:] = raw[600]  # one dense family, part new and part old
    x = unit_rows(raw)[0]
    clusters = np.r_[rng.integers(0, 5, 600), np.full(900, 7)]
    is_new = rng.random(1500) < 0.4
    new, old = np.flatnonzero(is_new), np.flatnonzero(~is_new)
    old = old[np.argsort(clusters[old], kind="stable")]
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    both = np.triu(np.ones((1500, 1500), bool), 1) & (is_new[:, None] | is_new[None, :])
    both &= clusters[:, None] == clusters[None, :]
    grid = np.linspace(0.55, 0.65, 1001)
    margin = [np.abs(sim[both] - t).min() for t in grid]
    threshold = grid[int(np.argmax(margin))]
    assert max(margin) > 2e-5
    stored = StoredRows([raw[old[:300]].astype(np.float16), raw[old[300:]].astype(np.float16)], 16)
    got_i, got_j = fresh_pairs(
        x[new],
        clusters[new],
        lambda b0, b1: stored.unit(np.arange(b0, b1)),
        clusters[old],
        threshold,
    )
    nodes = np.r_[new, old]  # fresh_pairs numbers new rows first, then old rows
    want_i, want_j = np.nonzero(both & (sim > threshold))
    got = components(1500, nodes[got_i], nodes[got_j])
    want = components(1500, want_i, want_j)
    assert len(want_i) > 100_000 and len(got_i) < len(want_i) / 10  # reduced, not listed
    # The same partition of the rows: equal labels together, unequal labels apart.
    assert (got[:, None] == got[None, :]).tolist() == (want[:, None] == want[None, :]).tolist()


def test_stored_rows_read_any_rows_in_any_order_as_unit_vectors():
    from mmtools.steps.dedup.semantic import StoredRows

    rng = np.random.default_rng(2)
    raw = rng.standard_normal((50, 8)).astype(np.float16)
    stored = StoredRows([raw[:7], raw[7:30], raw[30:]], 8)
    rows = np.array([49, 0, 7, 6, 30, 29, 12, 12])
    want = raw[rows].astype(np.float64)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert len(stored) == 50
    np.testing.assert_allclose(stored.unit(rows), want, atol=1e-6)
    np.testing.assert_allclose(
        stored.unit(np.sort(rows)), want[np.argsort(rows, kind="stable")], atol=1e-6
    )


def test_quantised_index_rows_keep_cosines_within_their_bound():
    """An index stores unit rows as int8 values and a scale: read back, each is a unit row
    again and its cosine with any row moves by less than 2.5e-3 at 256 dimensions (the
    bound `quantised` states); rows with one large value come back exactly."""
    from mmtools.steps.dedup.semantic import StoredRows, quantised, unit_rows

    rng = np.random.default_rng(4)
    x = unit_rows(rng.standard_normal((600, 256)))[0]
    x[0] = 0.0
    x[0, 5] = -1.0  # one value: exact in int8
    q, scale = quantised(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    assert (np.abs(q).max(axis=1) == 127).all()
    stored = StoredRows([q[:250], q[250:]], 256, [scale[:250], scale[250:]])
    rows = rng.permutation(600)
    back = stored.unit(rows)
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1.0, atol=1e-6)
    assert back[np.flatnonzero(rows == 0)[0]].tolist() == x[0].tolist()
    exact = x[rows].astype(np.float64) @ x.T.astype(np.float64)
    moved = np.abs(back.astype(np.float64) @ x.T.astype(np.float64) - exact)
    assert moved.max() < 2.5e-3 and moved.std() < 4e-4


def test_semantic_index_keeps_int8_rows_and_still_reads_float_generations(tmp_path):
    """Runs and rebuilds store each kept row's unit embedding quantised, not the embedding
    column; an index written before that holds the embeddings as they were. Copies of rows
    of both kinds of generation, in one index, are found."""
    from mmtools.steps.dedup.semantic import INDEX_SCALE, INDEX_UNIT

    rng = np.random.default_rng(6)
    base = rng.standard_normal((120, 64))

    def day(n: int, rows: np.ndarray, ids: list[str]) -> Path:
        emb = pa.FixedSizeListArray.from_arrays(pa.array(rows.astype(np.float16).ravel()), 64)
        pq.write_table(pa.table({C.ID: ids, C.IMAGE_EMBEDDING: emb}), tmp_path / f"{n}.parquet")
        return tmp_path / f"{n}.parquet"

    def nudged(k: np.ndarray) -> np.ndarray:
        return base[k] + 0.05 * rng.standard_normal((len(k), 64))

    idx = tmp_path / "idx"
    config = DedupConfig(methods=("semantic",), index=str(idx), clusters=2)
    dedup([day(1, base[:40], [f"a{k}" for k in range(40)])], tmp_path / "o1", config)
    for gen in idx.glob("gen-*.arrow"):
        gen.unlink()
    mmtools("dedup-index", idx, "--rebuild-from", tmp_path / "o1")
    (gen,) = idx.glob("gen-*.arrow")
    stored = pa.ipc.open_file(gen.read_bytes()).read_all()
    assert stored.schema.field(INDEX_UNIT).type == pa.list_(pa.int8(), 64)
    assert stored.schema.field(INDEX_SCALE).type == pa.float32()
    assert C.IMAGE_EMBEDDING not in stored.schema.names
    # The generation as an index written before quantisation held it: float16 embeddings.
    day1 = read_dataset(tmp_path / "o1")
    assert stored[C.ID].to_pylist() == day1[C.ID].to_pylist()
    old = stored.drop_columns([INDEX_UNIT, INDEX_SCALE]).append_column(
        C.IMAGE_EMBEDDING, day1[C.IMAGE_EMBEDDING]
    )
    with pa.OSFile(str(gen), "wb") as sink, pa.ipc.new_file(sink, old.schema) as writer:
        writer.write_table(old)
    # Day 2: 40 new rows and copies of 20 of day 1's (in the float16 generation).
    out2, step2 = dedup(
        [day(2, np.r_[base[40:80], nudged(np.arange(20))], [f"b{k}" for k in range(60)])],
        tmp_path / "o2",
        config,
    )
    assert out2[C.ID].to_pylist() == [f"b{k}" for k in range(40)]
    assert step2.stats["semantic"]["of_earlier_runs"] == 20
    # Day 3: copies from both generations (raw floats and int8), and 40 new rows.
    copies = np.r_[np.arange(20, 40), np.arange(40, 60)]
    out3, step3 = dedup(
        [day(3, np.r_[nudged(copies), base[80:]], [f"c{k}" for k in range(80)])],
        tmp_path / "o3",
        config,
    )
    assert out3[C.ID].to_pylist() == [f"c{k}" for k in range(40, 80)]
    assert step3.stats["semantic"]["of_earlier_runs"] == 40


def test_a_rebuilt_minhash_index_finds_reworded_captions_of_the_datasets_it_was_built_from(
    tmp_path,
):
    """A rebuild keeps the LSH band codes a run would: the next run finds its reworded copies."""
    from mmtools.steps.dedup.minhash import BANDS, KEY

    words = [f"w{k}" for k in range(400)]
    rng = np.random.default_rng(9)
    captions = [" ".join(rng.choice(words, 12)) for _ in range(30)]
    pq.write_table(
        pa.table({C.ID: [f"a{k}" for k in range(30)], C.TEXT: captions}), tmp_path / "1.parquet"
    )
    reworded = [c.rsplit(" ", 1)[0] + " changed" for c in captions[:10]]
    fresh = [" ".join(rng.choice(words, 12)) for _ in range(5)]
    pq.write_table(
        pa.table({C.ID: [f"b{k}" for k in range(15)], C.TEXT: reworded + fresh}),
        tmp_path / "2.parquet",
    )
    idx = tmp_path / "idx"
    config = DedupConfig(methods=("minhash",), index=str(idx))
    dedup([tmp_path / "1.parquet"], tmp_path / "o1", config)
    (gen,) = idx.glob("gen-*.arrow")
    made = pa.ipc.open_file(gen.read_bytes()).read_all()
    gen.unlink()
    mmtools("dedup-index", idx, "--rebuild-from", tmp_path / "o1")
    (gen,) = idx.glob("gen-*.arrow")
    rebuilt = pa.ipc.open_file(gen.read_bytes()).read_all()
    assert rebuilt.select([C.ID, KEY, BANDS]).equals(made.select([C.ID, KEY, BANDS]))
    out, step = dedup([tmp_path / "2.parquet"], tmp_path / "o2", config)
    assert out[C.ID].to_pylist() == [f"b{k}" for k in range(10, 15)]
    assert step.stats["minhash"]["of_earlier_runs"] == 10


def test_index_rows_win_over_the_runs_own_whatever_keep_says(tmp_path):
    """Day 2 holds a copy of a day-1 row with a higher score: `--keep highest:clip_score`
    would keep it within one run, but a row an earlier run kept always stays the kept one;
    the summary line counts it as a duplicate of earlier runs."""
    pq.write_table(
        pa.table({C.ID: ["a", "b"], C.TEXT: ["red circle", "blue star"], "clip_score": [0.1, 0.5]}),
        tmp_path / "1.parquet",
    )
    pq.write_table(
        pa.table({C.ID: ["a2", "c"], C.TEXT: ["red circle", "green"], "clip_score": [0.9, 0.2]}),
        tmp_path / "2.parquet",
    )
    idx = tmp_path / "idx"
    keep = ("--keep", "highest:clip_score", "--index", idx)
    mmtools("dedup", tmp_path / "1.parquet", *keep, "-o", tmp_path / "o1")
    day2 = mmtools("dedup", tmp_path / "2.parquet", *keep, "-o", tmp_path / "o2")
    assert read_dataset(tmp_path / "o2")[C.ID].to_pylist() == ["c"]
    ledger = read_dropped(str(tmp_path / "o2"))
    assert ledger.select([C.ID, "kept_id"]).to_pylist() == [{C.ID: "a2", "kept_id": "a"}]
    assert index_ids(idx) == ["a", "b", "c"]
    assert day2.stderr.decode().splitlines()[-1] == (
        "mmtools dedup: clusters: exact 1 (1 duplicate rows, 1 of earlier runs)"
    )
    # One run over both days keeps the higher score instead.
    both = [tmp_path / "1.parquet", tmp_path / "2.parquet"]
    once, _ = dedup(both, tmp_path / "once", DedupConfig(keep="highest:clip_score"))
    assert sorted(once[C.ID].to_pylist()) == ["a2", "b", "c"]


def test_groups_are_not_transitive_across_runs(tmp_path):
    """B and C are each near A (cosine 0.97) but not near each other (0.88). Seen on days 1
    and 2, before A, both are kept, and A on day 3 is a duplicate of the first; one run over
    the three days keeps B alone (A links B and C into one group), as README says."""
    angles = {"B": 14.0, "C": -14.0, "A": 0.0}

    def row(name: str) -> Path:
        t = np.deg2rad(angles[name])
        x = np.array([[np.cos(t), np.sin(t), 0.0, 0.0]])
        return embedding_file(tmp_path / f"{name}.parquet", [name], x)

    files = [row("B"), row("C"), row("A")]
    idx = tmp_path / "idx"
    config = DedupConfig(methods=("semantic",), index=str(idx), clusters=1, mark=True)
    marks = []
    for f in files:
        out, _ = dedup([f], tmp_path / f"o-{f.stem}", config)
        marks += list(zip(out[C.ID].to_pylist(), out[C.DUP_KEPT_ID].to_pylist(), strict=True))
    assert marks == [("B", None), ("C", None), ("A", "B")]
    assert index_ids(idx) == ["B", "C"]
    once, _ = dedup(files, tmp_path / "once", DedupConfig(methods=("semantic",), clusters=1))
    assert once[C.ID].to_pylist() == ["B"]


def test_an_exact_key_is_kept_in_the_index_as_eight_bytes_of_blake2b_and_a_null_as_zero():
    """The digests a dedup index stores: equal keys agree, text and bytes alike, null is 0."""
    import hashlib

    from mmtools.steps.dedup.exact import digests

    def blake(b: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")

    got = digests(pa.array(["a", None, "a", "é"]))
    assert got.dtype == np.uint64
    assert got.tolist() == [blake(b"a"), 0, blake(b"a"), blake("é".encode())]
    assert digests(pa.array([b"\x00a", None], pa.binary())).tolist() == [blake(b"\x00a"), 0]


def test_exact_labels_against_index_digests_join_run_groups_and_never_each_other():
    """In process: a run row groups with the index rows whose digest its key has; a key
    alone (in the run and the index) and a null key are in no group."""
    from mmtools.steps.dedup.exact import DIGEST, KEY, Exact, digests

    def exact(run: list, stored: np.ndarray) -> Exact:
        step = Exact("text")
        step.bind(pa.schema([(C.TEXT, pa.string())]))
        step.scan(pa.record_batch({KEY: pa.array(run, pa.string())}), 0)
        step.scan(pa.record_batch({DIGEST: pa.array(stored, pa.uint64())}), len(run))
        step.index_from = len(run)
        return step

    d = digests(pa.array(["b", "z", "c"])).tolist()
    step = exact(["d", None, "b", "c", "a", "a"], np.array(d, np.uint64))
    assert step.labels(np.arange(9)).tolist() == [-1, -1, 1, 2, 3, 3, 1, -1, 2]
    assert step.labels(np.array([1, 6, 7, 8])).tolist() == [-1, -1, -1, -1]
    top = np.iinfo(np.uint64).max  # past every digest: the search lands after the last key
    step = exact(["b"], np.array([top, d[0]], np.uint64))
    assert step.labels(np.arange(3)).tolist() == [0, -1, 0]


def test_minhash_against_an_index_marks_captions_at_the_threshold_and_keeps_the_rest(tmp_path):
    """Word shingles, threshold 0.6: `a b c e` is 3/5 like the index's `a b c d`, a duplicate;
    `m n o q r s` is 3/7 like `m n o p`, not one; a null caption and lone captions stay
    unclustered; a copy within the run names the run's own row."""
    pq.write_table(
        pa.table({C.ID: ["a", "b"], C.TEXT: ["a b c d", "x y z w"]}), tmp_path / "1.parquet"
    )
    texts = ["a b c e", None, "m n o p", "x y z w", "m n o q r s", "m n o p"]
    pq.write_table(pa.table({C.ID: list("cdefgh"), C.TEXT: texts}), tmp_path / "2.parquet")
    config = {"methods": ("minhash",), "shingle": 1, "index": str(tmp_path / "idx")}
    dedup([tmp_path / "1.parquet"], tmp_path / "o1", DedupConfig(**config))
    out, step = dedup([tmp_path / "2.parquet"], tmp_path / "o2", DedupConfig(**config, mark=True))
    marks = out.select([C.ID, C.IS_DUPLICATE, C.DUP_KEPT_ID]).to_pylist()
    assert [tuple(m.values()) for m in marks] == [
        ("c", True, "a"),
        ("d", False, None),
        ("e", False, None),
        ("f", True, "b"),
        ("g", False, None),
        ("h", True, "e"),
    ]
    c, d, e, f, g, h = out[C.DUP_CLUSTER].to_pylist()
    assert d is None and g is None and e == h and len({c, e, f} - {None}) == 3
    assert step.stats["minhash"] == {"clusters": 3, "duplicates": 3, "of_earlier_runs": 2}
    assert index_ids(tmp_path / "idx") == ["a", "b", "d", "e", "g"]


def test_a_generation_records_its_output_and_run_and_a_rerun_there_replaces_it(tmp_path):
    """In-process: the pending record names the output and the run's fingerprint (what a
    repair checks against the output's manifest); a rerun into that output does not match
    its own earlier rows and takes the generation's place."""
    from mmtools.io.manifest import fingerprint_digest

    pq.write_table(pa.table({C.ID: ["a", "b"], C.TEXT: ["x y", "z"]}), tmp_path / "1.parquet")
    idx, out = tmp_path / "idx", tmp_path / "o"
    for gen in (1, 2):
        step = Dedup(DedupConfig(index=str(idx)))
        source, sink = Source([str(tmp_path / "1.parquet")]), DatasetSink(str(out), overwrite=True)
        engines.run("dedup", source, [step], sink, quiet=True)
        assert read_dataset(out)[C.ID].to_pylist() == ["a", "b"]
        manifest = json.loads((idx / "_index.json").read_text())
        run = json.loads((out / "_manifest.json").read_text())["fingerprint"]
        [record] = manifest["generations"]
        assert (record["gen"], record["output"]) == (gen, str(out))
        assert record["fingerprint"] == fingerprint_digest(run)
    assert index_ids(idx) == ["a", "b"]


@pytest.mark.parametrize("keep", ["highest:clip_score", "lowest:id"])
def test_an_index_keeps_ids_and_keys_only_whatever_column_keep_ranks_by(keep, tmp_path):
    """The column `--keep` reads decides within a run; the index stores each kept row's id
    and key, not that column, and never loses the ids when `--keep` ranks by id itself."""
    table = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "text": ["one caption", "one caption", "another", "a third"],
            "clip_score": pa.array([0.1, 0.9, 0.5, 0.4], pa.float32()),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    config = DedupConfig(
        methods=("exact",), exact_key="text", keep=keep, index=str(tmp_path / "ix")
    )
    kept, _ = dedup([tmp_path / "in.parquet"], tmp_path / "out", config)
    winner = "b" if keep.startswith("highest") else "a"
    assert sorted(kept["id"].to_pylist()) == sorted([winner, "c", "d"])
    stored = key_rows(str(tmp_path / "ix"))
    assert sorted(stored[C.ID].to_pylist()) == sorted([winner, "c", "d"])
    assert "clip_score" not in stored.column_names
