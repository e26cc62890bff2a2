"""The LAION-subsets, query-filter and quality-head recipes, run as the shell scripts they are."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import mmtools, read_dataset
from test_heads import L14, AestheticMLP, KerasNSFW, direct, embeddings_file
from test_recipes_filter import run_recipe
from test_train_head import blurred_shapes

from mmtools import columns as C
from mmtools.models import heads as H
from mmtools.tools.train_head import auc

SHAPES = pytest.importorskip("mmtools.models.shapes")
needs_model = pytest.mark.skipif(
    not SHAPES.weights_path().exists(), reason="mmtools-shapes weights not built"
)
OFFLINE = {"MODEL": "mmtools-shapes", "PRETRAINED": ""}


def _between(values: np.ndarray, q: float) -> str:
    """A threshold halfway between two neighbouring values near quantile `q`."""
    v = np.sort(values.astype(np.float64))
    k = int(q * (len(v) - 1))
    return repr(float((v[k] + v[k + 1]) / 2))


def test_laion_subsets_recipe_applies_the_three_heads(tmp_path):
    torch.manual_seed(0)
    aesthetic, nsfw = AestheticMLP().eval(), KerasNSFW().eval()
    torch.save(aesthetic.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    torch.save(nsfw.state_dict(), tmp_path / "clip_ViT-L-14_openai_binary_nsfw_head.pth")
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1, 768)).astype(np.float32)
    watermark = H.Head(H.FORMAT, [H.Layer(w, np.zeros(1, np.float32))], "sigmoid",
                       model="ViT-L-14", pretrained="openai", input=C.IMAGE_EMBEDDING)  # fmt: skip
    H.save(watermark, str(tmp_path / "watermark.safetensors"))
    x = embeddings_file(tmp_path / "pool.parquet", 768, 203, L14, seed=7)
    a, p = direct(aesthetic, x), direct(nsfw, x)
    with torch.no_grad():
        unit = torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1)
        m = torch.sigmoid(unit @ torch.from_numpy(w).T)[:-3, 0].numpy()
    env = {
        "AESTHETIC_HEAD": str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"),
        "NSFW_HEAD": str(tmp_path / "clip_ViT-L-14_openai_binary_nsfw_head.pth"),
        "WATERMARK_HEAD": str(tmp_path / "watermark.safetensors"),
        # Random heads put their scores anywhere: thresholds that split these rows.
        "AESTHETIC_MIN": _between(a, 0.3),
        "PUNSAFE_MAX": _between(p, 0.8),
        "PWATERMARK_MAX": _between(m, 0.8),
    }
    proc = run_recipe("laion_subsets.sh", tmp_path / "pool.parquet", tmp_path / "out", **env)
    assert proc.returncode == 0, proc.stderr.decode()
    keep = (a > float(env["AESTHETIC_MIN"])) & (p < float(env["PUNSAFE_MAX"]))
    keep &= m < float(env["PWATERMARK_MAX"])
    want = [f"r{i:03d}" for i in np.flatnonzero(keep)]
    out = read_dataset(tmp_path / "out")
    assert out.column(C.ID).to_pylist() == want and 20 < len(want) < 150
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["dropped"] == {"where": 200 - len(want)}
    assert manifest["lineage"][0]["rejected"] == 3  # the null, NaN and zero embeddings


def test_laion_subsets_recipe_needs_a_head():
    proc = run_recipe("laion_subsets.sh", "in", "out")
    assert proc.returncode == 2 and b"set AESTHETIC_HEAD" in proc.stderr


@needs_model
def test_query_filter_recipe_drops_rows_like_the_queries(tmp_path):
    from test_query import _unit

    from mmtools.demo import synth

    (tmp_path / "imgs").mkdir()
    for i, s in enumerate(synth.generate(40, seed=5)):
        s.image.save(tmp_path / "imgs" / f"s{i:02d}.png")
        (tmp_path / "imgs" / f"s{i:02d}.txt").write_text(s.caption)
    mmtools("ingest", tmp_path / "imgs", "-o", tmp_path / "ds", "-q")
    mmtools("embed", tmp_path / "ds", "--model", "mmtools-shapes", "--modalities", "image",
            "-o", tmp_path / "emb", "-q")  # fmt: skip
    emb = read_dataset(tmp_path / "emb")
    queries = ["a red shape", "a black background"]
    model, _, tokenizer = SHAPES.create()
    with torch.no_grad():
        q = _unit(model.encode_text(tokenizer(queries)))
    rows = _unit(torch.from_numpy(np.stack(emb.column(C.IMAGE_EMBEDDING).to_numpy(False))))
    worst = (rows @ q.T).max(axis=1)
    limit = _between(worst, 0.6)
    env = {**OFFLINE, "QUERIES": "\n".join(queries), "MAX_SIM": limit}
    proc = run_recipe("query_filter.sh", tmp_path / "ds", tmp_path / "out", **env)
    assert proc.returncode == 0, proc.stderr.decode()
    ids = np.array(emb.column(C.ID).to_pylist())
    out = read_dataset(tmp_path / "out")
    assert out.column(C.ID).to_pylist() == ids[worst < float(limit)].tolist()
    assert {"q1", "q2"} <= set(out.column_names)
    assert C.column_info(out.schema)["q2"]["query"] == "a black background"


@needs_model
def test_quality_head_recipe_learns_to_drop_blurred_images(tmp_path):
    blurred_shapes(tmp_path / "imgs", rows=240, seed=12)
    mmtools("ingest", tmp_path / "imgs", "-o", tmp_path / "ds", "-q")
    table = read_dataset(tmp_path / "ds")
    ids = np.array(table.column(C.ID).to_pylist())
    sharp = np.array([i.startswith("s") for i in ids])
    held = np.arange(len(ids)) % 3 == 0
    label = pa.array([None if h else bool(s) for s, h in zip(sharp, held, strict=True)])
    pq.write_table(table.append_column("good", label), tmp_path / "labelled.parquet")
    head = tmp_path / "good.safetensors"
    env = {**OFFLINE, "LABEL": "good", "HEAD": str(head)}
    proc = run_recipe("train_quality_head.sh", tmp_path / "labelled.parquet", tmp_path / "out",
                      **env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"5-fold AUC" in proc.stderr and head.exists()
    kept = set(read_dataset(tmp_path / "out").column(C.ID).to_pylist())
    # Exactly the rows the written head scores at 0.5 or more ...
    stream = mmtools("embed", tmp_path / "labelled.parquet", "--model", "mmtools-shapes",
                     "--modalities", "image", "-q", "-o", "-").stdout  # fmt: skip
    mmtools("score", "--head", f"quality={head}", "-o", tmp_path / "scored", "-q", input=stream)
    scored = read_dataset(tmp_path / "scored")
    quality = dict(zip(scored.column(C.ID).to_pylist(), scored.column("quality").to_numpy(),
                       strict=True))  # fmt: skip
    assert kept == {i for i, v in quality.items() if v >= 0.5}
    # ... which ranks the images it was not taught about by sharpness, and keeps mostly the
    # sharp ones of them.
    p = np.array([quality[i] for i in ids[held]])
    assert auc(p, sharp[held].astype(float)) >= 0.95
    assert np.mean((p >= 0.5) == sharp[held]) >= 0.8
