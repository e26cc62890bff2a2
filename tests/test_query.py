"""`mmtools score --query/--query-image`: cosines with a query embedded by the same model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import mmtools, read_dataset

from mmtools import columns as C
from mmtools.demo import synth

SHAPES = pytest.importorskip("mmtools.models.shapes")
pytestmark = pytest.mark.skipif(
    not SHAPES.weights_path().exists(), reason="mmtools-shapes weights not built"
)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """16 generated shapes with captions, embedded (image and text) by mmtools-shapes."""
    root = tmp_path_factory.mktemp("query")
    (root / "imgs").mkdir()
    for i, s in enumerate(synth.generate(16, seed=21)):
        s.image.save(root / "imgs" / f"s{i:02d}.png")
        (root / "imgs" / f"s{i:02d}.txt").write_text(s.caption)
    stream = mmtools("ingest", root / "imgs", "-q", "-o", "-").stdout
    mmtools("embed", "--model", "mmtools-shapes", "-q", "-o", root / "emb", input=stream)
    return root


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=1).numpy()


def test_query_scores_equal_the_cosine_with_the_same_model(embedded):
    from PIL import Image

    root = embedded
    example = root / "imgs" / "s03.png"
    mmtools("score", root / "emb", "--query", "a red circle", "--query", "blue background",
            "--query-name", "red", "--query-image", example, "-o", root / "out", "-q")  # fmt: skip
    out = read_dataset(root / "out")
    model, preprocess, tokenizer = SHAPES.create()
    with torch.no_grad():
        texts = _unit(model.encode_text(tokenizer(["a red circle", "blue background"])))
        image = _unit(model.encode_image(preprocess(Image.open(example).convert("RGB"))[None]))
    emb = out.column(C.IMAGE_EMBEDDING)
    rows = _unit(torch.from_numpy(np.stack(emb.to_numpy(zero_copy_only=False))))
    want = rows @ np.vstack([texts, image]).T
    for j, name in enumerate(["red", "sim_blue_background", "sim_s03"]):
        assert out.schema.field(name).type == pa.float32()
        np.testing.assert_allclose(out.column(name).to_numpy(), want[:, j], atol=2e-6)
    row = out.column(C.ID).to_pylist().index("s03.png")
    assert out.column("sim_s03")[row].as_py() == pytest.approx(1.0, abs=1e-3)
    assert C.CLIP_SCORE in out.column_names  # the input has text: clip_score as before
    info = C.column_info(out.schema)
    assert info["red"] == {
        "model": "mmtools-shapes",
        "pretrained": "bundled",
        "library": info[C.IMAGE_EMBEDDING]["library"],
        "of": [C.IMAGE_EMBEDDING],
        "query": "a red circle",
    }
    assert info["sim_s03"]["query_image"] == str(example)


def test_query_with_another_model_is_refused(embedded):
    root = embedded
    proc = mmtools("score", root / "emb", "--query", "a star", "--model", "mmtools-shapes",
                   "--pretrained", "none", "-o", root / "other", check=False)  # fmt: skip
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1
    assert lines[0] == (
        "mmtools score: error: image_embedding was made by mmtools-shapes (bundled) but the "
        "queries would be embedded by mmtools-shapes (none); their cosine means nothing. "
        "Leave out --model to use the embedding's own model"
    )
    assert not (root / "other").exists()


def test_query_alone_without_model_metadata_needs_a_model(embedded, tmp_path):
    table = read_dataset(embedded / "emb").select([C.ID, C.IMAGE_EMBEDDING])
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "bare.parquet")
    proc = mmtools("score", tmp_path / "bare.parquet", "--query", "a star", "-o", tmp_path / "o",
                   check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "image_embedding has no model metadata, so the queries' model is unknown" in (
        proc.stderr.decode()
    )
    mmtools("score", tmp_path / "bare.parquet", "--query", "a star", "--model", "mmtools-shapes",
            "-o", tmp_path / "ok", "-q")  # fmt: skip
    assert read_dataset(tmp_path / "ok").column_names == [C.ID, C.IMAGE_EMBEDDING, "sim_a_star"]


def test_no_clip_score_and_name_clashes(embedded, tmp_path):
    root = embedded
    mmtools("score", root / "emb", "--query", "A star!", "--no-clip-score", "-o", tmp_path / "o",
            "-q")  # fmt: skip
    names = read_dataset(tmp_path / "o").column_names
    assert "sim_a_star" in names and C.CLIP_SCORE not in names
    for args, message in (
        (["--query", "a star", "--query", "A star"], "two scores would be named sim_a_star"),
        (["--query", "x", "--query-name", "a", "--query-name", "b"], "2 --query-name for 1"),
        (["--query", "x", "--query-name", "text"], "text is a column mmtools owns"),
    ):
        proc = mmtools("score", root / "emb", *args, "-o", tmp_path / "bad", check=False)
        assert proc.returncode == 2 and message in proc.stderr.decode(), proc.stderr
