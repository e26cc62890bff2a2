"""Datasets on an object store: s3:// and gs:// paths against real S3 (moto) and GCS
(gcp-storage-emulator) servers on loopback."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import mmtools, read_dataset

from mmtools import columns as C


@pytest.fixture(scope="module")
def s3():
    """An S3 server on loopback with a bucket `data`; the env that points pyarrow at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    admin = pafs.S3FileSystem(
        endpoint_override=env["AWS_ENDPOINT_URL"],
        access_key="test",
        secret_key="test",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    admin.create_dir("data")
    yield env, admin
    server.stop()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS server on loopback with a bucket `data`; the env that points pyarrow at it.

    google-cloud-cpp (under pyarrow) honours CLOUD_STORAGE_EMULATOR_ENDPOINT but still asks
    for credentials: a service-account key signs its own tokens, with no call to Google.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from gcp_storage_emulator.server import create_server

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    account = {
        "type": "service_account",
        "project_id": "test",
        "private_key_id": "test",
        "private_key": pem.decode(),
        "client_email": "test@test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "http://127.0.0.1:1/token",
    }
    credentials = tmp_path_factory.mktemp("gcs") / "account.json"
    credentials.write_text(json.dumps(account))
    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket="data")
    server.start()
    port = server._api._httpd.server_address[1]  # the emulator does not expose the bound port
    env = {
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": f"http://127.0.0.1:{port}",
        "GOOGLE_APPLICATION_CREDENTIALS": str(credentials),
    }
    admin = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=f"127.0.0.1:{port}")
    yield env, admin
    server.stop()


def _rows(table) -> dict:
    return {r[C.ID]: r for r in table.to_pylist()}


def _local_rows(path) -> dict:
    return _rows(read_dataset(path))


def test_a_pipeline_reads_and_writes_s3_like_local_disk(s3, dataset, tmp_path, monkeypatch):
    env, admin = s3
    where = ["--where", "id != 'img00004.jpg'"]
    mmtools("filter", dataset, *where, "-o", tmp_path / "local", "-q")
    mmtools("filter", dataset, *where, "-o", "s3://data/kept", "--shard-rows", "7", "-q", env=env)
    names = {i.path for i in admin.get_file_info(pafs.FileSelector("data/kept", recursive=True))}
    assert "data/kept/_manifest.json" in names and "data/kept/part-00003.parquet" in names
    assert not [n for n in names if "/.tmp-" in n or "_progress" in n or "_run.json" in n]

    info = json.loads(mmtools("info", "s3://data/kept", "--json", env=env).stdout)
    parts = [n for n in names if n.startswith("data/kept/part-")]  # not _dropped/'s
    assert info["rows"] == 29 and info["complete"] and info["shards"] == len(parts) > 3

    # Read back from S3 into a local dataset: the same rows as the all-local run.
    mmtools("filter", "s3://data/kept", "--where", "true", "-o", tmp_path / "back", "-q", env=env)
    assert _local_rows(tmp_path / "back") == _local_rows(tmp_path / "local")
    # A glob over the bucket works as a local glob does.
    mmtools("head", "s3://data/kept/part-0000[01].parquet", "-n", "3", env=env)
    # The drop ledger (and rejects) read from the bucket as from a local dataset.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from mmtools.io.dataset import read_dropped, read_rejects

    assert read_dropped("s3://data/kept").equals(read_dropped(str(tmp_path / "local")))
    assert read_rejects("s3://data/kept") is None


def test_a_pipeline_reads_and_writes_gcs_like_local_disk(gcs, dataset, tmp_path):
    env, admin = gcs
    where = ["--where", "id != 'img00004.jpg'"]
    expected = {k: v for k, v in _local_rows(dataset).items() if k != "img00004.jpg"}
    mmtools("filter", dataset, "--where", "true", "-o", "gs://data/in", "-q", env=env)
    args = ["--shard-rows", "7", "-q"]
    mmtools("filter", "gs://data/in", *where, "-o", "gs://data/kept", *args, env=env)
    names = {i.path for i in admin.get_file_info(pafs.FileSelector("data/kept", recursive=True))}
    parts = sorted(n for n in names if n.startswith("data/kept/part-"))
    assert "data/kept/_manifest.json" in names and len(parts) == 4
    assert not [n for n in names if "/.tmp-" in n or "_progress" in n or "_run.json" in n]

    with admin.open_input_stream("data/kept/_manifest.json") as f:
        manifest = json.loads(f.read())
    assert manifest["rows"] == 29 and manifest["dropped"] == {"where": 1}
    assert [s["name"] for s in manifest["shards"]] == [p.rsplit("/", 1)[1] for p in parts]
    assert manifest["ledger"]["shards"] and "data/kept/_dropped/part-00000.parquet" in names
    stored = pa.concat_tables(pq.read_table(p, filesystem=admin) for p in parts)
    assert _rows(stored) == expected

    info = json.loads(mmtools("info", "gs://data/kept", "--json", env=env).stdout)
    assert info["rows"] == 29 and info["complete"] and info["shards"] == 4
    mmtools("filter", "gs://data/kept", "--where", "true", "-o", tmp_path / "back", "-q", env=env)
    assert _local_rows(tmp_path / "back") == expected


def test_an_interrupted_run_on_s3_resumes_without_loss(s3, dataset, tmp_path):
    env, admin = s3
    stream = mmtools("filter", dataset, "--where", "true", "--batch-size", "5", "-q").stdout
    out = "s3://data/resumed"
    args = ["filter", "-", "--where", "true", "--shard-rows", "5", "-o", out, "-q"]
    broken = mmtools(*args, input=stream[: len(stream) * 2 // 3], check=False, env=env)
    assert broken.returncode == 3  # truncated upstream: nothing claimed complete
    progress = admin.get_file_info(pafs.FileSelector("data/resumed/_progress", recursive=True))
    assert progress and admin.get_file_info("data/resumed/_manifest.json").type.name == "NotFound"
    done = mmtools(*args[:-1], "--json", input=stream, env=env)
    summary = json.loads(done.stderr.decode().strip().splitlines()[-1])
    assert summary["resumed_from"] > 0
    mmtools("filter", out, "--where", "true", "-o", tmp_path / "back", "-q", env=env)
    assert _local_rows(tmp_path / "back") == _local_rows(dataset)


def test_an_unreachable_store_is_a_one_line_error(tmp_path, dataset):
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "x"}
    env |= {"AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    env |= {"AWS_EC2_METADATA_DISABLED": "true"}
    proc = mmtools("info", "s3://nowhere/ds", env=env, check=False, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 75 and "Traceback" not in err  # temporary: retry later
    assert len(err.strip().splitlines()) == 1 and "s3://nowhere/ds" in err


def test_a_gcs_store_that_cannot_be_reached_exits_75_within_its_deadline(gcs, dataset):
    env = {**gcs[0], "CLOUD_STORAGE_EMULATOR_ENDPOINT": "http://127.0.0.1:1"}
    env["MMTOOLS_FETCH_TIMEOUT"] = "2"
    t0 = time.monotonic()
    proc = mmtools("filter", dataset, "--where", "true", "-o", "gs://data/x", env=env, check=False)
    assert proc.returncode == 75, proc.stderr.decode()
    assert time.monotonic() - t0 < 30
    line = proc.stderr.decode().strip().splitlines()[-1]
    assert line.startswith("mmtools filter: error: cannot reach gs://data/x: ")
