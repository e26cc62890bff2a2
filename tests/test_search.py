"""`mmtools search`: queries embedded by the index's own model (the bundled mmtools-shapes),
hits as a table, JSON, a dataset and a contact sheet; other models refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, mmtools, read_dataset
from test_index import clustered, write_embeddings

from mmtools import columns as C
from mmtools.demo import synth
from mmtools.io.index import unit_vectors

SHAPES = pytest.importorskip("mmtools.models.shapes")
pytestmark = pytest.mark.skipif(
    not SHAPES.weights_path().exists(), reason="mmtools-shapes weights not built"
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """30 generated shape images, ingested, embedded by mmtools-shapes and indexed."""
    root = tmp_path_factory.mktemp("search")
    folder = root / "imgs"
    folder.mkdir()
    for i, s in enumerate(synth.generate(30, seed=11)):
        (folder / f"s{i:03d}.png").write_bytes(encode(s.image, "PNG"))
        (folder / f"s{i:03d}.txt").write_text(s.caption)
    mmtools("ingest", folder, "-o", root / "ds", "--shard-rows", "12", "-q")
    mmtools("embed", root / "ds", "--model", "mmtools-shapes", "-o", root / "emb", "-q")
    mmtools("index", root / "emb", "-o", root / "idx", "-q")
    return root


def _top(data: pa.Table, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    vecs, _ = unit_vectors(data.column(C.IMAGE_EMBEDDING))
    sims = vecs @ query
    order = np.argsort(-sims, kind="stable")[:k]
    return [data.column(C.ID)[int(i)].as_py() for i in order], sims[order]


def test_text_query_uses_the_model_embed_uses(shapes, tmp_path):
    caption = "two large red circles on a blue background"
    pq.write_table(pa.table({C.ID: ["q"], C.TEXT: [caption]}), tmp_path / "q.parquet")
    mmtools("embed", tmp_path / "q.parquet", "--model", "mmtools-shapes", "-o", tmp_path / "qe")
    q = unit_vectors(read_dataset(tmp_path / "qe").column(C.TEXT_EMBEDDING))[0][0]
    want_ids, want_sims = _top(read_dataset(shapes / "emb"), q, 5)
    out = mmtools("search", shapes / "idx", "--text", caption, "-k", "5", "--json").stdout
    hits = json.loads(out)["hits"]
    assert [h["id"] for h in hits] == want_ids
    np.testing.assert_allclose([h["similarity"] for h in hits], want_sims, atol=3e-3)
    rows = {r[C.ID]: r for r in read_dataset(shapes / "ds").to_pylist()}
    assert [h["caption"] for h in hits] == [rows[i][C.TEXT] for i in want_ids]
    assert [h["source"] for h in hits] == [rows[i][C.SOURCE] for i in want_ids]
    table = mmtools("search", shapes / "idx", "--id", want_ids[0], "-k", "3").stdout.decode()
    head, _, first = table.splitlines()[:3]
    assert head.split() == ["rank", "id", "similarity", "caption", "source"]
    assert first.split()[:3] == ["1", want_ids[0], "1.0000"]


def test_image_query_finds_the_image_itself(shapes):
    image = shapes / "imgs" / "s007.png"
    hits = json.loads(mmtools("search", shapes / "idx", "--image", image, "--json").stdout)
    assert len(hits["hits"]) == 20
    assert hits["hits"][0]["id"] == "s007.png"
    assert hits["hits"][0]["similarity"] > 0.999
    bad = mmtools("search", shapes / "idx", "--image", shapes / "imgs" / "s007.txt", check=False)
    assert bad.returncode == 2 and "not_image" in bad.stderr.decode()


def test_another_model_is_refused_in_one_line(shapes, tmp_path):
    proc = mmtools("search", shapes / "idx", "--text", "a cat", "--model", "ViT-B-32", check=False)
    assert proc.returncode == 2
    assert proc.stderr.decode() == (
        f"mmtools search: error: {shapes / 'idx'} holds embeddings of mmtools-shapes (bundled); "
        "a query embedded by ViT-B-32 cannot be compared with them (leave out --model, or build "
        "an index with that model)\n"
    )
    weights = mmtools(
        "search",
        shapes / "idx",
        "--text",
        "a cat",
        "--pretrained",
        "laion2b_s34b_b79k",
        check=False,
    )
    assert (
        weights.returncode == 2 and "not of weights 'laion2b_s34b_b79k'" in weights.stderr.decode()
    )
    # An index whose embeddings carry no model metadata cannot embed a query at all.
    data = read_dataset(shapes / "emb").select([C.ID, C.IMAGE_EMBEDDING])
    (tmp_path / "bare").mkdir()
    pq.write_table(data.replace_schema_metadata(None), tmp_path / "bare" / "part-0.parquet")
    mmtools("index", tmp_path / "bare", "-o", tmp_path / "idx", "-q")
    bare = mmtools("search", tmp_path / "idx", "--text", "a cat", check=False)
    assert bare.returncode == 2 and "records no embedding model" in bare.stderr.decode()
    by_id = json.loads(mmtools("search", tmp_path / "idx", "--id", "s003.png", "--json").stdout)
    assert by_id["hits"][0]["id"] == "s003.png"


def test_hits_as_a_dataset_and_a_sheet(shapes, tmp_path):
    from PIL import Image

    from mmtools.tools.sheet import SheetConfig, tile_size

    args = ["search", shapes / "idx", "--id", "s002.png", "-k", "10"]
    mmtools(*args, "-o", tmp_path / "hits", "--sheet", tmp_path / "hits.png", "-q")
    hits = read_dataset(tmp_path / "hits")
    data = read_dataset(shapes / "emb")
    query = unit_vectors(data.column(C.IMAGE_EMBEDDING))[0][
        data.column(C.ID).index("s002.png").as_py()
    ]
    want_ids, want_sims = _top(data, query, 10)
    assert hits.column(C.ID).to_pylist() == want_ids
    np.testing.assert_allclose(hits.column(C.SIMILARITY).to_numpy(), want_sims, atol=1e-5)
    assert {C.IMAGE, C.TEXT, C.IMAGE_EMBEDDING} <= set(hits.column_names)
    tw, th = tile_size(SheetConfig(), 1)
    with Image.open(tmp_path / "hits.png") as img:
        assert img.size == (8 * tw, 2 * th)  # 10 tiles, 8 a row
    # The same command again finds its output complete.
    again = mmtools(*args, "-o", tmp_path / "hits")
    assert again.returncode == 0


def test_a_changed_dataset_is_detected(shapes, tmp_path):
    import shutil

    shutil.copytree(shapes / "emb", tmp_path / "emb")
    mmtools("index", tmp_path / "emb", "-o", tmp_path / "idx", "-q")
    shard = sorted((tmp_path / "emb").glob("part-*.parquet"))[0]
    os.utime(shard, ns=(1, 1))
    proc = mmtools(
        "search", tmp_path / "idx", "--id", "s001.png", "-o", tmp_path / "o", check=False
    )
    assert proc.returncode == 3 and "is out of date" in proc.stderr.decode()
    table = mmtools("search", tmp_path / "idx", "--id", "s001.png", "-k", "2")
    assert "showing the hits without captions" in table.stderr.decode()


def test_a_model_that_cannot_be_had_is_one_line(tmp_path):
    laion = {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "library": "open_clip"}
    ds = write_embeddings(tmp_path / "ds", clustered(50, 512, seed=1), model=laion)
    mmtools("index", ds, "-o", tmp_path / "idx", "-q")
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}  # nothing cached
    proc = mmtools("search", tmp_path / "idx", "--text", "a dog", check=False, env=offline)
    assert proc.returncode == 75, proc.stderr.decode()
    assert proc.stderr.decode().count("\n") == 1
    assert "cannot load ViT-B-32 weights 'laion2b_s34b_b79k' (no network?)" in proc.stderr.decode()


def test_search_to_stdout_streams_the_hit_rows_with_their_similarity(shapes):
    proc = mmtools("search", shapes / "idx", "--id", "s002.png", "-k", "10", "-o", "-")
    stdout = pa.BufferReader(proc.stdout)
    hits = pa.ipc.open_stream(stdout).read_all()
    assert stdout.tell() == len(proc.stdout)  # the stream and nothing after it
    data = read_dataset(shapes / "emb")
    query = unit_vectors(data.column(C.IMAGE_EMBEDDING))[0][
        data.column(C.ID).index("s002.png").as_py()
    ]
    want_ids, want_sims = _top(data, query, 10)
    assert hits.column_names == [*data.column_names, C.SIMILARITY]
    assert hits.column(C.ID).to_pylist() == want_ids
    np.testing.assert_allclose(hits.column(C.SIMILARITY).to_numpy(), want_sims, atol=1e-5)
    rows = {r[C.ID]: r for r in data.to_pylist()}
    for hit in hits.drop_columns([C.SIMILARITY]).to_pylist():
        assert hit == rows[hit[C.ID]]
    table = proc.stderr.decode().splitlines()
    assert table[0].split() == ["rank", "id", "similarity", "caption", "source"]
    assert [line.split()[1] for line in table[2:12]] == want_ids
