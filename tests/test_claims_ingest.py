"""README claims about `ingest`: resized images' columns and pixels, listing column names,
what a WebDataset sample's .json and .npy members become, audio hashes, the JPEG scan limit,
and the retry backoff of downloads and of `rewrite`."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, image_bytes, jpeg_scans, read_dataset, read_rejects, wav_bytes
from PIL import Image

from mmtools import columns as C
from mmtools import engines
from mmtools.io.dataset import DatasetSink
from mmtools.steps.ingest.listing import ListingOptions
from mmtools.steps.ingest.resize import ResizeOptions
from mmtools.steps.ingest.step import Ingest, IngestConfig, ListingSource


def ingest(out: Path, *inputs, listing: ListingOptions | None = None, **config) -> Path:
    """`inputs` ingested into the dataset `out` in this process, as `mmtools ingest` does."""
    listing = listing or ListingOptions()
    source = ListingSource([str(p) for p in inputs], listing)
    step = Ingest(IngestConfig(listing=listing, **config), source.kinds, workers=2)
    engines.run("ingest", source, [step], DatasetSink(str(out)), quiet=True)
    return out


def rows_by_id(out: Path) -> dict[str, dict]:
    return {r[C.ID]: r for r in read_dataset(out).to_pylist()}


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# -- resizing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resize",
    [
        ResizeOptions(image_size=32, resize_mode="keep_ratio"),
        ResizeOptions(encode_format="png"),  # re-encoded at its own size
    ],
    ids=["keep_ratio", "encode_format"],
)
def test_original_width_and_height_are_int32_columns_holding_the_source_size(tmp_path, resize):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "wide.jpg").write_bytes(image_bytes(0, size=(96, 48)))
    out = ingest(tmp_path / "ds", folder, resize=resize)
    shard = sorted(out.glob("*.parquet"))[0]
    for schema in (pq.read_schema(shard), read_dataset(out).schema):
        assert schema.field(C.ORIGINAL_WIDTH).type == pa.int32()
        assert schema.field(C.ORIGINAL_HEIGHT).type == pa.int32()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {"name": C.ORIGINAL_WIDTH, "type": "int32"} in manifest["schema"]
    assert {"name": C.ORIGINAL_HEIGHT, "type": "int32"} in manifest["schema"]
    row = rows_by_id(out)["wide.jpg"]
    assert (row[C.ORIGINAL_WIDTH], row[C.ORIGINAL_HEIGHT]) == (96, 48)


def test_border_padding_of_an_odd_number_of_pixels_puts_the_odd_one_bottom_and_right(tmp_path):
    """128x50 black -> 64x25 in a 64x64 square: 39 white rows, 19 above and 20 below (and
    the same turned on its side: 19 white columns left, 20 right)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    black = np.zeros((50, 128, 3), np.uint8)
    (folder / "wide.png").write_bytes(encode(Image.fromarray(black), "PNG"))
    (folder / "tall.png").write_bytes(encode(Image.fromarray(black.transpose(1, 0, 2)), "PNG"))
    resize = ResizeOptions(image_size=64, resize_mode="border", encode_format="png")
    rows = rows_by_id(ingest(tmp_path / "ds", folder, resize=resize))
    wide, tall = (
        cv2.imdecode(np.frombuffer(rows[k][C.IMAGE]["bytes"], np.uint8), cv2.IMREAD_COLOR)
        for k in ("wide.png", "tall.png")
    )
    assert wide.shape == tall.shape == (64, 64, 3)
    white_rows = [bool((wide[y] == 255).all()) for y in range(64)]
    black_rows = [bool((wide[y] == 0).all()) for y in range(64)]
    assert white_rows == [True] * 19 + [False] * 25 + [True] * 20
    assert black_rows == [False] * 19 + [True] * 25 + [False] * 20
    white_columns = [bool((tall[:, x] == 255).all()) for x in range(64)]
    assert white_columns == [True] * 19 + [False] * 25 + [True] * 20
    assert (tall[:, 19:44] == 0).all()


def test_a_resized_images_media_cell_still_names_its_source_file(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    source = image_bytes(1, size=(90, 60), fmt="PNG")
    (folder / "photo.png").write_bytes(source)
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "000000007.png", source)
    resize = ResizeOptions(image_size=30, resize_mode="keep_ratio")
    rows = rows_by_id(ingest(tmp_path / "ds", folder, shard, resize=resize))
    photo, member = rows["photo.png"], rows["00000/000000007"]
    assert photo[C.IMAGE]["path"] == str(folder / "photo.png")
    assert member[C.IMAGE]["path"] == f"{shard}::000000007"
    for row in (photo, member):  # the cell holds the resized JPEG, not the source's bytes
        assert (row[C.WIDTH], row[C.HEIGHT], row[C.IMAGE_FORMAT]) == (45, 30, "jpeg")
        assert row[C.IMAGE]["bytes"] != source and row[C.IMAGE]["bytes"][:2] == b"\xff\xd8"


# -- listings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path_col", "caption_col"),
    [
        ("URL", "TEXT"),
        ("url", "caption"),
        ("path", "alt"),
        ("file", "title"),
        ("File", "Title"),
        ("PATH", "ALT"),
    ],
)
def test_listing_path_and_caption_columns_are_found_by_name_in_any_case(
    tmp_path, path_col, caption_col
):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        (folder / f"img{i}.jpg").write_bytes(image_bytes(i))
    listing = tmp_path / "list.csv"
    lines = [f"{path_col},{caption_col},uid"]
    lines += [f"{folder / f'img{i}.jpg'},caption {i},u{i}" for i in range(2)]
    listing.write_text("\n".join(lines) + "\n")
    table = read_dataset(ingest(tmp_path / "ds", listing))
    assert table.column(C.TEXT).to_pylist() == ["caption 0", "caption 1"]
    cells = table.column(C.IMAGE).to_pylist()
    assert [c["bytes"] for c in cells] == [image_bytes(0), image_bytes(1)]
    assert [c["path"] for c in cells] == [str(folder / f"img{i}.jpg") for i in range(2)]
    # The picked columns are the media and the caption; only the other one is kept as it is.
    assert table.column_names[-1] == "uid" and path_col not in table.column_names
    assert caption_col not in table.column_names


def test_laion_listing_keeps_clip_score_and_turns_lists_of_numbers_into_embeddings(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(3):
        paths.append(str(folder / f"img{i}.jpg"))
        (folder / f"img{i}.jpg").write_bytes(image_bytes(i))
    image_vectors = [[0.5, -0.5, 0.5, -0.5], [1.0, 0.0, 0.0, 0.0], [0.0, 0.6, 0.8, 0.0]]
    text_vectors = [[0.0, 0.0, 1.0], [0.6, 0.8, 0.0], [1.0, 0.0, 0.0]]
    listing = tmp_path / "laion.parquet"
    table = pa.table(
        {
            "URL": paths,
            "TEXT": [f"caption {i}" for i in range(3)],
            "clip_score": pa.array([0.31, 0.25, 0.4], pa.float32()),
            "image_embedding": pa.array(image_vectors, pa.list_(pa.float64())),
            "text_embedding": pa.array(text_vectors, pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, listing)
    out = read_dataset(ingest(tmp_path / "ds", listing))
    assert out.column_names[-3:] == ["clip_score", "image_embedding", "text_embedding"]
    assert not any(n.startswith(C.LISTING_PREFIX) for n in out.column_names)
    assert out.schema.field("clip_score").type == pa.float32()
    assert out.column("clip_score").to_pylist() == pytest.approx([0.31, 0.25, 0.4])
    assert out.schema.field(C.IMAGE_EMBEDDING).type == pa.list_(pa.float32(), 4)
    assert out.schema.field(C.TEXT_EMBEDDING).type == pa.list_(pa.float32(), 3)
    for name, vectors in ((C.IMAGE_EMBEDDING, image_vectors), (C.TEXT_EMBEDDING, text_vectors)):
        got = np.asarray(out.column(name).to_pylist(), np.float32)
        assert np.array_equal(got, np.asarray(vectors, np.float32)), name


# -- WebDataset tars and folders --------------------------------------------------------------


def test_a_samples_json_text_is_its_caption_when_it_has_no_txt_and_no_json_caption(tmp_path):
    """.txt first, then the .json's `caption`, then its `text`: in a folder and in a tar."""
    samples = {  # name -> (.txt or None, .json)
        "text_only": (None, {"text": "from the text field", "site": "a"}),
        "both_fields": (None, {"caption": "from the caption field", "text": "not this"}),
        "with_txt": ("from the txt file", {"text": "not this either"}),
    }
    folder = tmp_path / "imgs"
    folder.mkdir()
    shard = tmp_path / "tars" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i, (name, (txt, meta)) in enumerate(samples.items()):
            (folder / f"{name}.jpg").write_bytes(image_bytes(i))
            (folder / f"{name}.json").write_text(json.dumps(meta))
            add(tar, f"{name}.jpg", image_bytes(i))
            add(tar, f"{name}.json", json.dumps(meta).encode())
            if txt is not None:
                (folder / f"{name}.txt").write_text(txt)
                add(tar, f"{name}.txt", txt.encode())
    rows = rows_by_id(ingest(tmp_path / "ds", folder, shard))
    expected = {
        "text_only": "from the text field",
        "both_fields": "from the caption field",
        "with_txt": "from the txt file",
    }
    assert {k: rows[f"{k}.jpg"][C.TEXT] for k in samples} == expected
    assert {k: rows[f"00000/{k}"][C.TEXT] for k in samples} == expected
    assert rows["text_only.jpg"]["site"] == "a" and rows["00000/text_only"]["site"] == "a"


def test_a_tar_samples_json_fields_and_npy_members_become_columns(tmp_path):
    shard = tmp_path / "00000.tar"
    vectors = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            key = f"{i:09d}"
            meta = {"key": key, "similarity": 0.3 + i / 10, "width": 640 + i, "caption": "c"}
            if i < 2:
                meta["status"] = "success"
                add(tar, f"{key}.clip_vec.npy", npy(vectors[i]))
            add(tar, f"{key}.jpg", image_bytes(i))
            add(tar, f"{key}.txt", f"caption {i}".encode())
            add(tar, f"{key}.json", json.dumps(meta).encode())
    table = read_dataset(ingest(tmp_path / "ds", shard))
    kept = ["key", "similarity", "listing_width", "status", "clip_vec"]
    assert sorted(table.column_names[-len(kept) :]) == sorted(kept)
    assert "caption" not in table.column_names  # the caption, not a column
    types = {"key": pa.string(), "similarity": pa.float64(), "listing_width": pa.int64()}
    types |= {"status": pa.string(), "clip_vec": pa.list_(pa.float32(), 4)}
    assert {n: table.schema.field(n).type for n in kept} == types
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(3)]
    assert [r["similarity"] for r in rows] == pytest.approx([0.3, 0.4, 0.5])
    assert [(r["listing_width"], r[C.WIDTH]) for r in rows] == [(640, 48), (641, 48), (642, 48)]
    assert [r["status"] for r in rows] == ["success", "success", None]
    assert [r["clip_vec"] for r in rows[:2]] == vectors.tolist() and rows[2]["clip_vec"] is None
    assert [r[C.TEXT] for r in rows] == ["caption 0", "caption 1", "caption 2"]


def test_id_col_leaves_a_tar_sample_without_the_field_its_own_id(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            key = f"{i:09d}"
            add(tar, f"{key}.jpg", image_bytes(i))
            add(tar, f"{key}.txt", f"caption {i}".encode())
            if i < 2:
                add(tar, f"{key}.json", json.dumps({"key": f"laion-{i}"}).encode())
            elif i == 2:  # a .json without the field
                add(tar, f"{key}.json", json.dumps({"status": "success"}).encode())
            # sample 3 has no .json at all
    out = ingest(tmp_path / "ds", shard, listing=ListingOptions(id_col="key"))
    ids = {r[C.TEXT]: r[C.ID] for r in read_dataset(out).to_pylist()}
    assert ids == {
        "caption 0": "laion-0",
        "caption 1": "laion-1",
        "caption 2": "00000/000000002",
        "caption 3": "00000/000000003",
    }


# -- audio ----------------------------------------------------------------------------------


def test_audio_ingest_records_each_files_byte_count_and_sha256(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    files = {
        "a.wav": wav_bytes(0.25, sr=16000),
        "b.flac": wav_bytes(0.5, sr=22050, channels=2, fmt="FLAC"),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    rows = rows_by_id(ingest(tmp_path / "ds", folder))
    assert set(rows) == set(files)
    for name, data in files.items():
        assert rows[name][C.AUDIO_NBYTES] == len(data) == (folder / name).stat().st_size
        assert rows[name][C.AUDIO_SHA256] == hashlib.sha256(data).hexdigest()
        assert rows[name][C.AUDIO]["bytes"] == data


# -- the JPEG scan limit --------------------------------------------------------------------


def jpeg_withjpeg_scans(total: int) -> bytes:
    """A small progressive JPEG of exactly `total` scans (its last scan repeated)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 48, 3), np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG", progressive=True, quality=90)
    scans = jpeg_scans(data)
    start, end = scans[-1]
    out = data[:start] + data[start:end] * (total - len(scans) + 1) + data[end:]
    assert len(jpeg_scans(out)) == out.count(b"\xff\xda") == total
    return out


def test_a_jpeg_of_100_scans_is_ingested_and_one_of_101_is_a_decompression_bomb(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "scans100.jpg").write_bytes(jpeg_withjpeg_scans(100))
    (folder / "scans101.jpg").write_bytes(jpeg_withjpeg_scans(101))
    out = ingest(tmp_path / "ds", folder)
    row = rows_by_id(out)["scans100.jpg"]
    assert (row[C.WIDTH], row[C.HEIGHT], row[C.IMAGE_FORMAT]) == (48, 32, "jpeg")
    rejects = {r[C.ID]: r[C.REJECT_REASON] for r in read_rejects(out).to_pylist()}
    assert rejects == {"scans101.jpg": "decompression_bomb"}


# -- retry backoff --------------------------------------------------------------------------


def test_download_backoff_waits_up_to_half_a_second_then_doubles_with_jitter():
    """The wait before retry k (k = 0, 1, ...): at most 0.5·2^k s, drawn at random below it."""
    from mmtools.io.http import _backoff

    state = random.getstate()
    random.seed(1234)
    try:
        draws = {k: [_backoff(k) for _ in range(2000)] for k in range(4)}
    finally:
        random.setstate(state)
    for k, waits in draws.items():
        cap = 0.5 * 2**k
        assert min(waits) > 0 and max(waits) <= cap, k
        assert max(waits) > 0.98 * cap, k  # "up to": the cap itself is reached
        assert max(waits) - min(waits) > 0.4 * cap, k  # jittered, not one fixed wait


def test_rewrite_retries_wait_longer_each_time(tmp_path):
    """--backoff 0.1: the waits before retries 1, 2, 3 are at least half of 0.1, 0.2, 0.4 s
    (jittered below those caps), so the last is at least twice the first one's cap."""
    from llm_server import LLMServer

    from mmtools.steps.rewrite.openai_backend import OpenAIBackend, OpenAIOptions
    from mmtools.steps.rewrite.prompts import Request

    with LLMServer() as server:
        options = OpenAIOptions(server.url, "m", concurrency=1, timeout=5, retries=3, backoff=0.1)
        backend = OpenAIBackend(options)
        backend.load()
        try:
            [outcome] = backend.generate([Request("a", "FAIL this row")], lambda i, text: None)
        finally:
            backend.close()
    assert outcome.text is None and "4 attempts" in outcome.error
    gaps = np.diff(server.times)
    assert len(gaps) == 3
    for k, gap in enumerate(gaps):
        assert gap >= 0.5 * 0.1 * 2**k, (k, gaps)
    assert gaps[2] >= 2 * 0.1  # not a constant wait: exponential growth
