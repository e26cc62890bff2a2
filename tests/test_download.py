"""Downloads against a loopback server that misbehaves on purpose: every URL ends within its
deadline with its own reason, and only transient failures are retried."""

from __future__ import annotations

import base64
import collections
import email.utils
import gzip
import http.server
import socket
import threading
import time

import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, mmtools, read_dataset, read_rejects

from mmtools import __version__
from mmtools import columns as C
from mmtools.io import http as downloader
from mmtools.io.http import DownloadOptions, disallowed, download, transient
from mmtools.media import MediaError

TIMEOUT = 2.0
GOOD = image_bytes(7)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Each path is one kind of server; `counts` says how often each was asked."""

    protocol_version = "HTTP/1.1"
    counts: collections.Counter
    agents: list
    stop: threading.Event

    def do_GET(self):
        path = self.path.split("?")[0]
        with self.server.lock:
            self.counts[path] += 1
            seen = self.counts[path]
        self.agents.append(self.headers.get("User-Agent"))
        name = path.strip("/").split("/")[0]
        getattr(self, f"_{name}", self._missing)(seen)

    def _send(self, status=200, body=b"", headers=(), ctype="image/jpeg"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _img(self, seen):
        self._send(body=GOOD)

    def _missing(self, seen):
        self._send(404, b"no such thing", ctype="text/plain")

    def _flaky(self, seen):  # fails once, then recovers
        self._send(body=GOOD) if seen > 1 else self._send(500, b"oops", ctype="text/plain")

    def _down(self, seen):
        self._send(503, b"down", ctype="text/plain")

    def _busy(self, seen):  # asks for one second of patience, once
        if seen > 1:
            self._send(body=GOOD)
        else:
            self._send(429, b"slow down", [("Retry-After", "1")], "text/plain")

    def _busylong(self, seen):
        self._send(429, b"slow down", [("Retry-After", "30")], "text/plain")

    def _noai(self, seen):
        self._send(body=GOOD, headers=[("X-Robots-Tag", "noimageai, nofollow")])

    def _otherbot(self, seen):
        self._send(body=GOOD, headers=[("X-Robots-Tag", "otherbot: noai")])

    def _us(self, seen):
        self._send(body=GOOD, headers=[("X-Robots-Tag", "mmtools: noindex")])

    def _html(self, seen):
        self._send(body=b"<!doctype html><html><body>moved</body></html>", ctype="text/html")

    def _truncated(self, seen):
        self._send(body=GOOD[: len(GOOD) // 2])

    def _loop(self, seen):
        self._send(302, headers=[("Location", self.path)])

    def _moved(self, seen):  # a relative redirect
        self._send(301, headers=[("Location", "../../img/moved")])

    def _gzip(self, seen):  # compressed although nobody asked
        self._send(body=gzip.compress(GOOD), headers=[("Content-Encoding", "gzip")])

    def _badgzip(self, seen):
        self._send(body=b"not gzip at all", headers=[("Content-Encoding", "gzip")])

    def _giant(self, seen):
        self.send_response(200)
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        self._until_cut(lambda: self.wfile.write(bytes(65536)))

    def _endless(self, seen):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"%x\r\n%s\r\n" % (65536, bytes(65536))
        self._until_cut(lambda: self.wfile.write(chunk))

    def _drip(self, seen):  # 2 KB/s of a 1 MB body
        self.send_response(200)
        self.send_header("Content-Length", str(10**6))
        self.end_headers()

        def drip():
            self.wfile.write(bytes(200))
            self.wfile.flush()
            time.sleep(0.1)

        self._until_cut(drip)

    def _hang(self, seen):
        self.stop.wait(30)

    def _until_cut(self, send):
        try:
            while not self.stop.is_set():
                send()
        except OSError:  # the client hung up, as it should
            pass

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 64  # every URL of a listing connects at once

    def handle_error(self, request, client_address):
        pass  # a client cutting a body short is what these tests want


@pytest.fixture(scope="module")
def server():
    """(base URL, request counts by path, User-Agents seen)."""
    counts, agents, stop = collections.Counter(), [], threading.Event()
    handler = type("H", (_Handler,), {"counts": counts, "agents": agents, "stop": stop})
    srv = _Server(("127.0.0.1", 0), handler)
    srv.lock = threading.Lock()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", counts, agents
    stop.set()
    srv.shutdown()


def closed_port() -> str:
    """A URL on a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/x"


# path -> (reason or None for success, requests the server sees, words the detail holds)
CASES = {
    "img": (None, 1, ""),
    "missing": ("http_error", 1, "HTTP 404"),
    "flaky": (None, 2, ""),
    "down": ("http_error", 3, "HTTP 503"),
    "busy": (None, 2, ""),
    "busylong": ("http_error", 1, "Retry-After 30 s"),
    "noai": ("opted_out", 1, "noimageai"),
    "otherbot": (None, 1, ""),
    "us": ("opted_out", 1, "mmtools: noindex"),
    "loop": ("http_error", 11, "redirects"),
    "moved": (None, 1, ""),
    "gzip": (None, 1, ""),
    "badgzip": ("corrupt", 1, "damaged gzip"),
    "giant": ("too_large", 1, "Content-Length"),
    "endless": ("too_large", 1, "more than"),
    "drip": ("timeout", 1, "timed out"),
    "hang": ("timeout", 1, "timed out"),
}


@pytest.mark.parametrize("name", CASES)
def test_each_url_ends_within_its_deadline_with_its_reason(server, name):
    base, counts, _ = server
    reason, requests, words = CASES[name]
    url = f"{base}/{name}/1"
    options = DownloadOptions(timeout=TIMEOUT, max_bytes=2_000_000)
    start = time.monotonic()
    try:
        assert download(url, options) == GOOD and reason is None
    except MediaError as e:
        assert (e.reason, reason) == (reason, e.reason), e.detail
        assert url in e.detail and words in e.detail
    took = time.monotonic() - start
    assert took < TIMEOUT + 1
    if reason == "timeout":
        assert took > TIMEOUT - 0.2
    if name == "busy":
        assert took >= 1  # it waited as Retry-After asked
    assert counts[f"/{name}/1"] == requests


def test_host_name_that_does_not_resolve_is_a_dns_error_and_not_retried(monkeypatch):
    calls = []
    monkeypatch.setattr(downloader, "_backoff", lambda attempt: calls.append(attempt) or 0.1)
    start = time.monotonic()
    with pytest.raises(MediaError) as e:
        download("http://no-such-host.invalid/a.jpg", DownloadOptions(timeout=TIMEOUT))
    assert e.value.reason == "dns_error" and "no-such-host.invalid" in e.value.detail
    assert time.monotonic() - start < TIMEOUT + 1 and calls == []


def test_closed_port_is_a_connection_error_retried_within_the_deadline(monkeypatch):
    calls = []
    monkeypatch.setattr(downloader, "_backoff", lambda attempt: calls.append(attempt) or 0.1)
    url = closed_port()
    start = time.monotonic()
    with pytest.raises(MediaError) as e:
        download(url, DownloadOptions(timeout=TIMEOUT, retries=2))
    assert e.value.reason == "connection_error" and url in e.value.detail
    assert "3 attempts" in e.value.detail and calls == [0, 1]
    assert time.monotonic() - start < TIMEOUT + 1


def test_backoff_never_waits_past_the_deadline(server):
    base, counts, _ = server
    start = time.monotonic()
    with pytest.raises(MediaError) as e:  # 0.5 s then 1 s of backoff do not fit in 0.7 s
        download(f"{base}/down/2", DownloadOptions(timeout=0.7, retries=5))
    assert e.value.reason == "http_error" and time.monotonic() - start < 0.7
    assert 1 <= counts["/down/2"] <= 2


def test_a_url_that_is_not_valid_is_an_http_error_at_once():
    for url in ("http://", "http://[::1", "http://a..b/"):
        with pytest.raises(MediaError) as e:
            download(url, DownloadOptions(timeout=TIMEOUT))
        assert e.value.reason == "http_error" and "not a valid URL" in e.value.detail


def test_a_path_with_spaces_or_non_ascii_is_percent_encoded(server):
    base, counts, _ = server
    assert download(f"{base}/img/a b/\u00e9t\u00e9?q=x y") == GOOD
    assert counts["/img/a%20b/%C3%A9t%C3%A9"] == 1


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy that answers every request itself and remembers what it was asked."""

    seen: list

    def do_GET(self):
        auth = self.headers.get("Proxy-Authorization")
        self.seen.append((self.path, self.headers.get("Host"), auth))
        self.send_response(200)
        self.send_header("Content-Length", str(len(GOOD)))
        self.end_headers()
        self.wfile.write(GOOD)

    def log_message(self, *args):
        pass


def test_a_proxy_from_the_environment_is_used_except_for_no_proxy(server, monkeypatch):
    base, counts, _ = server
    seen = []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("P", (_Proxy,), {"seen": seen}))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("http_proxy", f"http://me:s%40cret@127.0.0.1:{proxy.server_port}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        assert download("http://images.example/a.jpg?s=1") == GOOD
        token = base64.b64encode(b"me:s@cret").decode()
        assert seen == [("http://images.example/a.jpg?s=1", "images.example", f"Basic {token}")]
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        assert download(f"{base}/img/direct") == GOOD
        assert counts["/img/direct"] == 1 and len(seen) == 1
    finally:
        proxy.shutdown()


def test_retry_after_takes_seconds_or_a_date():
    assert downloader._retry_after("3") == 3.0
    assert downloader._retry_after("soon") is None and downloader._retry_after(None) is None
    when = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 < downloader._retry_after(when) <= 60
    assert downloader._retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0


def test_no_retries_means_one_request(server):
    base, counts, _ = server
    with pytest.raises(MediaError):
        download(f"{base}/down/3", DownloadOptions(timeout=TIMEOUT, retries=0))
    assert counts["/down/3"] == 1


def test_user_agent_names_mmtools_and_can_be_changed(server):
    base, _, agents = server
    download(f"{base}/img/ua1")
    assert agents[-1].startswith(f"mmtools/{__version__} ")
    download(f"{base}/img/ua2", DownloadOptions(user_agent="mybot/2"))
    assert agents[-1] == "mybot/2"


def test_opt_outs_can_be_configured_or_disabled(server):
    base, _, _ = server
    assert download(f"{base}/noai/9", DownloadOptions(disallowed=())) == GOOD
    assert download(f"{base}/noai/9", DownloadOptions(disallowed=("noindex",))) == GOOD
    # the directive scoped to another agent applies once we go by that agent's name
    with pytest.raises(MediaError) as e:
        download(f"{base}/otherbot/9", DownloadOptions(user_agent="OtherBot/1.0"))
    assert e.value.reason == "opted_out"


def test_x_robots_tag_reading():
    every = ("noai", "noimageai", "noindex", "noimageindex")
    assert disallowed("noai", "mmtools", every)
    assert disallowed("NoImageIndex, nofollow", "mmtools", every)
    assert not disallowed("nofollow, noarchive", "mmtools", every)
    assert not disallowed("otherbot: noai", "mmtools", every)
    assert disallowed("mmtools: noai", "mmtools", every)
    assert disallowed("noindex, unavailable_after: 25 Jun 2030 15:00:00 PST", "mmtools", every)
    assert not disallowed("unavailable_after: 25 Jun 2030 15:00:00 PST", "mmtools", every)


def test_transient_reasons():
    assert transient("timeout", "x") and transient("connection_error", "x")
    assert transient("http_error", "u: HTTP 503 Service Unavailable")
    assert transient("http_error", "u: HTTP 429 Too Many Requests (3 attempts)")
    assert not transient("http_error", "u: HTTP 404 Not Found")
    assert not any(transient(r, "x") for r in ("dns_error", "too_large", "opted_out"))


def test_ingest_gives_every_url_its_reason_within_the_deadline(server, tmp_path):
    base, counts, _ = server
    cases = {**CASES, "html": ("not_image", 1, ""), "truncated": ("truncated", 1, "")}
    urls = {name: f"{base}/{name}/cli" for name in cases}
    urls["dns"], urls["refused"] = "http://no-such-host.invalid/a.jpg", closed_port()
    listing = tmp_path / "urls.csv"
    lines = [f"{name},{url},caption {name}\n" for name, url in urls.items()]
    listing.write_text("key,url,caption\n" + "".join(lines))
    start = time.monotonic()
    mmtools(
        "ingest", listing, "-o", tmp_path / "out", "--id-col", "key", "--timeout", TIMEOUT,
        "--max-bytes", 2_000_000, "--workers", len(urls), "-q",
    )  # fmt: skip
    # every URL downloads at once: the run takes one deadline (and the interpreter's start)
    assert time.monotonic() - start < TIMEOUT + 1 + 10
    kept = read_dataset(tmp_path / "out").column(C.ID).to_pylist()
    rejects = {r[C.ID]: r for r in read_rejects(tmp_path / "out").to_pylist()}
    expected = {n: r for n, (r, _, _) in cases.items()}
    expected |= {"dns": "dns_error", "refused": "connection_error"}
    assert sorted(kept) == sorted(n for n, r in expected.items() if r is None)
    assert {n: r[C.REJECT_REASON] for n, r in rejects.items()} == {
        n: r for n, r in expected.items() if r is not None
    }
    assert "HTTP 404" in rejects["missing"][C.REJECT_DETAIL]
    for name, (_, requests, _) in cases.items():
        assert counts[f"/{name}/cli"] == requests, name


def test_ingest_download_options_reach_the_downloader(server, tmp_path):
    base, _, agents = server
    listing = tmp_path / "urls.csv"
    listing.write_text(f"url,caption\n{base}/noai/opt,a\n{base}/img/opt,b\n")
    out = tmp_path / "out"
    mmtools(
        "ingest", listing, "-o", out, "--user-agent", "curator/3",
        "--disallowed-header-directives", "", "--max-bytes", len(GOOD), "-q",
    )  # fmt: skip
    assert read_dataset(out).num_rows == 2 and "curator/3" in agents
    small = tmp_path / "small"
    no_opt_outs = ["--disallowed-header-directives", ""]
    # every row fails on purpose: accept it (the fail-safe would exit 7)
    more = [*no_opt_outs, "--max-reject-rate", "1"]
    mmtools("ingest", listing, "-o", small, "--max-bytes", len(GOOD) - 1, "-q", *more)
    reasons = pq.read_table(small / "_rejects").column(C.REJECT_REASON).to_pylist()
    assert reasons == ["too_large", "too_large"]


def test_ingest_download_defaults_are_the_documented_ones():
    import typer.main

    import mmtools
    from mmtools.cli import app

    command = typer.main.get_command(app).commands["ingest"]
    defaults = {p.name: p.default for p in command.params}
    assert (defaults["timeout"], defaults["retries"], defaults["max_bytes"]) == (10, 2, 50_000_000)
    assert defaults["user_agent"] == f"mmtools/{mmtools.__version__} (multimodal dataset curation)"
    assert defaults["disallowed_header_directives"] == "noai,noimageai,noindex,noimageindex"
