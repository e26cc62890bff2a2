"""`ingest --retry-failed`, per-shard stats and progress, on a loopback server that fails
some URLs (HTTP 500, hangs) during the first run and answers them afterwards."""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest
from conftest import MMTOOLS, image_bytes, mmtools, read_dataset, read_rejects

from mmtools.steps.ingest.retry import retryable

N = 24
ERRORS = {3: 500, 7: 503, 11: 429, 19: 500}  # while the server is down
HANGS = {5, 17}  # longer than --timeout while the server is down
TRANSIENT = set(ERRORS) | HANGS


class _Flaky(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        state = self.server.state
        if not self.path.startswith("/img/"):
            self.send_error(404)
            return
        n = int(self.path.rsplit("/", 1)[1])
        if state["down"] and n in ERRORS:
            self.send_error(ERRORS[n])
            return
        if state["down"] and n in HANGS:
            time.sleep(3)
        time.sleep(state["delay"])
        body = image_bytes(n)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky(tmp_path):
    """(listing, state): N image URLs and one 404; `state["down"]` makes some fail."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    server.daemon_threads = True
    server.state = {"down": True, "delay": 0.0}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{url}/img/{i}" for i in range(N)] + [f"{url}/missing/1"]
    listing = tmp_path / "urls.csv"
    listing.write_text("url,caption\n" + "".join(f"{u},cap {i}\n" for i, u in enumerate(urls)))
    yield listing, server.state
    server.shutdown()


def ingest(listing, out, *more, **kw):
    args = ("ingest", listing, "-o", out, "--timeout", 3, "--shard-rows", 5, "--batch-size", 5)
    return mmtools(*args, *more, **kw)


def rows(out) -> Counter:
    t = read_dataset(out)
    cols = [t.column(c).to_pylist() for c in ("id", "image_sha256", "text", "source")]
    return Counter(zip(*cols, strict=True))


def failed_sources(out) -> dict[str, str]:
    """source of each rejected row (its id's listing row) -> reason."""
    rejects = read_rejects(out).to_pylist()
    ids = {r["id"]: r for r in rejects}
    assert len(ids) == len(rejects)
    return {r["id"]: (r["reason"], r["detail"]) for r in rejects}


def manifest(out) -> dict:
    return json.loads((out / "_manifest.json").read_text())


def test_retry_failed_recovers_transient_failures(flaky, tmp_path):
    listing, state = flaky
    out, clean = tmp_path / "out", tmp_path / "clean"
    ingest(listing, out)
    first = failed_sources(out)
    assert len(first) == len(TRANSIENT) + 1
    assert sum(retryable(*v) for v in first.values()) == len(TRANSIENT)  # not the 404
    assert manifest(out)["stats"]["failed"] == len(TRANSIENT) + 1

    state["down"] = False
    proc = ingest(listing, out, "--retry-failed")
    err = proc.stderr.decode()
    assert f"retrying {len(TRANSIENT)} failed rows" in err
    assert f"{len(TRANSIENT)} in, {len(TRANSIENT)} out, 0 rejected" in err

    ingest(listing, clean)
    assert rows(out) == rows(clean) and sum(rows(out).values()) == N
    assert list(failed_sources(out).values()) == list(failed_sources(clean).values())
    m = manifest(out)
    assert m["rows"] == N and m["rejects"]["rows"] == 1 and len(m["rejects"]["shards"]) == 1
    assert m["retries"][0]["retried"] == len(TRANSIENT)
    assert m["stats"]["succeeded"] == N and m["stats"]["failed"] == 1
    assert sorted(p.name for p in (out / "_rejects").iterdir()) == [
        n.split("/")[-1] for n in m["rejects"]["shards"]
    ]
    assert not (out / "_progress").exists() and not (out / "_retry.json").exists()
    assert m["lineage"][-1]["argv"][-1] == "--retry-failed"

    proc = ingest(listing, out, "--retry-failed")  # only the 404 is left: not transient
    assert "nothing to retry" in proc.stderr.decode()
    assert rows(out) == rows(clean)


def test_retry_keeps_rows_that_fail_again(flaky, tmp_path):
    listing, state = flaky
    out = tmp_path / "out"
    ingest(listing, out)
    before = failed_sources(out)
    ingest(listing, out, "--retry-failed")  # still down: the same rows fail again
    assert failed_sources(out).keys() == before.keys()
    assert manifest(out)["rows"] == N - len(TRANSIENT)
    assert manifest(out)["rejects"]["rows"] == len(TRANSIENT) + 1
    state["down"] = False
    ingest(listing, out, "--retry-failed")  # the second generation recovers them
    assert manifest(out)["rows"] == N and len(manifest(out)["retries"]) == 2
    assert len(failed_sources(out)) == 1
    t = len(TRANSIENT)
    generations = f"retries: 2 ({t} retried, 0 recovered, {t} retried, {t} recovered)"
    assert generations in mmtools("info", out).stdout.decode().splitlines()


def test_retry_killed_midway_resumes(flaky, tmp_path):
    listing, state = flaky
    out, clean = tmp_path / "out", tmp_path / "clean"
    ingest(listing, out)
    state.update(down=False, delay=0.3)
    cmd = [*MMTOOLS, "ingest", listing, "-o", out, "--timeout", 5, "--shard-rows", 2]
    cmd += ["--batch-size", 2, "--workers", 1, "--retry-failed", "-q"]
    proc = subprocess.Popen([str(c) for c in cmd], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list((out / "_progress").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((out / "_progress").glob("*.json")), "the retry committed nothing before the kill"
    assert manifest(out)["rows"] == N - len(TRANSIENT)  # the old manifest is still whole
    state["delay"] = 0.0
    ingest(listing, out, "--retry-failed")
    ingest(listing, clean)
    assert rows(out) == rows(clean)
    assert len(failed_sources(out)) == 1 and manifest(out)["rejects"]["rows"] == 1


def test_retry_needs_a_finished_output(flaky, tmp_path):
    listing, state = flaky
    state["down"] = False
    proc = ingest(listing, tmp_path / "none", "--retry-failed", check=False)
    assert proc.returncode == 2 and "needs a finished output" in proc.stderr.decode()
    out = tmp_path / "out"
    ingest(listing, out)
    proc = ingest(listing, out, "--retry-failed", "--json")
    assert json.loads(proc.stderr.decode().splitlines()[-1])["retried"] == 0


def test_stats_in_manifest_summary_and_info(flaky, tmp_path):
    listing, state = flaky
    state["down"] = False
    out = tmp_path / "out"
    proc = ingest(listing, out, "--json")
    summary = json.loads(proc.stderr.decode().splitlines()[-1])
    assert summary["success_rate"] == round(N / (N + 1), 4)
    m = manifest(out)
    for shard in m["shards"]:
        assert shard["rows"] + shard["rejected"] == 5 and shard["seconds"] >= 0
        assert shard["bytes"] > 0 and sum(shard["reject_reasons"].values()) == shard["rejected"]
    assert m["stats"]["succeeded"] == N and m["stats"]["failed"] == 1
    info = mmtools("info", out).stdout.decode()
    assert f"{N} succeeded, 1 failed (96.0% success)" in info
    verbose = mmtools("info", out, "-v").stdout.decode()
    assert "part-00004.parquet  4 rows, 1 rejected (" in verbose


def test_rate_is_never_zero_when_rows_were_processed():
    from mmtools.engines import Summary

    line = Summary("ingest", "out", rows_in=29, rows_out=29, seconds=71.0).line()
    assert "(0.41 rows/s)" in line
