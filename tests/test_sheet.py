"""`mmtools sheet` and `stats --cut`: contact sheets a curator reads at a glance."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MMTOOLS, image_bytes, mmtools, photographs

from mmtools import columns as C
from mmtools.tools.sheet import DROPPED, KEPT, PAD, SheetConfig, tile_size

N = 30


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """30 rows with random images (one corrupt), captions and distinct clip scores; marked
    duplicate groups of 3, 2 and 2 rows."""
    root = tmp_path_factory.mktemp("sheet")
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.linspace(0.1, 0.9, N)).astype(np.float32)
    images = [image_bytes(i, size=(40 + i, 30)) for i in range(N)]
    images[5] = b"\xff\xd8\xff broken"
    cluster = [None] * N
    dup = [False] * N
    for c, members in {7: [4, 9, 20], 3: [2, 25], 8: [11, 12]}.items():
        for k, m in enumerate(members):
            cluster[m], dup[m] = c, k > 0
    table = pa.table(
        {
            C.ID: [f"row{i:02d}" for i in range(N)],
            C.IMAGE: C.media_array(images, [None] * N),
            C.TEXT: [f"a photo of thing number {i} with a rather long caption" for i in range(N)],
            C.CLIP_SCORE: pa.array(scores, pa.float32()),
            C.DUP_CLUSTER: pa.array(cluster, pa.int64()),
            C.IS_DUPLICATE: dup,
        }
    )
    (root / "ds").mkdir()
    pq.write_table(table.slice(0, 12), root / "ds" / "part-00000.parquet")
    pq.write_table(table.slice(12), root / "ds" / "part-00001.parquet")
    return root, table


def html_ids(path) -> list[str]:
    return re.findall(r"<div class=id>(.*?)</div>", path.read_text())


def tiles(img, config: SheetConfig, labels: int):
    """Each tile's thumbnail area as an array, in reading order."""
    tw, th = tile_size(config, labels)
    arr = np.asarray(img.convert("RGB"))
    rows, cols = arr.shape[0] // th, arr.shape[1] // tw
    return [
        arr[r * th + PAD : r * th + PAD + config.tile, c * tw + PAD : c * tw + PAD + config.tile]
        for r in range(rows)
        for c in range(cols)
    ]


def test_sheet_of_the_top_rows(scored, tmp_path):
    from PIL import Image

    root, table = scored
    out, page = tmp_path / "top.png", tmp_path / "top.html"
    args = ["-n", "10", "--cols", "4", "--sort", "clip_score", "-o", out, "--html", page]
    proc = mmtools("sheet", root / "ds", *args)
    assert "10 tiles" in proc.stderr.decode()
    config = SheetConfig(cols=4)
    tw, th = tile_size(config, 1)
    order = np.argsort(-table.column(C.CLIP_SCORE).to_numpy(), kind="stable")[:10]
    want = [table.column(C.ID)[int(i)].as_py() for i in order]
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (4 * tw, 3 * th)
        areas = tiles(img, config, 1)
    assert len(areas) == 12
    for area in areas[:10]:  # an image (or the grey box of the broken one) in every tile
        assert area.std() > 5 and (area < 250).any()
    assert all((a == 255).all() for a in areas[10:])  # the two blank tiles stay white
    assert html_ids(page) == want
    text = page.read_text()
    for i in order:
        assert f"clip_score: {table.column(C.CLIP_SCORE)[int(i)].as_py():.4f}" in text
    # The same sheet from a stream on stdin.
    produce = subprocess.Popen(
        [*MMTOOLS, "filter", root / "ds", "--where", "TRUE", "-q"], stdout=subprocess.PIPE
    )
    piped = subprocess.run(
        [*MMTOOLS, "sheet", "-", *map(str, args[:-2]), "-o", str(tmp_path / "piped.png")],
        stdin=produce.stdout,
        capture_output=True,
        timeout=120,
    )
    produce.stdout.close()
    assert produce.wait(timeout=60) == 0 and piped.returncode == 0, piped.stderr
    assert (tmp_path / "piped.png").read_bytes() == out.read_bytes()


def test_sheet_ascending_reverses_the_default_order(scored, tmp_path):
    root, table = scored
    runs = {"desc": ["-n", N], "asc": ["-n", N, "--ascending"], "low": ["-n", 5, "--ascending"]}
    pages = {name: tmp_path / f"{name}.html" for name in runs}
    for name, flags in runs.items():
        args = ["--sort", "clip_score", *flags, "-o", tmp_path / f"{name}.png"]
        mmtools("sheet", root / "ds", *args, "--html", pages[name], "-q")
    ids = table.column(C.ID).to_pylist()
    lowest_first = [ids[i] for i in np.argsort(table.column(C.CLIP_SCORE).to_numpy())]
    assert html_ids(pages["asc"]) == lowest_first
    assert html_ids(pages["desc"]) == lowest_first[::-1]
    assert html_ids(pages["low"]) == lowest_first[:5]


def test_sheet_around_a_cut_shows_kept_over_dropped(scored, tmp_path):
    from PIL import Image

    root, table = scored
    out, page = tmp_path / "cut.png", tmp_path / "cut.html"
    mmtools(
        "sheet",
        root / "ds",
        "--sort",
        "clip_score",
        "--around",
        "0.5",
        "-n",
        "16",
        "--cols",
        "4",
        "-o",
        out,
        "--html",
        page,
    )
    scores = table.column(C.CLIP_SCORE).to_numpy()
    ids = np.array(table.column(C.ID).to_pylist())
    above = np.flatnonzero(scores >= 0.5)
    below = np.flatnonzero(scores < 0.5)
    above = above[np.argsort(scores[above])][:8][::-1]
    below = below[np.argsort(-scores[below])][:8]
    assert html_ids(page) == [*ids[above], *ids[below]]
    assert page.read_text().index('class="cut"') < page.read_text().index(ids[below[0]])
    config = SheetConfig(cols=4)
    tw, th = tile_size(config, 1)
    with Image.open(out) as img:
        arr = np.asarray(img.convert("RGB"))
    assert arr.shape[:2] == (4 * th, 4 * tw)
    assert (arr[2 * th, :, :] == DROPPED).all()  # the cut, across the sheet
    assert tuple(arr[3, 3 * tw + 3]) == KEPT  # the frame of the last tile above the cut
    assert tuple(arr[2 * th + 20, 2]) == DROPPED  # ... and of the first one below it


def test_sheet_of_duplicate_groups(scored, tmp_path):
    from PIL import Image

    root, _ = scored
    out, page = tmp_path / "groups.png", tmp_path / "groups.html"
    mmtools("sheet", root / "ds", "--groups", "-n", "2", "--cols", "3", "-o", out, "--html", page)
    # Largest group first, then the group met first; the kept row leads its row.
    assert html_ids(page) == ["row04", "row09", "row20", "row02", "row25"]
    config = SheetConfig(cols=3)
    tw, th = tile_size(config, 0)
    with Image.open(out) as img:
        arr = np.asarray(img.convert("RGB"))
        areas = tiles(img, config, 0)
    assert arr.shape[:2] == (2 * th, 3 * tw)
    assert tuple(arr[3, 3]) == KEPT and tuple(arr[3, tw + 3]) == DROPPED
    assert (areas[5] == 255).all()  # the second group has two rows: one blank tile
    assert "kept, 1 of 3" in page.read_text()


def test_sheet_of_the_first_rows_reads_what_there_is(scored, tmp_path):
    from PIL import Image

    root, _ = scored
    proc = mmtools("sheet", root / "ds", "-n", "100", "--cols", "10", "-o", tmp_path / "all.png")
    assert f"{N} tiles" in proc.stderr.decode()
    tw, th = tile_size(SheetConfig(cols=10), 1)  # the clip_score under each tile
    with Image.open(tmp_path / "all.png") as img:
        assert img.size == (10 * tw, 3 * th)


def test_sheet_errors_are_one_line(scored, tmp_path):
    root, table = scored
    proc = mmtools("sheet", root / "ds", "--around", "0.5", "-o", tmp_path / "x.png", check=False)
    assert proc.returncode == 2 and "--around needs --sort" in proc.stderr.decode()
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(table.drop_columns([C.DUP_CLUSTER]), plain / "part-0.parquet")
    proc = mmtools("sheet", plain, "--groups", "-o", tmp_path / "x.png", check=False)
    assert proc.returncode == 3 and "dup_cluster" in proc.stderr.decode()
    assert proc.stderr.decode().count("\n") == 1


def test_stats_draws_and_counts_a_cut(scored, tmp_path):
    import json

    from PIL import Image

    root, table = scored
    args = ["stats", root / "ds", "-c", "clip_score", "--cut", "clip_score=0.5"]
    report = json.loads(mmtools(*args, "--json").stdout)
    scores = table.column(C.CLIP_SCORE).to_numpy()
    kept = int((scores >= np.float32(0.5)).sum())
    assert report["columns"]["clip_score"]["cut"] == {
        "value": 0.5,
        "kept": kept,
        "dropped": N - kept,
        "kept_fraction": round(kept / N, 4),
    }
    text = mmtools(*args).stdout.decode()
    assert f"cut clip_score >= 0.5: keeps {kept} ({kept / N:.1%}), drops {N - kept}" in text
    mmtools(*args, "--plot", tmp_path / "plots")
    with Image.open(tmp_path / "plots" / "clip_score.png") as img:
        arr = np.asarray(img.convert("RGB")).astype(int)
    red = (np.abs(arr - np.array([200, 40, 40])).sum(axis=2) < 30).sum(axis=0)
    assert red.max() > 100  # a vertical red line crosses the plot
    bad = mmtools("stats", root / "ds", "--cut", "clip_score", check=False)
    assert bad.returncode == 2 and "COLUMN=VALUE" in bad.stderr.decode()
    unknown = mmtools("stats", root / "ds", "--cut", "text=3", check=False)
    assert unknown.returncode == 2 and "not a numeric column" in unknown.stderr.decode()


def test_a_large_photograph_s_tile_is_drawn_from_a_reduced_decode_nearly_as_from_full_size():
    """A JPEG four times the tile or more decodes at reduced scale; the tile differs from one
    drawn from the full-size decode by a fraction of the picture's detail."""
    import io

    from PIL import Image

    from mmtools.media import decode_image
    from mmtools.tools.sheet import thumbnail

    photo = Image.open(io.BytesIO(photographs()["grace_hopper.jpg"]))
    buf = io.BytesIO()
    photo.resize((2048, 2400), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
    tile = thumbnail({"bytes": buf.getvalue(), "path": None}, 160)
    full = decode_image(buf.getvalue()).resize(tile.size, Image.Resampling.LANCZOS)
    assert tile.size == (137, 160)
    a, b = np.asarray(tile, np.float64), np.asarray(full, np.float64)
    assert not np.array_equal(a, b)  # drawn from the reduced decode
    assert 10 * np.log10(255**2 / ((a - b) ** 2).mean()) > 35  # PSNR, dB
