"""`ingest` listings as img2dataset users bring them: kept columns, LAION names, repeated URLs,
rejects that name their source, unsupported files and caption encodings."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    MMTOOLS,
    image_bytes,
    manifest_summary,
    mmtools,
    read_dataset,
    read_rejects,
    serve_images,
    wait_for,
)

from mmtools import columns as C


@pytest.fixture
def laion(tmp_path, http_server) -> tuple:
    """A LAION-style Parquet listing of four URLs on the loopback server, one of them a 404."""
    urls = [f"{http_server}/img/{i}" for i in range(3)] + [f"{http_server}/missing/3"]
    table = pa.table(
        {
            "URL": urls,
            "TEXT": [f"caption {i}" for i in range(4)],
            "similarity": pa.array([0.31, 0.29, 0.35, 0.4], pa.float64()),
            "punsafe": pa.array([0.01, 0.2, 0.0, 0.5], pa.float32()),
            "license": ["cc-by", None, "?", "cc0"],
            "nsfw": ["UNLIKELY", "UNLIKELY", "NSFW", "UNSURE"],
            "width": pa.array([640, 480, 320, 100], pa.int64()),  # the listing's claim
            "HEIGHT": pa.array([480, 360, 240, 100], pa.int32()),
        }
    )
    listing = tmp_path / "laion.parquet"
    pq.write_table(table, listing)
    return listing, urls


def _accounted(out) -> None:
    """in = out + rejected + dropped, from the run summary."""
    s = manifest_summary(out)
    assert s["rows_in"] == s["rows_out"] + s["rejected"] + sum(s["dropped"].values())


def test_laion_listing_keeps_every_column_with_its_type(tmp_path, laion):
    listing, urls = laion
    out = tmp_path / "out"
    mmtools("ingest", listing, "-o", out, "--timeout", 5, "-q")
    table = read_dataset(out)
    schema = table.schema
    # Standard columns first, then the listing's own, in its order; width renamed.
    extras = ["similarity", "punsafe", "license", "nsfw", "listing_width", "HEIGHT"]
    assert schema.names[-len(extras) :] == extras
    assert schema.names[0] == C.ID and C.TEXT_ENCODING in schema.names
    types = {"similarity": pa.float64(), "punsafe": pa.float32(), "license": pa.string()}
    types |= {"nsfw": pa.string(), "listing_width": pa.int64(), "HEIGHT": pa.int32()}
    for name, t in types.items():
        assert schema.field(name).type == t, name
    assert schema.field(C.WIDTH).type == pa.int32()
    rows = table.to_pylist()
    assert [r[C.SOURCE] for r in rows] == urls[:3]
    assert [r[C.TEXT] for r in rows] == ["caption 0", "caption 1", "caption 2"]
    assert [r["similarity"] for r in rows] == [0.31, 0.29, 0.35]
    assert [r["license"] for r in rows] == ["cc-by", None, "?"]
    assert [(r["listing_width"], r[C.WIDTH]) for r in rows] == [(640, 48), (480, 48), (320, 48)]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {"name": "similarity", "type": "double"} in manifest["schema"]
    rejects = read_rejects(out).to_pylist()
    assert [(r[C.REJECT_REASON], r[C.REJECT_SOURCE]) for r in rejects] == [("http_error", urls[3])]
    _accounted(out)


def test_drop_extra(tmp_path, laion):
    listing, _ = laion
    out = tmp_path / "out"
    mmtools("ingest", listing, "-o", out, "--timeout", 5, "-q", "--drop-extra")
    names = read_dataset(out).schema.names
    assert not {"similarity", "license", "listing_width", "HEIGHT"} & set(names)


def test_img2dataset_csv_names_are_found_and_types_inferred(tmp_path, http_server):
    listing = tmp_path / "l.csv"
    rows = [f"{http_server}/img/{i},a caption {i},{i * 0.5},{i}" for i in range(3)]
    listing.write_text("url,caption,score,count\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    mmtools("ingest", listing, "-o", out, "-q")
    table = read_dataset(out)
    assert table.column(C.TEXT).to_pylist() == [f"a caption {i}" for i in range(3)]
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("count").type == pa.int64()
    assert table.column("count").to_pylist() == [0, 1, 2]


def test_a_repeated_url_is_one_row_per_listing_row(tmp_path, http_server):
    url = f"{http_server}/img/7"
    listing = tmp_path / "l.jsonl"
    captions = ["a red fox", "fox in snow", "another url"]
    urls = [url, url, f"{http_server}/img/8"]
    listing.write_text(
        "".join(
            json.dumps({"URL": u, "TEXT": c}) + "\n" for u, c in zip(urls, captions, strict=True)
        )
    )
    for name in ("a", "b"):
        mmtools("ingest", listing, "-o", tmp_path / name, "-q")
    a, b = read_dataset(tmp_path / "a"), read_dataset(tmp_path / "b")
    assert a.column(C.TEXT).to_pylist() == captions
    ids = a.column(C.ID).to_pylist()
    assert len(set(ids)) == 3 and ids == b.column(C.ID).to_pylist()
    # A listing without repeats keeps the ids it always had: a hash of the URL.
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({"URL": url, "TEXT": "x"}) + "\n")
    mmtools("ingest", single, "-o", tmp_path / "c", "-q")
    assert read_dataset(tmp_path / "c").column(C.ID).to_pylist() == [ids[0]]
    assert read_rejects(tmp_path / "a") is None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_every_reject_names_its_source(tmp_path, http_server, image_folder):
    listing = tmp_path / "l.csv"
    missing = tmp_path / "gone.jpg"
    url = f"{http_server}/missing/1"
    listing.write_text(f"path,caption\n{url},404\n{missing},gone\n{image_folder}/img00001.jpg,ok\n")
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "000000001.jpg", image_bytes(1))
        _add(tar, "000000002.jpg", image_bytes(2)[:200])  # truncated
        _add(tar, "000000003.json", b"{}")  # no media
    out = tmp_path / "out"
    mmtools("ingest", listing, shard, "-o", out, "--timeout", 5, "-q")
    rejects = {r[C.REJECT_SOURCE]: r[C.REJECT_REASON] for r in read_rejects(out).to_pylist()}
    assert rejects[url] == "http_error"  # a 404
    assert rejects[str(missing)] == "missing_file"
    assert rejects[f"{shard}::000000002"] in ("truncated", "corrupt")
    assert rejects[f"{shard}::000000003"] == "no_media"
    assert len(rejects) == 4
    assert read_dataset(out).num_rows == 2
    _accounted(out)


def test_folder_counts_unsupported_files_and_reads_pillow_formats(tmp_path):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.jpg").write_bytes(image_bytes(1))
    (d / "b.ppm").write_bytes(image_bytes(2, fmt="PPM"))
    (d / "c.tga").write_bytes(image_bytes(3, fmt="TGA"))
    (d / "d.ico").write_bytes(image_bytes(4, size=(32, 32), fmt="ICO"))
    (d / "b.txt").write_text("a ppm picture")
    for name in ("x.svg", "y.svg", "z.xyz"):
        (d / name).write_text("<svg/>")
    (d / ".DS_Store").write_bytes(b"\0")
    out = tmp_path / "out"
    proc = mmtools("ingest", d, "-o", out, "-v")
    err = proc.stderr.decode()
    assert "skipped 3 unsupported: .svg 2, .xyz 1" in err
    assert f"skipped {d / 'z.xyz'}" in err and ".DS_Store" not in err
    rows = {r[C.ID]: r for r in read_dataset(out).to_pylist()}
    assert set(rows) == {"a.jpg", "b.ppm", "c.tga", "d.ico"}
    assert rows["b.ppm"][C.TEXT] == "a ppm picture"
    assert (rows["b.ppm"][C.IMAGE_FORMAT], rows["b.ppm"][C.WIDTH]) == ("ppm", 48)
    assert Image.open(io.BytesIO(rows["c.tga"][C.IMAGE]["bytes"])).size == (48, 32)
    assert manifest_summary(out)["skipped"] == {".svg": 2, ".xyz": 1}
    _accounted(out)


def test_caption_encodings(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("utf8", "latin", "binary", "json"):
        (d / f"{name}.jpg").write_bytes(image_bytes(len(name)))
    (d / "utf8.txt").write_text("café crème", encoding="utf-8")
    (d / "latin.txt").write_bytes("café “quoted” – 5€".encode("cp1252"))
    (d / "binary.txt").write_bytes(b"\x81\x8d\x00\x9d\xff\x00garbage")
    (d / "json.json").write_bytes(
        json.dumps({"caption": "naïve"}, ensure_ascii=False).encode("cp1252")
    )
    out = tmp_path / "out"
    mmtools("ingest", d, "-o", out, "-q")
    rows = {r[C.ID]: r for r in read_dataset(out).to_pylist()}
    assert rows["utf8.jpg"][C.TEXT] == "café crème" and rows["utf8.jpg"][C.TEXT_ENCODING] is None
    assert rows["latin.jpg"][C.TEXT] == "café “quoted” – 5€"
    assert rows["latin.jpg"][C.TEXT_ENCODING] == "cp1252"
    assert (rows["json.jpg"][C.TEXT], rows["json.jpg"][C.TEXT_ENCODING]) == ("naïve", "cp1252")
    (reject,) = read_rejects(out).to_pylist()
    assert (reject[C.ID], reject[C.REJECT_REASON]) == ("binary.jpg", "bad_caption")
    assert reject[C.REJECT_SOURCE] == str(d / "binary.jpg")
    assert "binary.txt" in reject[C.REJECT_DETAIL]
    _accounted(out)


def test_old_rejects_without_source_resume_and_read(tmp_path):
    """A run begun before rejects carried their source resumes; its rejects read as null."""
    url, server = serve_images(delay=0.05)
    try:
        listing = tmp_path / "l.csv"
        paths = [f"/missing/{i}" if i % 10 == 3 else f"/img/{i}" for i in range(120)]
        listing.write_text("url,caption\n" + "".join(f"{url}{p},c\n" for p in paths))
        out = tmp_path / "out"
        args = ["ingest", listing, "-o", out, "--shard-rows", 20, "-q", "--workers", 4]
        proc = subprocess.Popen([*MMTOOLS, *map(str, args)], stderr=subprocess.PIPE)
        wait_for(out / "_progress" / "00001.json", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        old = sorted((out / "_rejects").glob("part-*.parquet"))
        assert old
        for f in old:  # as an older mmtools wrote them
            pq.write_table(pq.read_table(f).drop_columns([C.REJECT_SOURCE]), f)
        mmtools(*args)
    finally:
        server.shutdown()
    rejects = read_rejects(out)
    assert rejects.schema.equals(C.REJECT_SCHEMA)
    sources = rejects.column(C.REJECT_SOURCE).to_pylist()
    assert len(sources) == 12 and None in sources
    assert {s for s in sources if s} <= {f"{url}{p}" for p in paths}
    assert any(sources)


def test_later_steps_name_the_source_of_their_rejects(tmp_path, image_folder):
    ds = tmp_path / "ds"
    mmtools("ingest", image_folder, "-o", ds, "--paths-only", "-q")
    gone = image_folder / "img00004.jpg"
    gone.unlink()
    out = tmp_path / "dedup"
    mmtools("dedup", ds, "--method", "phash", "-o", out, "-q")
    (reject,) = read_rejects(out).to_pylist()
    assert (reject[C.ID], reject[C.REJECT_REASON]) == ("img00004.jpg", "missing_file")
    assert reject[C.REJECT_SOURCE] == str(gone)
