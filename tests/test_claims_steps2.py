"""What README promises about steps and tools: media cells through embed and score, LAION's
B/16 linear head, train-head's folds and the transform its head applies, dedup of audio
(semantic and exact), pHash on photographs, index --kmeans and the rows an index skips, and
the drop ledger's null values."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    image_bytes,
    mmtools,
    read_dataset,
    read_rejects,
    tiny_clip,
    wav_bytes,
    write_shards,
)
from test_dedup import found_groups, run_dedup, write_dataset
from test_dedup_semantic import planted
from test_index import SHAPES, clustered, write_embeddings

from mmtools import columns as C
from mmtools import engines
from mmtools.io.dataset import DatasetSink, read_dropped
from mmtools.io.source import Source

sys.path.insert(0, str(Path(__file__).parent / "bench"))
import bench_phash_curve as curve

# -- media cells -------------------------------------------------------------------------------


def test_embed_and_score_keep_media_cells_as_they_found_them(tmp_path):
    """`score` of an input without embeddings runs embed's step then its own: path-only,
    bytes-only and bytes-with-path cells come out of both unchanged."""
    from mmtools.steps.embed import ClipEmbed, EmbedConfig
    from mmtools.steps.score.step import Score, score_steps

    (tmp_path / "p.jpg").write_bytes(image_bytes(0))
    cells = {
        "path": (None, str(tmp_path / "p.jpg")),
        "bytes": (image_bytes(1), None),
        "both": (image_bytes(2), str(tmp_path / "gone.jpg")),  # the bytes are what is read
    }
    media = C.media_array([b for b, _ in cells.values()], [p for _, p in cells.values()])
    table = pa.table({C.ID: list(cells), C.TEXT: ["a", "b", "c"], C.IMAGE: media})
    pq.write_table(table, tmp_path / "in.parquet")
    source = Source([str(tmp_path / "in.parquet")])
    clip = tiny_clip(tmp_path, layers=1)
    config = EmbedConfig(model=str(clip), pretrained="none", device="cpu", workers=1)
    steps = score_steps(source.schema, None, config)
    assert [type(s) for s in steps] == [ClipEmbed, Score]
    engines.run("score", source, steps, DatasetSink(str(tmp_path / "out")), quiet=True)
    assert read_rejects(tmp_path / "out") is None
    out = read_dataset(tmp_path / "out")
    found = {r[C.ID]: (r[C.IMAGE]["bytes"], r[C.IMAGE]["path"]) for r in out.to_pylist()}
    assert found == cells
    assert out[C.CLIP_SCORE].null_count == 0 and out[C.IMAGE_EMBEDDING].null_count == 0


# -- heads -------------------------------------------------------------------------------------


def test_laion_b16_linear_head_is_read_as_a_linear_head_for_openai_b16(tmp_path):
    import torch
    from torch import nn

    from mmtools.errors import DataContractError
    from mmtools.models import heads as H

    torch.manual_seed(0)
    linear = nn.Linear(512, 1)
    path = tmp_path / "sa_0_4_vit_b_16_linear.pth"
    torch.save(linear.state_dict(), path)
    head = H.load(str(path))
    acts = [layer.activation for layer in head.layers]
    assert (head.format, head.model, head.pretrained, head.dim, head.output, acts) == (
        "laion-aesthetic-linear",
        "ViT-B-16",
        "openai",
        512,
        "identity",
        ["none"],
    )
    x = torch.randn(7, 512)
    with torch.no_grad():
        np.testing.assert_array_equal(head.build("cpu")(x).numpy(), linear(x)[:, 0].numpy())
    b16 = {"model": "ViT-B-16", "pretrained": "openai"}
    head.check(C.IMAGE_EMBEDDING, 512, b16, "aesthetic", force=False)  # accepted
    b32 = {"model": "ViT-B-32", "pretrained": "openai"}  # the same size, another model
    with pytest.raises(DataContractError, match=r"expects 512-d ViT-B-16 \(openai\) embeddings"):
        head.check(C.IMAGE_EMBEDDING, 512, b32, "aesthetic", force=False)


# -- train-head --------------------------------------------------------------------------------

SPREAD = np.array([3.0, 1.0, 0.3, 1.0, 2.0, 0.5])  # features of unequal spread


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A logistic head trained by the command with --folds 10 and --l2 1 on 120 rows of very
    different lengths, 10 of them positive; (its path, the embeddings, the labels, the
    --json report)."""
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    n = 120
    x = rng.normal(size=(n, len(SPREAD))) * SPREAD + np.array([1.0, 0, 0, 0, 0, 0])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    score = unit @ np.array([1.0, -2.0, 3.0, 0.5, 0, 0]) + rng.normal(0, 0.4, n)
    y = np.zeros(n, dtype=int)
    y[np.argsort(-score)[:10]] = 1
    x *= rng.uniform(0.2, 5.0, (n, 1))  # lengths that L2-normalisation must undo
    x = x.astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), len(SPREAD))
    table = pa.table({C.ID: [f"r{i:03d}" for i in range(n)], C.IMAGE_EMBEDDING: emb, "y": y})
    pq.write_table(table, root / "labelled.parquet")
    head = root / "head.safetensors"
    proc = mmtools("train-head", root / "labelled.parquet", "--label", "y", "--folds", "10",
                   "--l2", "1", "-o", head, "--json")  # fmt: skip
    report = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    return head, x, y, report


def test_folds_sets_how_many_folds_are_reported_and_each_holds_both_classes(trained):
    from mmtools.tools.train_head import TrainConfig

    _, _, _, report = trained
    assert TrainConfig(label="y").folds == 5
    assert (report["folds"], report["metric"], report["labelled"], report["positives"]) == (
        10,
        "auc",
        120,
        10,
    )
    # Stratified, each of the 10 folds holds one of the 10 positives, so each has an AUC
    # (a fold without a positive would have none: NaN).
    assert len(report["fold_values"]) == 10
    assert all(0 <= v <= 1 for v in report["fold_values"]), report["fold_values"]


def test_folds_hold_each_class_in_proportion():
    from mmtools.tools.train_head import folds_of

    y = np.zeros(60)
    y[np.random.default_rng(1).choice(60, 12, replace=False)] = 1
    for seed in range(5):
        fold = folds_of(y, 3, seed, stratify=True)
        assert [(int(y[fold == k].sum()), int((fold == k).sum())) for k in range(3)] == [
            (4, 20)
        ] * 3, seed


def test_saved_head_normalises_and_standardises_as_training_did(trained):
    """The head scores an embedding and any positive multiple of it alike, and gives what
    L2-regularised logistic regression gives on L2-normalised, standardised embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler, normalize

    from mmtools.steps.embed import EmbedConfig
    from mmtools.steps.score.heads import HeadScore, HeadScoreConfig

    head, x, y, _ = trained
    rows = np.concatenate([x, 4 * x, x / 8])
    n, dim = rows.shape
    emb = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), dim)
    batch = pa.record_batch([pa.array([f"r{i}" for i in range(n)]), emb], [C.ID, C.IMAGE_EMBEDDING])
    device = EmbedConfig(model=None, audio_model=None, device="cpu")
    step = HeadScore(HeadScoreConfig(heads=[("p", str(head))], embed=device))
    step.output_schema(batch.schema)
    step.setup()
    p = step.process(batch).batch.column("p").to_numpy().reshape(3, -1)
    np.testing.assert_allclose(p[1], p[0], atol=1e-6)
    np.testing.assert_allclose(p[2], p[0], atol=1e-6)
    scaler = StandardScaler().fit(normalize(x.astype(np.float64)))
    z = scaler.transform(normalize(x.astype(np.float64)))
    want = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(z, y).predict_proba(z)[:, 1]
    np.testing.assert_allclose(p[0], want, atol=1e-5)


# -- dedup -------------------------------------------------------------------------------------


def test_semantic_dedup_finds_copies_among_audio_embeddings(tmp_path):
    from mmtools.steps.dedup.step import DedupConfig

    x, true_groups = planted(60, 32, seed=5)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), 32)
    ids = [f"a{i:03d}" for i in range(len(x))]
    ds = write_dataset(tmp_path / "ds", pa.table({C.ID: ids, C.AUDIO_EMBEDDING: emb}))
    config = DedupConfig(
        methods=("semantic",), column=C.AUDIO_EMBEDDING, clusters=1, eps=0.05, mark=True
    )
    out = run_dedup(ds, tmp_path / "out", config)
    assert read_rejects(tmp_path / "out") is None
    assert len(true_groups) >= 20
    found = {frozenset(g) for g in found_groups(out)}
    assert found == {frozenset(ids[i] for i in g) for g in true_groups}
    assert out[C.IS_DUPLICATE].to_pylist().count(True) == sum(len(g) - 1 for g in true_groups)


def test_exact_key_audio_drops_byte_identical_clips_whatever_their_captions(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for name, freq, caption in [
        ("a", 440.0, "a tone"),
        ("b", 660.0, "a tone"),  # the same caption, other audio: kept
        ("c", 880.0, "a higher tone"),
    ]:
        (clips / f"{name}.wav").write_bytes(wav_bytes(0.2, freq=freq))
        (clips / f"{name}.txt").write_text(caption)
    shutil.copy(clips / "a.wav", clips / "z_copy.wav")
    (clips / "z_copy.txt").write_text("the same clip under another caption")
    stream = mmtools("ingest", clips, "-q", "-o", "-").stdout
    out = tmp_path / "out"
    proc = mmtools(
        "dedup", "-m", "exact", "--exact-key", "audio", "-o", out, "--json", input=stream
    )
    summary = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    assert (summary["rows_in"], summary["dropped"]) == (4, {"exact": 1})
    assert read_dataset(out)[C.ID].to_pylist() == ["a.wav", "b.wav", "c.wav"]
    ledger = read_dropped(str(out)).select(["id", "rule", "value", "kept_id"]).to_pylist()
    assert ledger == [{"id": "z_copy.wav", "rule": "exact", "value": None, "kept_id": "a.wav"}]


# -- pHash on photographs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_hashes():
    """(pHash, mirrored pHash, photo, edit) of the 48 photos and their copies of
    tests/bench/bench_phash_curve.py, hashed by the dedup step's code."""
    blobs, photo, edit = curve.corpus()
    h, m = curve.hashes(blobs)
    return h, m, photo, edit


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from mmtools.steps.dedup.phash import popcount

    return popcount(a ^ b)


def test_phash_distances_are_even_between_any_two_images_that_are_not_blank(photo_hashes):
    """A pHash sets the bits of the 64 DCT coefficients above their median: 32 of them, so
    two hashes differ in an even number of bits. The one exception is an image of one
    colour: every coefficient but the first is zero, so only the first bit is set."""
    h, m, photo, edit = photo_hashes
    from mmtools.steps.dedup.phash import popcount

    both = np.concatenate([h, m])
    bits = popcount(both)
    blank = np.flatnonzero(bits != 32)
    assert [(photo[k % len(h)], edit[k % len(h)], int(bits[k])) for k in blank] == [
        (19, "brighter15", 1),  # a patch of sky brightened to pure white
        (19, "brighter15", 1),
    ]
    rest = np.delete(both, blank)
    i, j = np.triu_indices(len(rest), 1)
    assert len(i) > 500_000 and not (_distances(rest[i], rest[j]) % 2).any()


def _cell(*shares: float) -> str:
    """One cell of README's pHash table: a share, or the range of two."""
    lo, hi = f"{min(shares):.2f}", f"{max(shares):.2f}"
    return lo if lo == hi else f"{lo}–{hi}"


def _table_row(h, m, photo, edit, radius: int) -> list[str]:
    off = curve.measure(h, m, photo, edit, radius, flip=False)
    on = curve.measure(h, m, photo, edit, radius, flip=True)
    return [
        _cell(off["resize50"], off["resize150"]),
        _cell(off["jpeg30"]),
        _cell(off["darker15"], off["brighter15"]),
        _cell(off["crop2_centre"], off["crop2_corner"]),
        _cell(off["crop5_centre"]),
        _cell(off["crop5_corner"]),
        f"{off['false_merges']} / {on['false_merges']}",
    ]


def test_phash_radius_table_and_the_default_four_bits_below_the_first_false_merge(
    photo_hashes,
):
    """README's table (dedup section): copies found with their photo per edit, and false
    merges without and with --phash-flip, at each radius it lists."""
    from mmtools.steps.dedup.step import DedupConfig

    h, m, photo, edit = photo_hashes
    table = {
        6: ["0.98–1.00", "0.94", "0.94–0.96", "0.94–0.98", "0.92", "0.65", "0 / 0"],
        8: ["1.00", "0.96", "0.96–0.98", "0.98–1.00", "0.94", "0.79", "0 / 0"],
        10: ["1.00", "0.98", "0.96–0.98", "1.00", "1.00", "0.96", "0 / 0"],
        12: ["1.00", "1.00", "0.96–0.98", "1.00", "1.00", "1.00", "0 / 0"],
        14: ["1.00", "1.00", "0.96–1.00", "1.00", "1.00", "1.00", "0 / 3"],
        16: ["1.00", "1.00", "0.96–1.00", "1.00", "1.00", "1.00", "3 / 7"],
    }
    assert {r: _table_row(h, m, photo, edit, r) for r in table} == table
    rows = [{"radius": r, **curve.measure(h, m, photo, edit, r, flip=True)} for r in range(17)]
    first = next(r["radius"] for r in rows if r["false_merges"])
    assert first == 14 and DedupConfig().max_distance == first - 4 == curve.default_radius(rows)


def test_plain_phash_puts_mirrored_copies_beyond_every_radius_of_the_table(photo_hashes):
    """Without --phash-flip no mirrored copy is found at any radius the table lists; with it,
    every one is from radius 2 up."""
    h, m, photo, edit = photo_hashes
    edit = np.array(edit)
    original, mirrored = np.flatnonzero(edit == "original"), np.flatnonzero(edit == "flip")
    assert (photo[original] == photo[mirrored]).all()
    assert _distances(h[original], h[mirrored]).min() > 16
    for radius in range(17):
        assert curve.measure(h, m, photo, list(edit), radius, flip=False)["flip"] == 0.0
        found = curve.measure(h, m, photo, list(edit), radius, flip=True)["flip"]
        assert (found == 1.0) if radius >= 2 else (found < 1.0), (radius, found)


# -- index -------------------------------------------------------------------------------------


def _build(ds: Path, out: Path, **config):
    from mmtools.io.index import IndexReader
    from mmtools.tools.index.build import IndexBuild, IndexConfig

    report = IndexBuild(str(out), IndexConfig(**config), quiet=True).run(Source([str(ds)]))
    return report, IndexReader(str(out))


def test_kmeans_samples_at_most_256_rows_a_centre_and_is_seeded(tmp_path):
    ds = write_embeddings(tmp_path / "ds", clustered(1500, 16, seed=21))

    def centres(name: str, k: int, seed: int) -> tuple[dict, np.ndarray]:
        _, reader = _build(ds, tmp_path / name, kmeans=k, seed=seed)
        assert reader.kind == "centroids" and reader.rows == k
        return reader.manifest["kmeans"], np.stack([reader.vector(i) for i in range(k)])

    info, a = centres("a", 3, 0)
    assert (info["k"], info["sample_rows"], sum(info["sizes"]), info["seed"]) == (3, 768, 768, 0)
    info, again = centres("again", 3, 0)
    assert np.array_equal(again, a)
    info, other = centres("other", 3, 1)
    assert info["seed"] == 1
    # Another seed starts k-means elsewhere: other centres, not the same ones reordered.
    assert (other @ a.T).max(axis=1).min() < 0.99
    info, _ = centres("all", 8, 0)  # fewer than 256 rows a centre: the whole input
    assert (info["sample_rows"], sum(info["sizes"])) == (1500, 1500)


def test_index_skips_null_nan_infinite_and_zero_embeddings_and_counts_them_by_reason(tmp_path):
    x = clustered(40, 16, seed=8).astype(np.float16)
    x[3] = np.nan
    x[7, 5] = np.inf
    x[9, 0] = -np.inf
    x[11] = 0
    null = [i == 15 for i in range(40)]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16, mask=pa.array(null))
    ids = [f"r{i:02d}" for i in range(40)]
    table = pa.table({C.ID: ids, C.IMAGE_EMBEDDING: emb})
    table = table.replace_schema_metadata(
        C.with_metadata(table.schema, {C.IMAGE_EMBEDDING: {**SHAPES, "dim": 16}}).metadata
    )
    ds = write_shards(tmp_path / "ds", table)
    report, reader = _build(ds, tmp_path / "idx")
    assert report.skipped == {"bad_embedding": 4, "no_embedding": 1}
    assert (report.rows_in, report.indexed, reader.rows) == (40, 35, 35)
    assert "40 in, 35 indexed, 5 skipped (bad_embedding 4, no_embedding 1)" in report.line()
    skipped = {"r03", "r07", "r09", "r11", "r15"}
    assert [i for i in ids if reader.label(i) is None] == sorted(skipped)


# -- the drop ledger's null values ----------------------------------------------------------------


def test_filter_english_ledger_value_is_null(tmp_path):
    from mmtools.steps.filter.step import FilterConfig, make_filter

    langs = {"en": "en", "de": "de", "us": "en-US", "fr": "fr-CA", "eng": "English"}
    table = pa.table(
        {
            C.ID: list(langs),
            C.TEXT: ["a red circle on blue"] * 5,
            C.WIDTH: pa.array([300] * 5, pa.int32()),
            C.HEIGHT: pa.array([300] * 5, pa.int32()),
            C.LANGUAGE: list(langs.values()),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    step = make_filter(FilterConfig(presets=("datacomp-basic",)))
    summary, _ = engines.run(
        "filter", Source([str(tmp_path / "in.parquet")]), [step],
        DatasetSink(str(tmp_path / "out")), quiet=True,
    )  # fmt: skip
    assert summary.dropped == {"english": 2}
    assert read_dataset(tmp_path / "out")[C.ID].to_pylist() == ["en", "us", "eng"]
    ledger = read_dropped(str(tmp_path / "out"))
    assert ledger.select(["id", "step", "rule", "value", "kept_id"]).to_pylist() == [
        {"id": i, "step": "filter", "rule": "english", "value": None, "kept_id": None}
        for i in ("de", "fr")
    ]


def test_mixup_source_ledger_value_is_null(tmp_path):
    from test_mixup import embedding_file

    from mmtools.steps.mixup import Mixup, MixupConfig

    embedding_file(tmp_path / "in.parquet", 10)
    summary, _ = engines.run(
        "mixup", Source([str(tmp_path / "in.parquet")]),
        [Mixup(MixupConfig(mode="embedding", seed=1))],
        DatasetSink(str(tmp_path / "out")), quiet=True,
    )  # fmt: skip
    assert summary.dropped == {"mixup_source": 10}
    assert read_dataset(tmp_path / "out").num_rows == 10  # the mixed rows only
    ledger = read_dropped(str(tmp_path / "out"))
    rows = ledger.select(["id", "step", "rule", "value", "kept_id"]).to_pylist()
    assert sorted(rows, key=lambda r: r["id"]) == [
        {"id": f"e{i:05d}", "step": "mixup", "rule": "mixup_source", "value": None, "kept_id": None}
        for i in range(10)
    ]
