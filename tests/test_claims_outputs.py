"""What `head`, `export --format folder`, `index`/`search` (nprobe, a changed dataset) and
`sheet` (`-c`, undecodable images) put in front of a user, checked exactly."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, mmtools
from test_index import clustered, stored, write_embeddings

from mmtools import columns as C
from mmtools.tools.sheet import DROPPED, PAD, PLAIN, SheetConfig, tile_size

needs_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss not installed (mmtools[index])"
)

JPEG, PNG = image_bytes(0), image_bytes(1, fmt="PNG")
EMBEDDINGS = [[0.5, -0.25, 0.125, 1.0], [0.0, 1.0, -1.0, 0.75]]


@pytest.fixture
def small(tmp_path):
    """Two rows: a JPEG and a PNG, captions, an int and a float column, a float16 embedding."""
    table = pa.table(
        {
            C.ID: ["sub/img7.jpg", "plain-id_2"],
            C.IMAGE: C.media_array([JPEG, PNG], [None, None]),
            C.TEXT: ["a red square", "two blue circles"],
            "width": pa.array([48, 32], pa.int32()),
            C.CLIP_SCORE: pa.array([0.25, 0.5], pa.float32()),
            C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(
                pa.array(np.array(EMBEDDINGS, np.float16).ravel()), 4
            ),
        }
    )
    (tmp_path / "ds").mkdir()
    pq.write_table(table, tmp_path / "ds" / "part-00000.parquet")
    return tmp_path / "ds"


def test_head_shows_media_as_format_and_size_and_embeddings_as_their_shape(small):
    table = mmtools("head", small).stdout.decode()
    jpeg, png = f"<jpeg {len(JPEG)} B>", f"<png {len(PNG)} B>"
    w = max(len(jpeg), len(png))
    assert table.splitlines() == [
        f"id            {'image'.ljust(w)}  text              width  clip_score  "
        "image_embedding                       ",
        f"------------  {'-' * w}  ----------------  -----  ----------  "
        "--------------------------------------",
        f"sub/img7.jpg  {jpeg.ljust(w)}  a red square      48     0.25        "
        "[0.500, -0.250, 0.125, … ×4 halffloat]",
        f"plain-id_2    {png.ljust(w)}  two blue circles  32     0.5         "
        "[0.000, 1.000, -1.000, … ×4 halffloat]",
    ]


def test_head_json_prints_one_object_per_row(small):
    lines = mmtools("head", small, "--json").stdout.decode().splitlines()
    assert [json.loads(line) for line in lines] == [
        {
            "id": "sub/img7.jpg",
            "image": f"<jpeg {len(JPEG)} B>",
            "text": "a red square",
            "width": 48,
            "clip_score": 0.25,
            "image_embedding": "[0.500, -0.250, 0.125, … ×4 halffloat]",
        },
        {
            "id": "plain-id_2",
            "image": f"<png {len(PNG)} B>",
            "text": "two blue circles",
            "width": 32,
            "clip_score": 0.5,
            "image_embedding": "[0.000, 1.000, -1.000, … ×4 halffloat]",
        },
    ]
    picked = mmtools("head", small, "--json", "-n", "1", "-c", "id,image").stdout.decode()
    assert picked.splitlines() == [
        json.dumps({"id": "sub/img7.jpg", "image": f"<jpeg {len(JPEG)} B>"}, ensure_ascii=False)
    ]


def test_head_json_writes_nan_and_infinity_as_null(tmp_path):
    """JSON lines that strict readers (jq, JSON.parse) accept: no bare NaN or Infinity."""
    path = tmp_path / "nan.parquet"
    scores = [float("nan"), float("inf"), 0.5]
    pq.write_table(pa.table({"id": ["a", "b", "c"], "clip_score": scores}), path)
    lines = mmtools("head", path, "--json").stdout.decode().splitlines()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) for line in lines]
    assert [r["clip_score"] for r in rows] == [None, None, 0.5]


def test_export_folder_writes_media_caption_and_metadata_side_by_side(small, tmp_path):
    out = tmp_path / "folder"
    mmtools("export", small, "--format", "folder", "-o", out, "-q")
    assert sorted(p.name for p in out.iterdir()) == [
        "_export.json",
        "plain-id_2.json",
        "plain-id_2.png",
        "plain-id_2.txt",
        "sub%2Fimg7%2Ejpg.jpg",
        "sub%2Fimg7%2Ejpg.json",
        "sub%2Fimg7%2Ejpg.txt",
    ]
    assert (out / "sub%2Fimg7%2Ejpg.jpg").read_bytes() == JPEG
    assert (out / "plain-id_2.png").read_bytes() == PNG
    assert (out / "sub%2Fimg7%2Ejpg.txt").read_text() == "a red square"
    assert (out / "plain-id_2.txt").read_text() == "two blue circles"
    assert json.loads((out / "sub%2Fimg7%2Ejpg.json").read_text()) == {
        "id": "sub/img7.jpg",
        "text": "a red square",
        "width": 48,
        "clip_score": 0.25,
        "image_embedding": EMBEDDINGS[0],
    }
    assert json.loads((out / "plain-id_2.json").read_text()) == {
        "id": "plain-id_2",
        "text": "two blue circles",
        "width": 32,
        "clip_score": 0.5,
        "image_embedding": EMBEDDINGS[1],
    }


@pytest.fixture(scope="module")
def ivf(tmp_path_factory):
    """4,000 vectors in 400 tight clusters, indexed as IVF64 (IVF forced by --exact-below):
    neighbours spread over many lists, so recall climbs slowly with nprobe."""
    root = tmp_path_factory.mktemp("ivf")
    ds = write_embeddings(root / "ds", clustered(4000, 32, seed=5, clusters=400))
    proc = mmtools("index", ds, "-o", root / "idx", "--exact-below", "100")
    return root, proc.stderr.decode().splitlines()[-1]


def _recall_at(reader, data: np.ndarray, nprobe: int) -> float:
    """Share of each row's ten neighbours (itself left out) by a scan of every list that a
    scan of `nprobe` lists finds, every row a query."""
    nlist = reader.manifest["plan"]["nlist"]
    _, truth = reader.search(data, 11, nlist)
    _, found = reader.search(data, 11, nprobe)
    hits = total = 0
    for own, t, f in zip(range(len(data)), truth, found, strict=True):
        want = [x for x in t if x != own][:10]
        hits += len(set(want) & {x for x in f if x != own})
        total += len(want)
    return hits / total


@needs_faiss
def test_index_nprobe_is_the_smallest_power_of_two_reaching_97_percent_recall(ivf):
    """Recall jumps from under 0.95 at 16 lists to over 0.98 at 32, so every row as a query
    and the build's own sample of queries agree on the answer."""
    from mmtools.io.index import IndexReader

    root, summary = ivf
    reader = IndexReader(str(root / "idx"))
    manifest = reader.manifest
    assert manifest["plan"]["factory"] == "IVF64,SQfp16"
    _, data = stored(root / "ds")
    recalls = {p: _recall_at(reader, data, p) for p in (1, 2, 4, 8, 16, 32, 64)}
    smallest = min(p for p, r in recalls.items() if r >= 0.97)
    assert smallest == 32 and recalls[16] < 0.95 and recalls[32] > 0.98
    assert manifest["nprobe"] == smallest
    assert manifest["recall_estimate"] >= 0.97
    assert (
        f"IVF64,SQfp16, nprobe 32 (recall@10 ~{manifest['recall_estimate']:.2f} vs all lists)"
        in summary
    )


def _ivf_top(index_dir, data: np.ndarray, query: int, nprobe: int, k: int) -> list[int]:
    """The `k` rows nearest row `query` among the rows in the `nprobe` lists whose centroids
    are nearest it, by brute force over the stored vectors."""
    import faiss

    index = faiss.read_index(str(next(index_dir.glob("index-*.faiss"))))
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    assigned = np.argmax(data @ centroids.T, axis=1)
    probed = np.argsort(-(centroids @ data[query]), kind="stable")[:nprobe]
    rows = np.flatnonzero(np.isin(assigned, probed))
    return rows[np.argsort(-(data[rows] @ data[query]), kind="stable")[:k]].tolist()


@needs_faiss
def test_search_nprobe_overrides_the_lists_the_build_chose(ivf):
    root, _ = ivf
    ids, data = stored(root / "ds")
    query = ids.index("r00469")

    def hits(*nprobe) -> list[str]:
        args = ["search", root / "idx", "--id", ids[query], "-k", "10", "--json", *nprobe]
        return [h["id"] for h in json.loads(mmtools(*args).stdout)["hits"]]

    expect = {p: [ids[i] for i in _ivf_top(root / "idx", data, query, p, 10)] for p in (1, 32, 64)}
    assert expect[1] != expect[32] != expect[64]
    assert hits() == expect[32]
    assert hits("--nprobe", "1") == expect[1]
    assert hits("--nprobe", "64") == expect[64]


@needs_faiss
def test_search_sheet_on_a_dataset_changed_since_the_index_is_refused(tmp_path):
    n = 12
    x = clustered(n, 8, seed=2)
    table = pa.table(
        {
            C.ID: [f"r{i:02d}" for i in range(n)],
            C.IMAGE: C.media_array([image_bytes(i) for i in range(n)], [None] * n),
            C.TEXT: [f"caption {i}" for i in range(n)],
            C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(
                pa.array(x.astype(np.float16).ravel()), 8
            ),
        }
    )
    ds, idx = tmp_path / "ds", tmp_path / "idx"
    ds.mkdir()
    pq.write_table(table, ds / "part-00000.parquet")
    mmtools("index", ds, "-o", idx, "-q")
    query = ["search", idx, "--id", "r03", "-k", "4"]
    mmtools(*query, "--sheet", tmp_path / "before.png", "-q")
    assert (tmp_path / "before.png").exists()
    edited = table.set_column(2, C.TEXT, pa.array([f"a new caption {i}" for i in range(n)]))
    pq.write_table(edited, ds / "part-00000.parquet")
    proc = mmtools(*query, "--sheet", tmp_path / "after.png", check=False)
    assert proc.returncode == 3
    assert proc.stderr.decode().splitlines()[-1] == (
        f"mmtools search: error: {idx} is out of date: a dataset it indexed changed since; "
        "rebuild it (mmtools index ... --overwrite)"
    )
    assert not (tmp_path / "after.png").exists()


@pytest.fixture
def with_a_broken_image(tmp_path):
    """Four rows of random images, the third of them not decodable."""
    images = [image_bytes(i, size=(40, 40)) for i in range(4)]
    images[2] = b"\xff\xd8\xff broken"
    table = pa.table(
        {
            C.ID: [f"r{i}" for i in range(4)],
            C.IMAGE: C.media_array(images, [None] * 4),
            C.TEXT: [f"caption {i}" for i in range(4)],
            "width": pa.array([40, 41, 42, 43], pa.int32()),
            C.CLIP_SCORE: pa.array([0.125, 0.25, 0.375, 0.5], pa.float32()),
        }
    )
    (tmp_path / "ds").mkdir()
    pq.write_table(table, tmp_path / "ds" / "part-00000.parquet")
    return tmp_path / "ds"


def _tile_values(page) -> list[list[str]]:
    """The value lines under each tile of a sheet's HTML page."""
    tiles = page.read_text().split('<div class="tile')[1:]
    return [re.findall(r"<div class=v>(.*?)</div>", t) for t in tiles]


def test_sheet_columns_pick_the_values_under_each_tile(with_a_broken_image, tmp_path):
    from PIL import Image

    def sheet(name, *args):
        png, page = tmp_path / f"{name}.png", tmp_path / f"{name}.html"
        mmtools("sheet", with_a_broken_image, "--cols", "4", *args, "-o", png, "--html", page)
        with Image.open(png) as img:
            return img.size, _tile_values(page)

    tw, th = tile_size(SheetConfig(), 2)
    size, values = sheet("two", "-c", "width,clip_score")
    assert size == (4 * tw, th)
    assert values == [
        ["width: 40", "clip_score: 0.1250"],
        ["width: 41", "clip_score: 0.2500"],
        ["width: 42", "clip_score: 0.3750"],
        ["width: 43", "clip_score: 0.5000"],
    ]
    size, values = sheet("default")
    assert size == (4 * tw, tile_size(SheetConfig(), 1)[1])
    assert values == [[f"clip_score: {v:.4f}"] for v in (0.125, 0.25, 0.375, 0.5)]
    _, values = sheet("sorted", "--sort", "width")
    assert values == [["width: 43"], ["width: 42"], ["width: 41"], ["width: 40"]]


def test_sheet_draws_an_undecodable_image_as_a_grey_tile_naming_the_reason(
    with_a_broken_image, tmp_path
):
    from PIL import Image

    png, page = tmp_path / "s.png", tmp_path / "s.html"
    mmtools("sheet", with_a_broken_image, "--cols", "4", "-o", png, "--html", page)
    config = SheetConfig(cols=4)
    tw, _ = tile_size(config, 1)
    with Image.open(png) as img:
        arr = np.asarray(img.convert("RGB"))
    side = config.tile
    areas = [arr[PAD : PAD + side, c * tw + PAD : c * tw + PAD + side] for c in range(4)]
    grey = [(a == PLAIN).all(axis=2).mean() for a in areas]
    red = [(np.abs(a.astype(int) - DROPPED).sum(axis=2) < 60).sum() for a in areas]
    assert PLAIN[0] == PLAIN[1] == PLAIN[2] and 100 < PLAIN[0] < 250
    assert grey[2] > 0.95 and red[2] > 20  # the box, and the reason written on it in red
    assert max(grey[0], grey[1], grey[3]) < 0.01
    assert '<div class="bad">corrupt</div>' in page.read_text()
    assert page.read_text().count('<div class="bad">') == 1
