"""`mmtools export` writes formats other tools read, and mmtools reads them back."""

from __future__ import annotations

import json
import tarfile

from conftest import mmtools, read_dataset


def test_webdataset_round_trip(tmp_path, dataset):
    out = tmp_path / "wds"
    mmtools("export", dataset, "--format", "webdataset", "-o", out, "--shard-rows", 16)
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar"]
    with tarfile.open(tars[0]) as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile("000000000.json").read())
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    assert meta["id"] == read_dataset(dataset).column("id")[0].as_py()
    back = tmp_path / "back"
    mmtools("ingest", *tars, "-o", back)
    a, b = read_dataset(dataset), read_dataset(back)
    assert a.column("image_sha256").to_pylist() == b.column("image_sha256").to_pylist()
    assert a.column("text").to_pylist() == b.column("text").to_pylist()


def test_jsonl_and_folder(tmp_path, dataset):
    mmtools("export", dataset, "--format", "jsonl", "-o", tmp_path / "j")
    rows = [json.loads(line) for line in (tmp_path / "j" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[0]["file"] == "media/000000000.jpg"
    assert (tmp_path / "j" / rows[0]["file"]).read_bytes()[:2] == b"\xff\xd8"
    assert "image" not in rows[0] and rows[0]["width"] == 48
    mmtools("export", dataset, "--format", "folder", "-o", tmp_path / "f")
    back = tmp_path / "back"
    mmtools("ingest", tmp_path / "f", "-o", back)
    assert sorted(read_dataset(back).column("text").to_pylist()) == sorted(
        read_dataset(dataset).column("text").to_pylist()
    )


def test_export_refuses_non_empty_output(tmp_path, dataset):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep")
    proc = mmtools("export", dataset, "-o", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr.decode()


def test_export_from_a_pipe(tmp_path, image_folder):
    stream = mmtools("ingest", image_folder, "-q").stdout
    mmtools("export", "-", "--format", "jsonl", "-o", tmp_path / "j", input=stream)
    assert len((tmp_path / "j" / "data.jsonl").read_text().splitlines()) == 30
