"""`mmtools export` writes formats other tools read, keeping ids, bytes, columns and
embeddings; `mmtools ingest` reads every format back as the dataset it came from; an export
commits, resumes and refuses like every other command."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import by_id, image_bytes, mmtools, read_dataset, write_shards

from mmtools import columns as C

N = 12
DIM = 8


@pytest.fixture
def rich(tmp_path):
    """A dataset with awkward ids, every kind of column and two embedding columns."""
    rng = np.random.default_rng(0)
    ids = [f"sub/img{i:02d}.jpg" for i in range(N - 3)] + ["a b", "ünï/cødé", "x.y.z"]
    emb = rng.normal(size=(N, DIM)).astype(np.float16)
    table = pa.table(
        {
            C.ID: ids,
            C.IMAGE: C.media_array([image_bytes(i) for i in range(N)], [None] * N),
            C.TEXT: [f"caption {i}" if i != 3 else None for i in range(N)],
            C.CLIP_SCORE: pa.array(rng.normal(0.3, 0.05, N), pa.float32()),
            "license": [f"cc-by-{i % 3}" for i in range(N)],
            "aesthetic": pa.array([float(i) / 7 for i in range(N)], pa.float64()),
            "nsfw": pa.array([i % 2 == 0 for i in range(N)]),
            C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(
                pa.array(emb.ravel(), pa.float16()), DIM
            ),
            C.TEXT_EMBEDDING: pa.FixedSizeListArray.from_arrays(
                pa.array(rng.normal(size=N * DIM).astype(np.float32)), DIM
            ),
        }
    )
    root = tmp_path / "rich"
    root.mkdir()
    pq.write_table(table, root / "part-00000.parquet")
    return root


def _same_dataset(back, original) -> None:
    """`back` holds the rows of `original`: same ids, media bytes, and every column with its
    type and values (those ingest writes itself are measured again; source names the file)."""
    a, b = read_dataset(original), read_dataset(back)
    a_rows = {r[C.ID]: r for r in a.to_pylist()}
    b_rows = {r[C.ID]: r for r in b.to_pylist()}
    assert sorted(b_rows) == sorted(a_rows)
    for name in a.schema.names:
        if name in (C.ID, C.IMAGE):
            continue
        assert b.schema.field(name).type == a.schema.field(name).type, name
        for i, row in a_rows.items():
            assert b_rows[i][name] == row[name], (name, i)
    for i, row in a_rows.items():
        assert b_rows[i][C.IMAGE]["bytes"] == row[C.IMAGE]["bytes"]


def test_webdataset_keys_are_the_ids_and_keep_every_column(tmp_path, rich):
    out = tmp_path / "wds"
    proc = mmtools("export", rich, "-o", out, "--shard-rows", 5)
    # 12 samples of 5 files (media, caption, metadata, two embeddings), one without a caption,
    # and 3 tars
    assert "12 in, 12 out" in proc.stderr.decode() and "files 62" in proc.stderr.decode()
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(tars[0]) as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile("sub%2Fimg00%2Ejpg.json").read())
        vec = np.load(io.BytesIO(tf.extractfile("sub%2Fimg00%2Ejpg.image_embedding.npy").read()))
    assert names[:5] == [
        "sub%2Fimg00%2Ejpg.jpg",
        "sub%2Fimg00%2Ejpg.txt",
        "sub%2Fimg00%2Ejpg.json",
        "sub%2Fimg00%2Ejpg.image_embedding.npy",
        "sub%2Fimg00%2Ejpg.text_embedding.npy",
    ]
    assert meta["id"] == "sub/img00.jpg" and meta["license"] == "cc-by-0"
    assert meta["nsfw"] is True and C.IMAGE_EMBEDDING not in meta
    first = read_dataset(rich).column(C.IMAGE_EMBEDDING)[0].as_py()
    assert vec.dtype == np.float16 and vec.tolist() == first
    with tarfile.open(tars[2]) as tf:
        keys = sorted({n.split(".", 1)[0] for n in tf.getnames()})
    assert keys == ["%C3%BCn%C3%AF%2Fc%C3%B8d%C3%A9", "x%2Ey%2Ez"]  # ünï/cødé, x.y.z


@pytest.mark.parametrize("fmt", ["webdataset", "jsonl", "folder"])
def test_export_then_ingest_gives_back_the_dataset(tmp_path, rich, fmt):
    out, back = tmp_path / "exported", tmp_path / "back"
    mmtools("export", rich, "--format", fmt, "-o", out, "--shard-rows", 5, "-q")
    inputs = {"webdataset": sorted(out.glob("*.tar")), "jsonl": sorted(out.glob("*.jsonl"))}
    mmtools("ingest", *inputs.get(fmt, [out]), "-o", back, "-q")
    _same_dataset(back, rich)


def test_ingest_id_col_reads_ids_from_a_tar_without_its_export_record(tmp_path, rich):
    out = tmp_path / "wds"
    mmtools("export", rich, "-o", out, "-q")
    (out / "_export.json").unlink()  # tars copied elsewhere: a plain WebDataset
    plain = tmp_path / "plain"
    mmtools("ingest", out / "00000.tar", "-o", plain, "-q")
    rows = read_dataset(plain)
    assert "00000/a%20b" in rows.column(C.ID).to_pylist()  # tarname/key without --id-col
    assert sorted(rows.column("listing_id").to_pylist()) == sorted(
        read_dataset(rich).column(C.ID).to_pylist()
    )
    keyed = tmp_path / "keyed"
    mmtools("ingest", out / "00000.tar", "--id-col", "id", "-o", keyed, "-q")
    assert sorted(read_dataset(keyed).column(C.ID).to_pylist()) == sorted(
        read_dataset(rich).column(C.ID).to_pylist()
    )
    proc = mmtools(
        "ingest", out / "00000.tar", "--id-col", "idd", "-o", tmp_path / "x", check=False
    )
    assert proc.returncode == 2 and "--id-col idd" in proc.stderr.decode()


def test_jsonl_rows_hold_every_column_and_the_media_file(tmp_path, rich):
    mmtools("export", rich, "--format", "jsonl", "-o", tmp_path / "j", "-q")
    lines = (tmp_path / "j" / "00000.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == N and rows[0]["file"] == "media/sub%2Fimg00%2Ejpg.jpg"
    assert (tmp_path / "j" / rows[0]["file"]).read_bytes() == image_bytes(0)
    assert rows[0]["id"] == "sub/img00.jpg" and C.IMAGE not in rows[0]
    assert len(rows[0][C.IMAGE_EMBEDDING]) == DIM and rows[3]["text"] is None


def test_export_reruns_resume_and_refuse_like_every_command(tmp_path, rich, dataset):
    out = tmp_path / "o"
    mmtools("export", rich, "-o", out, "-q")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = mmtools("export", rich, "-o", out)
    assert "is already complete; nothing to do" in again.stderr.decode()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    other = mmtools("export", rich, "-o", out, "--format", "jsonl", check=False)
    assert other.returncode == 6 and "--overwrite" in other.stderr.decode()
    mmtools("export", rich, "-o", out, "--format", "jsonl", "--overwrite", "-q")
    assert sorted(p.name for p in out.iterdir()) == ["00000.jsonl", "_export.json", "media"]


def test_export_refuses_a_directory_it_did_not_make(tmp_path, dataset):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep")
    proc = mmtools("export", dataset, "-o", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr.decode()
    assert (tmp_path / "o" / "x").read_text() == "keep"


def test_export_killed_mid_stream_resumes_to_the_same_tars(tmp_path, dataset):
    # A stream that breaks off after some shards: they stay committed, the rerun goes on.
    full = mmtools("filter", dataset, "--where", "true", "-o", "-", "--batch-size", 4, "-q")
    reader = pa.ipc.open_stream(full.stdout)
    batches = list(reader)
    cut = pa.BufferOutputStream()
    with pa.ipc.new_stream(cut, reader.schema) as w:
        for b in batches[:4]:
            w.write_batch(b)
    broken = cut.getvalue().to_pybytes()[:-8]  # no end-of-stream marker, no trailer
    out, ref = tmp_path / "o", tmp_path / "ref"
    proc = mmtools("export", "-", "-o", out, "--shard-rows", 4, input=broken, check=False)
    assert proc.returncode == 3 and not (out / "_export.json").exists()
    assert len(list((out / "_progress").glob("*.json"))) >= 2
    resumed = mmtools("export", "-", "-o", out, "--shard-rows", 4, input=full.stdout)
    assert "resumed after" in resumed.stderr.decode()
    mmtools("export", "-", "-o", ref, "--shard-rows", 4, "-q", input=full.stdout)
    tars = sorted(p.name for p in ref.glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == tars and len(tars) >= 6
    for name in tars:
        assert (out / name).read_bytes() == (ref / name).read_bytes()


def test_export_from_a_pipe(tmp_path, image_folder):
    stream = mmtools("ingest", image_folder, "-q").stdout
    mmtools("export", "-", "--format", "jsonl", "-o", tmp_path / "j", input=stream)
    assert len((tmp_path / "j" / "00000.jsonl").read_text().splitlines()) == 30


def test_export_help_describes_its_own_shards():
    out = mmtools("export", "--help").stdout.decode()
    shard = " ".join(out.split("--shard-rows", 1)[1].split("--shard-bytes")[0].split())
    assert "per .tar (webdataset) or .jsonl file (jsonl)" in shard and "Parquet" not in shard


def test_export_keys_escape_a_leading_underscore_and_cut_long_ids_with_a_hash(tmp_path):
    """`_export` must not become `_export.json`, the export's own record; an id whose key
    passes 200 characters is cut to 200 ending in a hash, distinct for ids alike up to there."""
    ids = ["_export", "_a.b", "a_b", "k" * 200, "k" * 201, "m" * 250 + "1", "m" * 250 + "2"]
    digest = {i: hashlib.sha1(i.encode()).hexdigest()[:20] for i in ids}
    keys = [
        "%5Fexport",
        "%5Fa%2Eb",
        "a_b",
        "k" * 200,
        "k" * 179 + "_" + digest["k" * 201],
        "m" * 179 + "_" + digest["m" * 250 + "1"],
        "m" * 179 + "_" + digest["m" * 250 + "2"],
    ]
    n = len(ids)
    ds = write_shards(
        tmp_path / "ds",
        pa.table(
            {
                C.ID: ids,
                C.IMAGE: C.media_array([image_bytes(i) for i in range(n)], [None] * n),
                C.TEXT: [f"caption {i}" for i in range(n)],
            }
        ),
    )
    mmtools("export", ds, "-o", tmp_path / "wds", "-q")
    with tarfile.open(tmp_path / "wds" / "00000.tar") as tf:
        names = tf.getnames()
        ids_in_json = [json.loads(tf.extractfile(f"{k}.json").read())["id"] for k in keys]
    assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")]
    assert ids_in_json == ids
    folder = tmp_path / "folder"
    mmtools("export", ds, "--format", "folder", "-o", folder, "-q")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["_export.json"] + [f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")]
    )
    assert json.loads((folder / "_export.json").read_text())["rows"] == n
    assert json.loads((folder / "%5Fexport.json").read_text())["id"] == "_export"


def _strict(text: str):
    """`text` parsed as strict JSON: NaN and Infinity are refused."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("fmt", ["webdataset", "jsonl", "folder"])
def test_export_writes_nan_as_null(tmp_path, rich, fmt):
    table = pq.read_table(rich / "part-00000.parquet")
    aesthetic = [float("nan") if i in (2, 7) else i / 7 for i in range(N)]
    table = table.set_column(
        table.schema.get_field_index("aesthetic"), "aesthetic", pa.array(aesthetic, pa.float64())
    )
    emb = table.column(C.TEXT_EMBEDDING).to_pylist()
    emb[4][1] = float("nan")
    table = table.set_column(
        table.schema.get_field_index(C.TEXT_EMBEDDING),
        C.TEXT_EMBEDDING,
        pa.array(emb, table.schema.field(C.TEXT_EMBEDDING).type),
    )
    ds = write_shards(tmp_path / "nan", table)
    out = tmp_path / "out"
    mmtools("export", ds, "--format", fmt, "-o", out, "-q")
    if fmt == "webdataset":
        with tarfile.open(out / "00000.tar") as tf:
            names = [n for n in tf.getnames() if n.endswith(".json")]
            docs = [tf.extractfile(n).read().decode() for n in names]
    elif fmt == "jsonl":
        docs = (out / "00000.jsonl").read_text().splitlines()
    else:
        docs = [p.read_text() for p in sorted(out.glob("*.json")) if p.name != "_export.json"]
    rows = {r["id"]: r for r in map(_strict, docs)}
    ids = table.column(C.ID).to_pylist()
    assert len(rows) == N
    assert [rows[i]["aesthetic"] for i in ids] == [None if i in (2, 7) else i / 7 for i in range(N)]
    if fmt != "webdataset":  # tars hold embeddings as .npy, where a NaN is a NaN
        want = [None if k == 1 else v for k, v in enumerate(emb[4])]
        assert rows[ids[4]][C.TEXT_EMBEDDING] == want
    _strict((out / "_export.json").read_text())


IMAGE_MODEL = {
    "model": "ViT-B-32",
    "pretrained": "laion2b_s34b_b79k",
    "library": "open_clip",
    "precision": "fp16",
}
TEXT_MODEL = {**IMAGE_MODEL, "precision": "fp32"}
RICH_KEYS = [f"sub%2Fimg{i:02d}%2Ejpg" for i in range(N - 3)] + [
    "a%20b",
    "%C3%BCn%C3%AF%2Fc%C3%B8d%C3%A9",
    "x%2Ey%2Ez",
]


def _export_and_ingest(tmp_path, rich, fmt: str, info: dict) -> tuple:
    """`rich` with embedding provenance `info`, exported as `fmt` (5 rows a shard) and
    ingested back: (export directory, ids in input order, the ingested rows)."""
    table = pq.read_table(rich / "part-00000.parquet")
    ds = write_shards(tmp_path / "described", table.cast(C.with_metadata(table.schema, info)))
    assert C.column_info(read_dataset(ds).schema) == info
    out, back = tmp_path / "exported", tmp_path / "back"
    mmtools("export", ds, "--format", fmt, "-o", out, "--shard-rows", 5, "-q")
    inputs = {"webdataset": sorted(out.glob("*.tar")), "jsonl": sorted(out.glob("*.jsonl"))}
    mmtools("ingest", *inputs.get(fmt, [out]), "-o", back, "-q")
    return out, table.column(C.ID).to_pylist(), read_dataset(back)


@pytest.mark.parametrize("fmt", ["webdataset", "jsonl", "folder"])
def test_export_then_ingest_keeps_the_embedding_models_and_names_the_exported_file(
    tmp_path, rich, fmt
):
    info = {C.IMAGE_EMBEDDING: IMAGE_MODEL, C.TEXT_EMBEDDING: TEXT_MODEL}
    out, ids, rows = _export_and_ingest(tmp_path, rich, fmt, info)
    assert C.column_info(rows.schema) == info
    sources = by_id(rows, C.SOURCE)
    if fmt == "webdataset":
        sources = {i: s.split("::", 1)[0] for i, s in sources.items()}
    files = {
        "webdataset": [f"{out}/{k // 5:05d}.tar" for k in range(N)],
        "jsonl": [f"{out}/media/{key}.jpg" for key in RICH_KEYS],
        "folder": [f"{out}/{key}.jpg" for key in RICH_KEYS],
    }[fmt]
    assert sources == dict(zip(ids, files, strict=True))


def test_ingested_export_tar_source_names_the_member_key(tmp_path, rich):
    """As a plain tar's source does: the member key, not the id the export restores."""
    out, ids, rows = _export_and_ingest(tmp_path, rich, "webdataset", {})
    files = [f"{out}/{k // 5:05d}.tar::{key}" for k, key in enumerate(RICH_KEYS)]
    assert by_id(rows, C.SOURCE) == dict(zip(ids, files, strict=True))


def test_webdataset_library_reads_the_exported_tars(tmp_path, rich):
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "wds"
    mmtools("export", rich, "-o", out, "--shard-rows", 5, "-q")
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    table = read_dataset(rich)
    assert [s["__key__"] for s in samples] == RICH_KEYS
    for i, (sample, row) in enumerate(zip(samples, table.to_pylist(), strict=True)):
        fields = {"jpg", "txt", "json", "image_embedding.npy", "text_embedding.npy"}
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == fields - (
            {"txt"} if row[C.TEXT] is None else set()
        )
        assert sample["__url__"] == urls[i // 5]
        assert sample["jpg"] == image_bytes(i)
        if row[C.TEXT] is not None:
            assert sample["txt"] == row[C.TEXT].encode()
        meta = {
            k: v for k, v in row.items() if k not in (C.IMAGE, C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING)
        }
        assert json.loads(sample["json"]) == meta
        for name, dtype in ((C.IMAGE_EMBEDDING, np.float16), (C.TEXT_EMBEDDING, np.float32)):
            vec = np.load(io.BytesIO(sample[f"{name}.npy"]))
            assert vec.dtype == dtype and vec.tolist() == row[name]
