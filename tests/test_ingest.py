"""`mmtools ingest` from every kind of source, with real files and a real HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, mmtools, read_dataset, read_rejects, wav_bytes


def test_folder_with_sidecars(tmp_path, image_folder):
    (image_folder / "json_caption.png").write_bytes(image_bytes(99, fmt="PNG"))
    (image_folder / "json_caption.json").write_text(json.dumps({"caption": "from json"}))
    (image_folder / "no_caption.jpg").write_bytes(image_bytes(98))
    (image_folder / "notes.md").write_text("ignored: not media")
    out = tmp_path / "out"
    proc = mmtools("ingest", image_folder, "-o", out, "--shard-rows", 10)
    table = read_dataset(out)
    assert table.num_rows == 32
    assert len(set(table.column("id").to_pylist())) == 32
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["json_caption.png"]["text"] == "from json"
    assert rows["json_caption.png"]["image_format"] == "png"
    assert rows["no_caption.jpg"]["text"] is None
    first = rows["img00001.jpg"]
    data = (image_folder / "img00001.jpg").read_bytes()
    assert first["image"]["bytes"] == data
    assert first["image_sha256"] == hashlib.sha256(data).hexdigest()
    assert (first["width"], first["height"], first["image_nbytes"]) == (48, 32, len(data))
    assert first["text"] == "a photo number 1"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == 32 and len(manifest["shards"]) == 4
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 10, 2]
    assert "mmtools ingest: 32 in, 32 out, 0 rejected" in proc.stderr.decode()


def test_ids_are_deterministic(tmp_path, image_folder):
    mmtools("ingest", image_folder, "-o", tmp_path / "a", "-q")
    mmtools("ingest", image_folder, "-o", tmp_path / "b", "-q", "--shard-rows", 7)
    a, b = read_dataset(tmp_path / "a"), read_dataset(tmp_path / "b")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert a.column("image_sha256").equals(b.column("image_sha256"))


def test_audio_folder(tmp_path):
    d = tmp_path / "clips"
    d.mkdir()
    (d / "a.wav").write_bytes(wav_bytes(1.0, sr=16000, channels=1))
    (d / "a.txt").write_text("a beep")
    (d / "b.flac").write_bytes(wav_bytes(0.5, sr=44100, channels=2, fmt="FLAC"))
    (d / "noise.wav").write_bytes(b"this is not audio at all")
    (d / "empty.wav").write_bytes(wav_bytes(0.0))
    out = tmp_path / "out"
    mmtools("ingest", d, "-o", out)
    rows = {r["id"]: r for r in read_dataset(out).to_pylist()}
    assert set(rows) == {"a.wav", "b.flac"}
    assert rows["a.wav"]["sample_rate"] == 16000 and rows["a.wav"]["channels"] == 1
    assert rows["a.wav"]["duration"] == pytest.approx(1.0)
    assert rows["a.wav"]["text"] == "a beep"
    assert rows["b.flac"]["sample_rate"] == 44100 and rows["b.flac"]["channels"] == 2
    assert rows["b.flac"]["audio_format"] == "flac"
    rejects = {r["id"]: r["reason"] for r in read_rejects(out).to_pylist()}
    assert rejects == {"noise.wav": "not_audio", "empty.wav": "empty_audio"}


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_listing_files(tmp_path, image_folder, fmt):
    paths = sorted(p.name for p in image_folder.glob("*.jpg"))[:5]
    table = pa.table(
        {"file": paths, "alt": [f"alt {p}" for p in paths], "uid": [f"u{i}" for i in range(5)]}
    )
    listing = image_folder / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, listing)
    elif fmt == "jsonl":
        listing.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    else:
        sep = "\t" if fmt == "tsv" else ","
        lines = [sep.join(table.column_names)] + [sep.join(r.values()) for r in table.to_pylist()]
        listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    mmtools(
        "ingest",
        listing,
        "-o",
        out,
        "--path-col",
        "file",
        "--caption-col",
        "alt",
        "--id-col",
        "uid",
    )
    rows = read_dataset(out).to_pylist()
    assert [r["id"] for r in rows] == [f"u{i}" for i in range(5)]
    assert [r["text"] for r in rows] == [f"alt {p}" for p in paths]
    assert rows[0]["image"]["bytes"] == (image_folder / paths[0]).read_bytes()


def test_listing_unknown_column_is_a_clear_error(tmp_path, image_folder):
    listing = tmp_path / "l.csv"
    listing.write_text("where,what\nx.jpg,cap\n")
    proc = mmtools("ingest", listing, "-o", tmp_path / "o", check=False)
    assert proc.returncode == 2
    err = proc.stderr.decode().strip()
    assert err.startswith("mmtools ingest: error:") and "--path-col" in err
    assert "Traceback" not in err


def test_listing_of_urls(tmp_path, http_server):
    listing = tmp_path / "urls.csv"
    urls = [f"{http_server}/img/{i}" for i in range(4)] + [f"{http_server}/missing/1"]
    listing.write_text("url,caption\n" + "".join(f"{u},cap {i}\n" for i, u in enumerate(urls)))
    out = tmp_path / "out"
    mmtools("ingest", listing, "-o", out, "--timeout", 5)
    rows = read_dataset(out).to_pylist()
    assert len(rows) == 4
    assert rows[2]["image"]["bytes"] == image_bytes(2)
    assert rows[2]["source"] == urls[2]
    rejects = read_rejects(out).to_pylist()
    assert [r["reason"] for r in rejects] == ["http_error"]
    assert "404" in rejects[0]["detail"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            key = f"{i:09d}"
            _add(tar, f"{key}.jpg", image_bytes(i))
            _add(tar, f"{key}.txt", f"caption {i}".encode())
            _add(tar, f"{key}.json", json.dumps({"key": key, "caption": "json"}).encode())
        _add(tar, "000000009.json", json.dumps({"status": "failed_to_download"}).encode())
    out = tmp_path / "out"
    mmtools("ingest", shard, "-o", out)
    rows = read_dataset(out).to_pylist()
    assert [r["id"] for r in rows] == [f"00000/{i:09d}" for i in range(6)]
    assert [r["text"] for r in rows] == [f"caption {i}" for i in range(6)]
    assert rows[3]["image"]["bytes"] == image_bytes(3)
    assert [r["reason"] for r in read_rejects(out).to_pylist()] == ["no_media"]


def test_paths_only(tmp_path, image_folder):
    out = tmp_path / "out"
    mmtools("ingest", image_folder, "-o", out, "--paths-only")
    row = read_dataset(out).to_pylist()[0]
    assert row["image"]["bytes"] is None
    with open(row["image"]["path"], "rb") as f:
        assert f.read(3) == b"\xff\xd8\xff"
    assert row["width"] == 48


def test_tar_members_keep_their_bytes_under_paths_only(tmp_path):
    """A tar member has no path of its own: --paths-only keeps its bytes, says so once, and
    later steps read them (a path-only file beside it stays a path)."""
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            _add(tar, f"{i:09d}.jpg", image_bytes(i))
            _add(tar, f"{i:09d}.txt", f"caption {i}".encode())
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "loose.jpg").write_bytes(image_bytes(7))
    out = tmp_path / "out"
    proc = mmtools("ingest", shard, tmp_path / "folder", "-o", out, "--paths-only")
    warning = "mmtools: --paths-only: members of a tar have no path of their own; kept as bytes"
    assert proc.stderr.decode().count(warning) == 1
    cells = {r["id"]: r["image"] for r in read_dataset(out).to_pylist()}
    assert {k: c["bytes"] for k, c in cells.items() if k.startswith("00000/")} == {
        f"00000/{i:09d}": image_bytes(i) for i in range(3)
    }
    assert cells["loose.jpg"] == {"bytes": None, "path": str(tmp_path / "folder" / "loose.jpg")}
    mmtools("dedup", out, "-m", "phash", "-o", tmp_path / "deduped")
    assert read_dataset(tmp_path / "deduped").num_rows == 4


def ingest_threads(inputs: list[str], workers: int) -> tuple[int, dict[str, int]]:
    """Ingest `inputs` with `workers` threads; the rows made and how many threads the step
    started, by pool (a pool starts a thread per task until it is full)."""
    import collections
    import threading

    from mmtools.steps.ingest.listing import ListingOptions
    from mmtools.steps.ingest.step import Ingest, IngestConfig, ListingSource

    before = set(threading.enumerate())
    source = ListingSource(inputs, ListingOptions())
    step = Ingest(IngestConfig(), source.kinds, workers=workers)
    step.output_schema(source.schema)
    step.setup()
    try:
        rows = sum(r.batch.num_rows for r in step.run(source.batches(batch_size=64)))
        started = [t.name for t in set(threading.enumerate()) - before]
        return rows, dict(collections.Counter(n.split("_")[0] for n in started if "ingest" in n))
    finally:
        step.close()


def test_local_files_take_one_thread_per_cpu_urls_all_workers(tmp_path, slow_listing):
    """Threads past one per CPU only contend for Python's lock on local files (8 take about
    twice as long as 2 on small JPEGs); a URL waits on the network, so every worker helps."""
    from conftest import make_image_folder

    from mmtools.models.device import cpus

    folder = make_image_folder(tmp_path / "imgs", 64)
    assert ingest_threads([str(folder)], workers=cpus() + 8) == (64, {"ingest-local": cpus()})
    assert ingest_threads([str(slow_listing)], workers=cpus() + 8) == (400, {"ingest": cpus() + 8})
