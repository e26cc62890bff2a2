"""`mmtools dedup`: exact keys, the keep rule, --mark, determinism, pipes, resume and errors."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import image_bytes, make_image_folder, mmtools, read_dataset, write_shards
from hypothesis import given, settings
from hypothesis import strategies as st

from mmtools import columns as C
from mmtools.errors import DataContractError, Interrupted
from mmtools.step import Result, Step

# -- helpers shared by the test_dedup*.py files ----------------------------------------------


def write_dataset(path: Path, table: pa.Table, shards: int = 1, row_group: int = 7) -> Path:
    """`table` as `shards` Parquet files in row groups of `row_group` rows: reads cross them."""
    return write_shards(path, table, shards, row_group)


def read_stream(data: bytes) -> pa.Table:
    """The data rows of an mmtools Arrow stream (reject side-records skipped)."""
    from mmtools.io.stream import read_stream as parse

    schema, batches, _ = parse(io.BytesIO(data), lambda r: None, lambda t: None)
    return pa.Table.from_batches(list(batches), schema)


def run_dedup(src: Path, out: Path, config, batch_size: int = 1024) -> pa.Table:
    """Run the dedup step in this process (engine, Parquet source and sink); return the rows."""
    from mmtools import engines as engine
    from mmtools.io.dataset import DatasetSink
    from mmtools.io.source import Source
    from mmtools.steps.dedup.step import Dedup

    sink = DatasetSink(str(out))
    engine.run(
        "dedup", Source([str(src)]), [Dedup(config)], sink, batch_size=batch_size, quiet=True
    )
    return read_dataset(out)


def assert_ray_buckets_give_local_groups(make_method, keys: pa.Table, min_groups: int) -> None:
    """What the Ray path computes (`bucket_rows` over uneven batches, Ray's groupby on the
    bucket, `bucket_edges` per bucket), done here without Ray, gives the local engine's groups."""
    import pyarrow.compute as pc

    from mmtools.step import POSITION
    from mmtools.steps.dedup.groups import BUCKET, keep_best, position_components

    n, buckets = keys.num_rows, 3
    keys = keys.append_column(POSITION, pa.array(np.arange(n), pa.int64()))
    cuts = [0, 1, n // 3, n // 3 + 1, n]  # uneven batches, one of a single row
    local, ray = make_method(), make_method()
    local.scan(keys.to_batches()[0], 0)
    rows = pa.concat_tables(
        [ray.bucket_rows(keys.slice(a, b - a), buckets) for a, b in itertools.pairwise(cuts)]
    )
    found = [ray.bucket_edges(rows.filter(pc.equal(rows[BUCKET], k))) for k in range(buckets)]
    i, j = (np.concatenate([f[k] for f in found]).astype(np.int64) for k in (0, 1))
    ray.set_groups(n, *position_components(i, j))
    active = np.array([p for p in range(n) if p not in local.failures])  # as Dedup does
    a, b = keep_best(local.labels(active), active), keep_best(ray.labels(active), active)
    assert a.groups == b.groups >= min_groups
    assert (a.drop == b.drop).all() and set(a.members) == set(b.members)
    assert (a.keepers[np.argsort(a.members)] == b.keepers[np.argsort(b.members)]).all()


def group_pairs(groups) -> set[tuple[str, str]]:
    """All unordered id pairs within each group."""
    return {tuple(sorted(p)) for g in groups for p in itertools.combinations(g, 2)}


def found_groups(marked: pa.Table) -> list[list[str]]:
    """The dup_cluster groups of a --mark output."""
    out: dict[int, list[str]] = {}
    for i, c in zip(marked[C.ID].to_pylist(), marked[C.DUP_CLUSTER].to_pylist(), strict=True):
        if c is not None:
            out.setdefault(c, []).append(i)
    return list(out.values())


def precision_recall(found: set, true: set) -> tuple[float, float]:
    """Pair precision and recall."""
    hit = len(found & true)
    return hit / max(1, len(found)), hit / max(1, len(true))


def text_table(texts: list[str | None], scores=None, ids=None) -> pa.Table:
    """A table of ids, captions and an optional score column."""
    cols = {C.ID: ids or [f"r{i:04d}" for i in range(len(texts))], C.TEXT: texts}
    if scores is not None:
        cols[C.CLIP_SCORE] = pa.array(scores, pa.float32())
    return pa.table(cols)


# -- exact ------------------------------------------------------------------------------------


@pytest.fixture
def copies_folder(tmp_path) -> Path:
    """12 JPEGs, two of which also appear as byte-identical copies under other names."""
    root = make_image_folder(tmp_path / "imgs", 12)
    (root / "zz_copy_a.jpg").write_bytes(image_bytes(1))
    (root / "zz_copy_b.jpg").write_bytes(image_bytes(1))
    (root / "zz_copy_c.jpg").write_bytes(image_bytes(4))
    return root


def test_exact_drops_byte_copies_through_a_pipe(copies_folder):
    ingested = mmtools("ingest", copies_folder, "-q").stdout
    proc = mmtools("dedup", "--method", "exact", input=ingested)
    out = read_stream(proc.stdout)
    ids = out[C.ID].to_pylist()
    assert len(ids) == 12 and len(set(out[C.IMAGE_SHA256].to_pylist())) == 12
    assert "img00001.jpg" in ids and "zz_copy_a.jpg" not in ids  # the first one is kept
    err = proc.stderr.decode()
    assert "15 in, 12 out" in err and "3 dropped (exact 3)" in err
    assert "clusters: exact 2 (3 duplicate rows)" in err


def test_exact_caption_key_is_normalised(tmp_path):
    texts = [
        "A dog on a bench.",
        "a dog  on a BENCH",
        "a dog on a bench!",
        "a cat on a bench",
        None,
        None,
        "",
        "  ",
        "Ünïcode café",
        "ünïcode CAFÉ",
    ]
    ds = write_dataset(tmp_path / "ds", text_table(texts))
    proc = mmtools("dedup", ds, "-o", tmp_path / "out", "--exact-key", "text", "--json")
    summary = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    assert summary["rows_in"] == 10 and summary["dropped"] == {"exact": 3}
    kept = read_dataset(tmp_path / "out")[C.ID].to_pylist()
    # Rows without a caption are never caption duplicates of each other.
    assert kept == ["r0000", "r0003", "r0004", "r0005", "r0006", "r0007", "r0008"]


def test_exact_key_image_plus_text(tmp_path, copies_folder):
    (copies_folder / "zz_copy_a.txt").write_text("another caption")
    (copies_folder / "zz_copy_d.jpg").write_bytes(image_bytes(2))
    (copies_folder / "zz_copy_d.txt").write_text("A photo, number 2.")
    ds = tmp_path / "ds"
    mmtools("ingest", copies_folder, "-o", ds, "-q")
    mmtools("dedup", ds, "-o", tmp_path / "out", "--exact-key", "image+text", "-q")
    kept = read_dataset(tmp_path / "out")[C.ID].to_pylist()
    # copy_a has its own caption; copy_b and copy_c have none (no key): all three stay.
    assert len(kept) == 15 and "zz_copy_d.jpg" not in kept


def test_keep_rule_highest_lowest_and_ties_by_id(tmp_path):
    from mmtools.steps.dedup.step import DedupConfig

    texts = ["same caption"] * 4 + ["other caption"] * 3
    scores = [0.2, 0.9, 0.9, None, float("nan"), 0.1, 0.5]
    ids = ["d", "c", "b", "a", "g", "f", "e"]
    ds = write_dataset(tmp_path / "ds", text_table(texts, scores, ids), shards=2)
    mmtools("dedup", ds, "-o", tmp_path / "cli", "--keep", "highest:clip_score", "-q")
    # Ties on the score go to the smaller id; NaN and null scores rank last.
    assert read_dataset(tmp_path / "cli")[C.ID].to_pylist() == ["b", "e"]
    for keep, expected in {"first": ["d", "g"], "lowest:clip_score": ["d", "f"]}.items():
        out = run_dedup(
            ds, tmp_path / keep, DedupConfig(methods=("exact",), keep=keep, exact_key="text")
        )
        assert out[C.ID].to_pylist() == expected, keep


def test_pass_one_reads_keys_never_media():
    from mmtools.steps.dedup.step import Dedup, DedupConfig

    schema = pa.schema(
        [
            (C.ID, pa.string()),
            (C.IMAGE, C.MEDIA_TYPE),
            (C.IMAGE_SHA256, pa.string()),
            (C.TEXT, pa.string()),
            (C.CLIP_SCORE, pa.float32()),
            (C.IMAGE_EMBEDDING, C.embedding_type(8)),
        ]
    )
    expected = {
        ("exact",): {C.ID, C.IMAGE_SHA256},
        ("minhash",): {C.ID, C.TEXT},
        ("semantic",): {C.ID, C.IMAGE_EMBEDDING},
        ("phash",): {C.ID, C.IMAGE},  # hashed batch by batch; only 64 bits a row are kept
    }
    for methods, columns in expected.items():
        step = Dedup(DedupConfig(methods=methods, keep="highest:clip_score"))
        assert step.output_schema(schema) == schema
        assert set(step.scan_columns) == columns | {C.CLIP_SCORE}


# -- --mark, determinism, pipes ---------------------------------------------------------------


def mixed_table(n_groups: int = 25, seed: int = 0) -> pa.Table:
    """Captions in near-duplicate groups, with exact copies and a score, in shuffled order."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(400)]
    texts, scores = [], []
    for _ in range(n_groups):
        base = list(rng.choice(words, 16, replace=False))
        variants = [base, base, base[:7] + base[8:], [*base, "extra"]]
        for v in variants[: rng.integers(1, 5)]:
            texts.append(" ".join(v))
            scores.append(float(rng.random()))
    order = rng.permutation(len(texts))
    return text_table([texts[i] for i in order], [scores[i] for i in order])


def test_mark_equals_the_dropped_set_and_one_kept_per_cluster(tmp_path):
    from mmtools.steps.dedup.step import DedupConfig

    ds = write_dataset(tmp_path / "ds", mixed_table(), shards=3)
    args = ["-m", "exact", "-m", "minhash", "--exact-key", "text", "--keep", "highest:clip_score"]
    mmtools("dedup", ds, "-o", tmp_path / "mark", *args, "--mark", "-q")
    config = DedupConfig(methods=("exact", "minhash"), keep="highest:clip_score", exact_key="text")
    kept = run_dedup(ds, tmp_path / "drop", config)
    full = read_dataset(tmp_path / "mark")
    assert full.num_rows == read_dataset(ds).num_rows
    dup = {
        i
        for i, d in zip(full[C.ID].to_pylist(), full[C.IS_DUPLICATE].to_pylist(), strict=True)
        if d
    }
    assert dup and dup == set(full[C.ID].to_pylist()) - set(kept[C.ID].to_pylist())
    is_dup = dict(zip(full[C.ID].to_pylist(), full[C.IS_DUPLICATE].to_pylist(), strict=True))
    for group in found_groups(full):
        assert len(group) > 1 and sum(not is_dup[i] for i in group) == 1
    assert all(
        not is_dup[i]
        for i, c in zip(full[C.ID].to_pylist(), full[C.DUP_CLUSTER].to_pylist(), strict=True)
        if c is None
    )
    manifest = json.loads((tmp_path / "mark" / "_manifest.json").read_text())
    assert "minhash" in json.dumps(manifest)


def test_same_output_across_runs_shard_layouts_and_batch_sizes(tmp_path):
    from mmtools.steps.dedup.step import DedupConfig

    table = mixed_table(seed=1)
    one = write_dataset(tmp_path / "one", table, shards=1)
    many = write_dataset(tmp_path / "many", table, shards=7)
    mmtools("dedup", one, "-o", tmp_path / "cli", "-m", "exact,minhash", "--mark", "-q")
    outs = [read_dataset(tmp_path / "cli").select([C.ID, C.DUP_CLUSTER, C.IS_DUPLICATE])]
    config = DedupConfig(methods=("exact", "minhash"), exact_key="text", mark=True)
    for k, (src, batch) in enumerate([(many, 5), (one, 3), (many, 1024), (one, 1024)]):
        out = run_dedup(src, tmp_path / f"out{k}", config, batch_size=batch)
        outs.append(out.select([C.ID, C.DUP_CLUSTER, C.IS_DUPLICATE]))
    assert 0 < sum(outs[0][C.IS_DUPLICATE].to_pylist()) < table.num_rows
    assert all(o.equals(outs[0]) for o in outs[1:])


def test_methods_in_one_run_equal_a_pipe_of_runs(tmp_path):
    ds = write_dataset(tmp_path / "ds", mixed_table(seed=2), shards=2)
    keep = ["--keep", "lowest:clip_score"]
    combined = mmtools("dedup", ds, "-m", "exact", "-m", "minhash", "--exact-key", "text", *keep)
    first = mmtools("dedup", ds, "-m", "exact", "--exact-key", "text", *keep).stdout
    chained = mmtools("dedup", "-", "-m", "minhash", *keep, input=first)
    a, b = read_stream(combined.stdout), read_stream(chained.stdout)
    assert a.num_rows < read_dataset(ds).num_rows
    assert a[C.ID].to_pylist() == b[C.ID].to_pylist()


# -- resume -----------------------------------------------------------------------------------


class _Stop(Step):
    """A step that stops the run after a few batches, like a kill in the middle."""

    name = "stop"

    def __init__(self, after: int):
        super().__init__(None)
        self.after = after

    def run(self, batches):
        for k, batch in enumerate(batches):
            if k == self.after:
                raise Interrupted(15)
            yield Result(batch)


@pytest.mark.parametrize("row_group", [1000, 7])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, row_group):
    from mmtools import engines as engine
    from mmtools.io.dataset import DatasetSink
    from mmtools.io.source import Source
    from mmtools.steps.dedup.step import Dedup, DedupConfig

    ds = write_dataset(tmp_path / "ds", mixed_table(seed=3), shards=3, row_group=row_group)
    config = DedupConfig(methods=("exact", "minhash"), keep="highest:clip_score", exact_key="text")
    out = tmp_path / "out"
    sink = DatasetSink(str(out), shard_rows=4)
    with pytest.raises(Interrupted):
        engine.run(
            "dedup", Source([str(ds)]), [Dedup(config), _Stop(8)], sink, batch_size=4, quiet=True
        )
    assert not (out / "_manifest.json").exists() and list(out.glob("part-*.parquet"))
    args = ["-m", "exact,minhash", "--keep", "highest:clip_score", "--exact-key", "text"]
    proc = mmtools("dedup", ds, "-o", out, "--shard-rows", 4, "--batch-size", 4, *args)
    assert "resumed after" in proc.stderr.decode()
    whole = run_dedup(ds, tmp_path / "whole", config)
    assert read_dataset(out)[C.ID].to_pylist() == whole[C.ID].to_pylist()


def test_pass_two_finds_its_place_with_repeated_ids():
    from mmtools.steps.dedup.step import Dedup, DedupConfig

    texts = ["a b c d", "x y z", "a b c d", "p q r", "x y z", "p q r", "a b c d", "s t"]
    table = text_table(texts, ids=["1", "2", "1", "3", "2", "4", "5", "6"])
    batch = table.to_batches()[0]

    def scanned() -> Dedup:
        step = Dedup(DedupConfig(methods=("exact",), exact_key="text"))
        step.output_schema(table.schema)
        step.scan(step.keys(batch))
        step.finish_scan()
        return step

    whole = scanned().process(batch).batch
    assert whole[C.TEXT].to_pylist() == ["a b c d", "x y z", "p q r", "s t"]
    # A resumed pass 2 starting at row 2, whose first id also appears at row 0.
    assert scanned().process(batch.slice(2)).batch[C.ID].to_pylist() == ["3", "6"]
    step = scanned()
    step.seek(2)  # what the Ray engine tells each worker
    assert step.process(batch.slice(2)).batch[C.ID].to_pylist() == ["3", "6"]
    step.seek(1)
    with pytest.raises(DataContractError, match="input changed between dedup's two passes"):
        step.process(batch.slice(2))


# -- properties -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", "A!", "a b", "a b c d", "a b c e", None]), max_size=30),
    st.integers(1, 7),
    st.sampled_from([("exact",), ("minhash",), ("exact", "minhash")]),
)
def test_dedup_is_idempotent_and_accounts_for_every_row(texts, batch_size, methods):
    from mmtools.steps.dedup.step import Dedup, DedupConfig

    table = text_table(texts)

    def run(t: pa.Table) -> pa.Table:
        step = Dedup(DedupConfig(methods=methods, exact_key="text", threshold=0.5))
        step.output_schema(t.schema)
        batches = t.to_batches(max_chunksize=batch_size)
        for b in batches:
            step.scan(step.keys(b))
        step.finish_scan()
        outs = []
        for b in batches:
            res = step.process(b)
            res.check(b.num_rows, "dedup")
            outs.append(res.batch)
        return pa.Table.from_batches(outs, t.schema)

    once = run(table)
    assert set(once[C.ID].to_pylist()) <= set(table[C.ID].to_pylist())
    keys = [
        " ".join("".join(ch for ch in t.lower() if ch.isalnum() or ch == " ").split())
        for t in once[C.TEXT].to_pylist()
        if t
    ]
    assert len(keys) == len(set(keys))
    assert run(once).equals(once)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-m", "fuzzy"], 2, "--method must be one of exact, phash, minhash, semantic"),
        (["--keep", "best"], 2, "--keep must be 'first', 'highest:COLUMN' or 'lowest:COLUMN'"),
        (["--keep", "highest:nope"], 2, "--keep: unknown column nope; the input has id, text"),
        (["-m", "phash"], 3, "dedup --method phash needs column(s) image"),
        (["-m", "semantic"], 3, "needs column(s) image_embedding"),
        (["-m", "semantic", "--column", "text"], 3, "not an embedding"),
        (["-m", "semantic", "--column", "nope"], 2, "--column: unknown column nope"),
        (["--exact-key", "pixels"], 2, "--exact-key takes image, audio, text"),
    ],
)
def test_bad_options_give_one_clear_line(tmp_path, args, code, message):
    ds = write_dataset(tmp_path / "ds", text_table(["a", "b"]))
    proc = mmtools("dedup", ds, "-o", tmp_path / "out", *args, check=False)
    err = proc.stderr.decode().strip()
    assert proc.returncode == code, err
    assert (
        err.startswith("mmtools dedup: error: ") and message in err and len(err.splitlines()) == 1
    )
    assert "Traceback" not in err


def test_help_opens_with_an_example():
    out = mmtools("dedup", "--help").stdout.decode()
    assert "Example: mmtools dedup" in out and "--max-distance" in out and "--eps" in out
