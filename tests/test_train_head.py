"""`mmtools train-head`: a probe learns a planted defect, is seeded, and refuses thin labels."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import mmtools, read_dataset

from mmtools import columns as C
from mmtools.demo import synth
from mmtools.tools.train_head import auc, hanley_mcneil

SHAPES = pytest.importorskip("mmtools.models.shapes")
pytestmark = pytest.mark.skipif(
    not SHAPES.weights_path().exists(), reason="mmtools-shapes weights not built"
)
ROWS = 240
BLUR = 3.0  # pixels, on 64-pixel images


def blurred_shapes(folder, rows: int = ROWS, seed: int = 11) -> None:
    """Generated shape images with captions; every odd one blurred (its id starts with b)."""
    from PIL import ImageFilter

    folder.mkdir()
    for i, s in enumerate(synth.generate(rows, seed=seed)):
        blurred = i % 2 == 1
        img = s.image.filter(ImageFilter.GaussianBlur(BLUR)) if blurred else s.image
        buf = io.BytesIO()
        img.save(buf, "PNG")
        stem = f"{'b' if blurred else 's'}{i:03d}"
        (folder / f"{stem}.png").write_bytes(buf.getvalue())
        (folder / f"{stem}.txt").write_text(s.caption)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """The images embedded by mmtools-shapes, two thirds of them labelled `blurry` (0/1)."""
    root = tmp_path_factory.mktemp("train")
    blurred_shapes(root / "imgs")
    stream = mmtools("ingest", root / "imgs", "-q", "-o", "-").stdout
    mmtools("embed", "--model", "mmtools-shapes", "--modalities", "image", "-q", "-o",
            root / "emb", input=stream)  # fmt: skip
    table = read_dataset(root / "emb")
    ids = table.column(C.ID).to_pylist()
    held = np.arange(len(ids)) % 3 == 0
    labels = [None if h else int(i.startswith("b")) for i, h in zip(ids, held, strict=True)]
    table = table.append_column("blurry", pa.array(labels, pa.int64()))
    pq.write_table(table, root / "labelled.parquet")
    return root, np.array(ids), held


def test_trained_head_finds_blurred_images_it_never_saw(labelled):
    root, ids, held = labelled
    head = root / "blurry.safetensors"
    proc = mmtools("train-head", root / "labelled.parquet", "--label", "blurry", "-o", head)
    line = proc.stderr.decode().strip().splitlines()[-1]
    assert line.startswith(
        "mmtools train-head: 80 positive (50.0%), 80 negative, 80 unlabelled ignored; "
        "logistic on image_embedding (mmtools-shapes), l2 1: 5-fold AUC 0."
    ), line
    spec = json.loads((root / "blurry.json").read_text())
    assert (spec["model"], spec["pretrained"], spec["input"], spec["output"]) == (
        "mmtools-shapes",
        "bundled",
        C.IMAGE_EMBEDDING,
        "sigmoid",
    )
    assert spec["training"]["value"] >= 0.9 and spec["training"]["labelled"] == 160
    mmtools("score", root / "labelled.parquet", "--head", f"blurry_p={head}", "-o",
            root / "scored", "-q")  # fmt: skip
    scored = read_dataset(root / "scored")
    assert scored.column(C.ID).to_pylist() == ids.tolist()
    p = scored.column("blurry_p").to_numpy()
    truth = np.array([i.startswith("b") for i in ids], dtype=float)
    assert auc(p[held], truth[held]) >= 0.95
    assert ((p >= 0) & (p <= 1)).all()


def test_training_is_seeded_and_deterministic(labelled, tmp_path):
    root, _, _ = labelled
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.safetensors"
        mmtools("train-head", root / "labelled.parquet", "--label", "blurry", "--kind", "mlp",
                "--seed", seed, "--hidden", 16, "-o", out, "-q")  # fmt: skip
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_too_few_labels_per_class_is_refused(labelled, tmp_path):
    root, ids, _ = labelled
    table = pq.read_table(root / "labelled.parquet").drop_columns(["blurry"])
    few = [1 if i in ("b001.png", "b003.png", "b005.png") else 0 for i in ids]
    pq.write_table(table.append_column("blurry", pa.array(few)), tmp_path / "few.parquet")
    proc = mmtools("train-head", tmp_path / "few.parquet", "--label", "blurry", "-o",
                   tmp_path / "h.safetensors", check=False)  # fmt: skip
    assert proc.returncode == 3
    assert proc.stderr.decode().strip().splitlines()[-1] == (
        "mmtools train-head: error: blurry: 3 rows are labelled 1 and 237 labelled 0; "
        "label at least 10 of each to train and cross-validate a head"
    )
    assert not (tmp_path / "h.safetensors").exists()


def test_float_labels_train_a_regressor_with_r2(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    score = 5 + 3 * x[:, 0] - 2 * x[:, 1] + rng.normal(0, 0.02, 300)
    label = pa.array([None if i % 10 == 0 else v for i, v in enumerate(score)], pa.float64())
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), 16)
    table = pa.table({C.ID: [str(i) for i in range(300)], C.IMAGE_EMBEDDING: emb, "rating": label})
    pq.write_table(table, tmp_path / "r.parquet")
    proc = mmtools("train-head", tmp_path / "r.parquet", "--label", "rating", "--l2", "0.01",
                   "-o", tmp_path / "r.safetensors", "--json")  # fmt: skip
    report = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    assert (report["task"], report["kind"], report["metric"]) == ("regression", "linear", "r2")
    assert report["labelled"] == 270 and report["unlabelled"] == 30
    assert report["low"] <= report["value"] <= report["high"] and report["value"] > 0.98
    mmtools("score", tmp_path / "r.parquet", "--head", f"pred={tmp_path / 'r.safetensors'}",
            "-o", tmp_path / "s", "-q")  # fmt: skip
    pred = read_dataset(tmp_path / "s").column("pred").to_numpy()
    assert np.abs(pred - score).max() < 0.1  # the output is the rating itself, no sigmoid


def test_auc_counts_ties_as_half_and_its_interval_brackets_it():
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.2, 0.4, 0.9])
    labels = np.array([0, 0, 1, 1, 0, 1, 1])
    pairs = [(p, n) for p in scores[labels == 1] for n in scores[labels == 0]]
    want = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert auc(scores, labels) == pytest.approx(want, abs=1e-12)
    low, high = hanley_mcneil(0.9, 50, 50)
    assert low < 0.9 < high and high - low == pytest.approx(0.12592, abs=1e-4)  # SE 0.03212


def test_the_default_penalty_is_chosen_by_out_of_fold_loss():
    """Few labels in many dimensions get a strong penalty, many labels in few a weak one."""
    from mmtools.tools.train_head import L2_GRID, TrainConfig, choose_l2

    rng = np.random.default_rng(0)
    config = TrainConfig(label="y")
    few = rng.standard_normal((60, 256))
    y_few = (few[:, 0] + rng.standard_normal(60) > 0).astype(float)
    many = rng.standard_normal((4000, 4))
    y_many = (many[:, 0] + 0.1 * rng.standard_normal(4000) > 0).astype(float)
    assert choose_l2(few, y_few, "logistic", "classification", config) >= 100.0
    assert choose_l2(many, y_many, "logistic", "classification", config) <= 1.0
    assert choose_l2(many, many[:, 0], "linear", "regression", config) == L2_GRID[0]
