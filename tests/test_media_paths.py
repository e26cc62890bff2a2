"""Datasets that store paths instead of bytes (local files and URLs) work in every step, and
the one media reader gives a bad row the same reject reason in every step."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, make_image_folder, mmtools, serve_images, wav_bytes
from test_embed import tiny_clip

from mmtools import columns as C
from mmtools.io.source import Source
from mmtools.media import MediaError, cells, read

N = 8


def rows(path) -> pa.Table:
    """All rows of a dataset directory."""
    src = Source([str(path)])
    return pa.Table.from_batches(list(src.batches()), src.schema)


def rejects(path) -> dict[str, str]:
    """id -> reason of a dataset's reject rows."""
    files = sorted((path / "_rejects").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    return (
        {}
        if table is None
        else dict(zip(table[C.ID].to_pylist(), table[C.REJECT_REASON].to_pylist(), strict=True))
    )


@pytest.fixture(scope="module")
def server():
    url, srv = serve_images()
    yield url
    srv.shutdown()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module", params=["local", "url"])
def path_only(request, tmp_path_factory, server):
    """A dataset of N images that holds paths only: local files, or URLs on a loopback server."""
    root = tmp_path_factory.mktemp(f"paths-{request.param}")
    if request.param == "local":
        listing = make_image_folder(root / "imgs", N)
    else:
        listing = root / "urls.csv"
        lines = "".join(f"{server}/img/{i},a photo number {i}\n" for i in range(N))
        listing.write_text("url,caption\n" + lines)
    mmtools("ingest", listing, "-o", root / "ds", "--paths-only", "-q")
    table = rows(root / "ds")
    assert table.num_rows == N
    assert table[C.IMAGE].combine_chunks().field("bytes").null_count == N
    return root


def test_a_path_only_dataset_goes_through_every_step(path_only, clip):
    root, model = path_only, ["--model", clip, "--pretrained", "none", "--device", "cpu"]
    steps = [
        ("embed", "ds", [*model]),
        ("score", "embedded", [*model]),
        ("filter", "scored", ["--where", "clip_score >= -1"]),
        ("dedup", "filtered", ["-m", "phash"]),
        ("mixup", "deduped", ["--keep-originals", "--seed", "1"]),
    ]
    for (step, src, args), out in zip(
        steps, ["embedded", "scored", "filtered", "deduped", "mixed"], strict=True
    ):
        mmtools(step, root / src, "-o", root / out, "-q", *args)
        assert rejects(root / out) == {}, step
    mixed = rows(root / "mixed").to_pylist()
    made = [r for r in mixed if r[C.MIXUP_PARENTS]]
    assert len(mixed) == 2 * N and len(made) == N
    assert all(r[C.IMAGE]["bytes"][:3] == b"\xff\xd8\xff" for r in made)  # mixed rows hold bytes
    proc = mmtools("export", root / "deduped", "--format", "webdataset", "-o", root / "wds")
    assert "without media 0" in proc.stderr.decode()
    with tarfile.open(root / "wds" / "00000.tar") as tar:
        assert sum(n.endswith(".jpg") for n in tar.getnames()) == N


def test_path_only_audio_through_filter_and_mixup(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(4):
        (folder / f"c{i}.wav").write_bytes(wav_bytes(seconds=1.5, freq=220.0 * (i + 1)))
        (folder / f"c{i}.txt").write_text(f"tone {i}")
    mmtools("ingest", folder, "-o", tmp_path / "ds", "--paths-only", "-q")
    mmtools("filter", tmp_path / "ds", "--preset", "audio-basic", "-o", tmp_path / "kept", "-q")
    assert rows(tmp_path / "kept").num_rows == 4 and rejects(tmp_path / "kept") == {}
    mmtools("mixup", tmp_path / "kept", "--mode", "audio-text", "-o", tmp_path / "mixed", "-q")
    mixed = rows(tmp_path / "mixed").to_pylist()
    assert len(mixed) == 4 and rejects(tmp_path / "mixed") == {}
    assert all(r[C.AUDIO]["bytes"][:4] == b"RIFF" for r in mixed)


GOOD = 12
BAD = {  # id -> (bytes, path, the reason every step gives)
    "gone": (None, "{root}/gone.jpg", "missing_file"),
    "http404": (None, "{server}/missing/1", "http_error"),
    "empty": (None, None, "no_media"),
    "zero": (b"", None, "zero_byte"),
    "notimage": (b"this is not an image", None, "not_image"),
    "corrupt": (b"\xff\xd8\xff\xe0" + bytes(64), None, "corrupt"),
}


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory, server):
    """A Parquet file of good rows, the bad rows of BAD, and a row whose image is null."""
    root = tmp_path_factory.mktemp("bad")
    good = [f"g{i:02d}" for i in range(GOOD)]
    ids = [*good, *BAD, "null"]
    data = [image_bytes(i, (64, 64)) for i in range(GOOD)] + [b for b, _, _ in BAD.values()]
    paths = [None] * GOOD + [p and p.format(root=root, server=server) for _, p, _ in BAD.values()]
    media = C.media_array([*data, None], [*paths, None])
    media = pa.StructArray.from_arrays(
        media.flatten(), fields=list(C.MEDIA_TYPE), mask=pa.array([i == "null" for i in ids])
    )
    text = [f"caption {i}" for i in ids]
    pq.write_table(pa.table({C.ID: ids, C.IMAGE: media, C.TEXT: text}), root / "in.parquet")
    return root


EXPECTED = {k: reason for k, (_, _, reason) in BAD.items()} | {"null": "no_media"}


@pytest.mark.parametrize(
    "step, args",
    [
        ("embed", ["--pretrained", "none", "--device", "cpu"]),
        ("dedup", ["-m", "phash"]),
        ("mixup", ["--seed", "3"]),
        ("rewrite", ["--backend", "template", "--mode", "caption"]),
    ],
)
def test_bad_media_get_one_reason_in_every_step(bad_media, clip, step, args):
    if step == "embed":
        args = ["--model", clip, *args]
    out = bad_media / step
    mmtools(step, bad_media / "in.parquet", "-o", out, "-q", *args)
    if step != "mixup":
        assert rejects(out) == EXPECTED
        return
    # mixup reads a row only when a pair needs it: a first parent whose partner failed is
    # dropped unread. Whatever it read has the one reason; what it did not read is unused.
    found = rejects(out)
    assert found.items() <= EXPECTED.items() and len(found) >= 4
    parents = {p for r in rows(out).to_pylist() for p in r[C.MIXUP_PARENTS]}
    assert not parents & set(EXPECTED)


def test_export_counts_media_it_cannot_write_by_the_same_reasons(bad_media, tmp_path):
    proc = mmtools("export", bad_media / "in.parquet", "--format", "jsonl", "-o", tmp_path / "j")
    # export copies bytes without decoding them: only reading (or an empty file) fails there
    assert "without media 5" in proc.stderr.decode()
    manifest = json.loads((tmp_path / "j" / "_export.json").read_text())
    reasons = {"http_error": 1, "missing_file": 1, "no_media": 2, "zero_byte": 1}
    assert manifest["without_media"] == reasons


def test_read_takes_every_form_of_a_cell(tmp_path, server):
    (tmp_path / "a.jpg").write_bytes(b"AAA")
    local = str(tmp_path / "a.jpg")
    for value in (
        {"bytes": b"XYZ", "path": local},
        (None, local),
        {"bytes": None, "path": "file://" + local},
        pa.scalar({"bytes": None, "path": local}, C.MEDIA_TYPE),
    ):
        assert read(value, "image") in (b"XYZ", b"AAA")
    assert read((None, f"{server}/img/3"), "image") == image_bytes(3)
    column = C.media_array([b"x", None], [None, local])
    assert [read(v, "image") for v in cells(column)] == [b"x", b"AAA"]
    for value, reason in [(None, "no_media"), ({"bytes": None, "path": ""}, "no_media")]:
        with pytest.raises(MediaError) as e:
            read(value, "image")
        assert e.value.reason == reason


def test_a_url_that_does_not_answer_in_time_is_a_timeout():
    url, srv = serve_images(delay=2.0)
    try:
        with pytest.raises(MediaError) as e:
            read((None, f"{url}/img/1"), "image", timeout=0.2)
    finally:
        srv.shutdown()
    assert e.value.reason == "timeout" and "timed out" in e.value.detail


def test_hugging_face_datasets_reads_path_only_datasets(tmp_path, server):
    datasets = pytest.importorskip("datasets")

    def load(ds, **kw):
        files = str(ds / "*.parquet")
        return datasets.load_dataset("parquet", data_files=files, split="train", **kw)

    folder = make_image_folder(tmp_path / "imgs", 3)
    mmtools("ingest", folder, "-o", tmp_path / "local", "--paths-only", "-q")
    local = load(tmp_path / "local", cache_dir=str(tmp_path / "hf"))
    assert local.features["image"] == datasets.Image()
    assert local[0]["image"].size == (48, 32)  # decoded from its local path
    listing = tmp_path / "urls.csv"
    listing.write_text("url,caption\n" + "".join(f"{server}/img/{i},c{i}\n" for i in range(3)))
    mmtools("ingest", listing, "-o", tmp_path / "urls", "--paths-only", "-q")
    urls = load(tmp_path / "urls", cache_dir=str(tmp_path / "hf2"))
    raw = urls.cast_column("image", datasets.Image(decode=False))
    assert {r["image"]["path"] for r in raw} == {f"{server}/img/{i}" for i in range(3)}
    assert all(r["image"]["bytes"] is None for r in raw)


PNGS = {f"p{i}.png": image_bytes(i, (40 + i, 24 + 2 * i), "PNG") for i in range(2)}
WAVS = {
    f"c{i}.wav": wav_bytes(0.25, sr, freq=220.0 * (i + 1)) for i, sr in enumerate([22050, 16000])
}


@pytest.fixture(scope="module")
def hf_media(tmp_path_factory):
    """An ingested dataset of PNGs and WAVs (bytes) as Hugging Face `datasets` loads it."""
    import datasets

    root = tmp_path_factory.mktemp("hf-media")
    (root / "media").mkdir()
    for name, data in {**PNGS, **WAVS}.items():
        (root / "media" / name).write_bytes(data)
        (root / "media" / name).with_suffix(".txt").write_text(f"caption of {name}")
    mmtools("ingest", root / "media", "-o", root / "ds", "-q")
    files = str(root / "ds" / "*.parquet")
    cache = str(root / "hf")
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)


def test_hugging_face_datasets_decodes_the_image_column(hf_media):
    import datasets
    from PIL import Image

    assert hf_media.features["image"] == datasets.Image()
    images = dict(zip(hf_media["id"], hf_media.select_columns(["image"])["image"], strict=True))
    assert {k for k, v in images.items() if v is not None} == set(PNGS)
    for name, data in PNGS.items():
        original = Image.open(io.BytesIO(data))
        assert images[name].size == original.size
        assert np.array_equal(np.asarray(images[name]), np.asarray(original))


def test_hugging_face_datasets_decodes_the_audio_column(hf_media):
    """From datasets 4.0 on, decoding audio needs torchcodec and FFmpeg: not test dependencies."""
    import datasets
    import soundfile as sf

    assert hf_media.features["audio"] == datasets.Audio()
    if int(datasets.__version__.split(".")[0]) >= 4:
        pytest.importorskip("torchcodec", reason="datasets >= 4 decodes audio with torchcodec")
    clips = dict(zip(hf_media["id"], hf_media.select_columns(["audio"])["audio"], strict=True))
    assert {k for k, v in clips.items() if v is not None} == set(WAVS)
    for name, data in WAVS.items():
        samples, rate = sf.read(io.BytesIO(data), dtype="float32")
        assert clips[name]["sampling_rate"] == rate
        assert np.array_equal(clips[name]["array"], samples)
