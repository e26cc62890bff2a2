"""What README promises about inputs: a missing extra names its pip install, ingest honours
https_proxy (CONNECT) and all_proxy, UTF-16 caption files, local paths stored absolute, and
media cells that steps leave as they found them."""

from __future__ import annotations

import base64
import codecs
import contextlib
import datetime
import http.server
import json
import shutil
import socket
import ssl
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    answer_image,
    hiding,
    image_bytes,
    make_image_folder,
    mmtools,
    read_dataset,
    read_rejects,
    reject_reasons,
)

from mmtools import columns as C

SHAPES = {"model": "mmtools-shapes", "pretrained": "bundled", "normalized": True}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A dataset with captions, image bytes and an image embedding."""
    root = tmp_path_factory.mktemp("ds")
    n, dim = 12, 8
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float16)
    table = pa.table(
        {
            C.ID: [f"r{i:02d}" for i in range(n)],
            C.TEXT: [f"a photo number {i}" for i in range(n)],
            C.IMAGE: C.media_array([image_bytes(i) for i in range(n)], [None] * n),
            C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
        }
    )
    info = {C.IMAGE_EMBEDDING: {**SHAPES, "dim": dim}}
    table = table.replace_schema_metadata(C.with_metadata(table.schema, info).metadata)
    pq.write_table(table, root / "part-00000.parquet")
    return root


@pytest.mark.parametrize(
    "module, extra, command",
    [
        pytest.param("faiss", "dedup", ["dedup", "-m", "semantic"], id="dedup-semantic"),
        pytest.param("faiss", "dedup", ["mixup", "--pairing", "nearest"], id="mixup"),
        pytest.param("faiss", "index", ["index"], id="index"),
        pytest.param("faiss", "index", ["filter", "--near", "{ds}", "--min-sim", "0.5"], id="near"),
        pytest.param("imagehash", "dedup", ["dedup", "-m", "phash"], id="dedup-phash"),
        pytest.param(
            "httpx",
            "rewrite",
            ["rewrite", "--model", "m", "--base-url", "http://127.0.0.1:9"],
            id="rewrite-openai",
        ),
        pytest.param(
            "transformers",
            "rewrite",
            ["rewrite", "--backend", "transformers", "--model", "sshleifer/tiny-gpt2"],
            id="rewrite-transformers",
        ),
    ],
)
def test_a_missing_extra_is_a_one_line_error_naming_its_pip_install(
    inputs, tmp_path, module, extra, command
):
    """Refused before the output directory is made."""
    args = [command[0], inputs, *(a.format(ds=inputs) for a in command[1:])]
    out = tmp_path / "out"
    proc = mmtools(*args, "-o", out, "-q", check=False, env=hiding(module, root=tmp_path))
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode() == (
        f"mmtools {command[0]}: error: this needs the optional package '{module}'; "
        f"install it with pip install 'mmtools[{extra}]'\n"
    )
    assert not out.exists()


# -- proxies ------------------------------------------------------------------------------------

HOST = "images.example"  # resolves nowhere: only a proxy can reach it


def self_signed(directory: Path, host: str) -> tuple[Path, Path]:
    """A self-signed certificate for `host` and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class _Images(http.server.BaseHTTPRequestHandler):
    """/img/N answers image N."""

    def do_GET(self):
        answer_image(self, int(self.path.rsplit("/", 1)[1]))

    def log_message(self, *args):
        pass


def _copy(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class _Proxy(_Images):
    """A forward proxy that records each request: an http URL it answers itself, a CONNECT it
    tunnels to `upstream`, whatever host the client named."""

    seen: list
    upstream: tuple[str, int]

    def do_GET(self):
        self.seen.append(("GET", self.path, self.headers.get("Proxy-Authorization")))
        super().do_GET()

    def do_CONNECT(self):
        self.seen.append(("CONNECT", self.path, self.headers.get("Proxy-Authorization")))
        with socket.create_connection(self.upstream) as up:
            self.send_response(200, "Connection established")
            self.end_headers()
            back = threading.Thread(target=_copy, args=(up, self.connection), daemon=True)
            back.start()
            _copy(self.connection, up)
            back.join(10)
        self.close_connection = True


@contextlib.contextmanager
def serving(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxied(tmp_path, monkeypatch):
    """Two recording proxies with an HTTPS image server behind them, a listing of
    https://images.example/img/3 and http://plain.example/img/4, and the environment of a run
    whose `certifi` (where https downloads take their roots) names the server's certificate."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    cert, key = self_signed(tmp_path, HOST)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    https = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    https.socket = tls.wrap_socket(https.socket, server_side=True)
    proxies = [
        http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0),
            type("P", (_Proxy,), {"seen": [], "upstream": https.server_address}),
        )
        for _ in range(2)
    ]
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "certifi.py").write_text(f"def where():\n    return {str(cert)!r}\n")
    listing = tmp_path / "urls.csv"
    listing.write_text(f"url,caption\nhttps://{HOST}/img/3,c3\nhttp://plain.example/img/4,c4\n")
    with serving(https), serving(proxies[0]) as a, serving(proxies[1]) as b:
        yield {"a": a, "b": b, "listing": listing, "env": {"PYTHONPATH": str(trust)}}


def proxy_url(server, auth: str = "") -> str:
    return f"http://{auth}127.0.0.1:{server.server_port}"


def fetched(out: Path) -> dict[str, bytes]:
    """caption -> image bytes of an ingested dataset that has no reject rows."""
    assert read_rejects(out) is None
    rows = read_dataset(out).to_pylist()
    return {r[C.TEXT]: r[C.IMAGE]["bytes"] for r in rows}


WANT = {"c3": image_bytes(3), "c4": image_bytes(4)}
CONNECT = ("CONNECT", f"{HOST}:443", None)
GET = ("GET", "http://plain.example/img/4", None)


def test_https_urls_go_through_https_proxy_as_a_connect_tunnel(proxied, tmp_path):
    a, b = proxied["a"], proxied["b"]
    env = {
        **proxied["env"],
        "https_proxy": proxy_url(a, "me:s%40cret@"),
        "http_proxy": proxy_url(b),
    }
    mmtools("ingest", proxied["listing"], "-o", tmp_path / "out", "-q", env=env)
    assert fetched(tmp_path / "out") == WANT
    token = base64.b64encode(b"me:s@cret").decode()
    assert a.RequestHandlerClass.seen == [("CONNECT", f"{HOST}:443", f"Basic {token}")]
    assert b.RequestHandlerClass.seen == [GET]


def test_all_proxy_serves_the_schemes_no_variable_of_their_own_names(proxied, tmp_path):
    a, b = proxied["a"], proxied["b"]
    env = {**proxied["env"], "all_proxy": proxy_url(a)}
    mmtools("ingest", proxied["listing"], "-o", tmp_path / "all", "-q", env=env)
    assert fetched(tmp_path / "all") == WANT
    assert sorted(a.RequestHandlerClass.seen) == [CONNECT, GET]
    a.RequestHandlerClass.seen.clear()
    env["http_proxy"] = proxy_url(b)
    mmtools("ingest", proxied["listing"], "-o", tmp_path / "http", "-q", env=env)
    assert fetched(tmp_path / "http") == WANT
    assert (a.RequestHandlerClass.seen, b.RequestHandlerClass.seen) == ([CONNECT], [GET])


# -- captions, paths, media cells ---------------------------------------------------------------

CAPTION = "naïve café – 5€, 日本の猫 🐱"


def test_utf16_captions_with_a_byte_order_mark_read_exactly_and_flagged(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, name in enumerate(("le", "be", "json", "damaged")):
        (d / f"{name}.jpg").write_bytes(image_bytes(i))
    (d / "le.txt").write_bytes(codecs.BOM_UTF16_LE + CAPTION.encode("utf-16-le"))
    (d / "be.txt").write_bytes(codecs.BOM_UTF16_BE + CAPTION.encode("utf-16-be"))
    meta = json.dumps({"caption": CAPTION}, ensure_ascii=False)
    (d / "json.json").write_bytes(codecs.BOM_UTF16_BE + meta.encode("utf-16-be"))
    (d / "damaged.txt").write_bytes(codecs.BOM_UTF16_LE + "ok".encode("utf-16-le") + b"\x00")
    mmtools("ingest", d, "-o", tmp_path / "out", "-q")
    rows = {
        r[C.ID]: (r[C.TEXT], r[C.TEXT_ENCODING]) for r in read_dataset(tmp_path / "out").to_pylist()
    }
    assert rows == {name: (CAPTION, "utf-16") for name in ("le.jpg", "be.jpg", "json.jpg")}
    assert reject_reasons(tmp_path / "out") == {"damaged.jpg": "bad_caption"}


def stored_paths(out: Path) -> dict[str, str]:
    """id -> the path of the image cell, for a dataset whose cells hold paths only."""
    rows = read_dataset(out).to_pylist()
    assert all(r[C.IMAGE]["bytes"] is None for r in rows)
    return {r[C.ID]: r[C.IMAGE]["path"] for r in rows}


def test_a_folder_named_relative_to_the_cwd_is_stored_with_absolute_paths(tmp_path):
    make_image_folder(tmp_path / "imgs", 2)
    mmtools("ingest", "imgs", "-o", "ds", "--paths-only", "-q", cwd=tmp_path)
    assert stored_paths(tmp_path / "ds") == {
        "img00001.jpg": str(tmp_path / "imgs" / "img00001.jpg"),
        "sub/img00000.jpg": str(tmp_path / "imgs" / "sub" / "img00000.jpg"),
    }


def test_relative_paths_of_a_listing_are_stored_absolute(tmp_path):
    """A listing's relative paths name files beside the listing, not in the cwd."""
    lists = tmp_path / "lists"
    (lists / "pics").mkdir(parents=True)
    (lists / "pics" / "a.jpg").write_bytes(image_bytes(1))
    (tmp_path / "b.jpg").write_bytes(image_bytes(2))
    (lists / "l.csv").write_text(f"path,caption\npics/a.jpg,a\n{tmp_path / 'b.jpg'},b\n")
    (tmp_path / "elsewhere").mkdir()
    args = ["--id-col", "caption", "--paths-only", "-q"]
    mmtools("ingest", "../lists/l.csv", "-o", "ds", *args, cwd=tmp_path / "elsewhere")
    assert stored_paths(tmp_path / "elsewhere" / "ds") == {
        "a": str(lists / "pics" / "a.jpg"),
        "b": str(tmp_path / "b.jpg"),
    }


def test_filter_dedup_and_mixup_keep_media_cells_as_they_found_them(tmp_path):
    """Path-only, bytes-only and bytes-with-path cells come out of each step unchanged; only
    the rows mixup makes hold bytes of their own."""
    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(4):
        (pics / f"p{i}.jpg").write_bytes(image_bytes(i))
    shutil.copy(pics / "p0.jpg", pics / "p4.jpg")
    cells = {f"p{i}": (None, str(pics / f"p{i}.jpg")) for i in range(5)}
    cells["bytes"] = (image_bytes(10), None)
    cells["both"] = (image_bytes(11), str(tmp_path / "gone.jpg"))  # the bytes are what is read
    ids = list(cells)
    media = C.media_array([b for b, _ in cells.values()], [p for _, p in cells.values()])
    table = pa.table({C.ID: ids, C.TEXT: [f"caption {i}" for i in ids], C.IMAGE: media})
    pq.write_table(table, tmp_path / "in.parquet")

    def found(out: str) -> dict[str, tuple]:
        assert read_rejects(tmp_path / out) is None
        rows = read_dataset(tmp_path / out).to_pylist()
        return {r[C.ID]: (r[C.IMAGE]["bytes"], r[C.IMAGE]["path"]) for r in rows}

    mmtools("filter", tmp_path / "in.parquet", "--where", "id != 'p3'", "-o", tmp_path / "f", "-q")
    assert found("f") == {i: c for i, c in cells.items() if i != "p3"}
    mmtools("dedup", tmp_path / "f", "-m", "phash", "-o", tmp_path / "d", "-q")
    kept = {i: c for i, c in cells.items() if i not in ("p3", "p4")}
    assert found("d") == kept
    mmtools("mixup", tmp_path / "d", "--keep-originals", "--seed", "1", "-o", tmp_path / "m", "-q")
    mixed = found("m")
    assert {i: c for i, c in mixed.items() if i in kept} == kept
    made = [c for i, c in mixed.items() if i not in kept]
    assert len(made) == len(kept) and all(b[:3] == b"\xff\xd8\xff" for b, _ in made)
