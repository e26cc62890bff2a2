"""`mmtools rewrite` through the OpenAI-compatible backend, against a real server on loopback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    MMTOOLS,
    by_id,
    image_bytes,
    ingest_folder,
    make_image_folder,
    mmtools,
    read_dataset,
    read_rejects,
)
from llm_server import LLMServer

from mmtools import columns as C


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """30 ingested rows in 3 shards, shared by the tests of this module (read only)."""
    return ingest_folder(make_image_folder(tmp_path_factory.mktemp("rewrite") / "imgs", 30))


def write_rows(path, texts: dict, images: list | None = None):
    """A Parquet input with id and text (and image) columns, written directly."""
    columns = {C.ID: list(texts), C.TEXT: list(texts.values())}
    if images is not None:
        columns[C.IMAGE] = C.media_array(images, [None] * len(images))
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def server():
    with LLMServer() as s:
        yield s


@pytest.fixture
def echo_prompt(tmp_path):
    """A prompt that is just the alt-text, so the echo server's answer is predictable."""
    p = tmp_path / "echo.txt"
    p.write_text("{text}\n")
    return p


def rewrite(server, *args, check=True, env=None):
    return mmtools(
        "rewrite", *args, "--base-url", server.url, "--model", "tiny", "-q", check=check, env=env
    )


def test_rewrite_adds_synthetic_caption_and_keeps_alt_text(tmp_path, dataset, server, echo_prompt):
    out = tmp_path / "out"
    rewrite(server, dataset, "-o", out, "--prompt", echo_prompt)
    t = read_dataset(out)
    assert t.num_rows == 30
    for alt, synthetic in zip(t[C.TEXT].to_pylist(), t[C.TEXT_SYNTHETIC].to_pylist(), strict=True):
        assert alt.startswith("a photo number")
        assert synthetic == f"{alt} (rewritten)"  # 'Caption: "…"' cleaned off
    assert set(t[C.CAPTION_SOURCE].to_pylist()) == {"rewrite:openai:tiny"}
    info = json.loads((out / "_manifest.json").read_text())
    meta = C.column_info(pq.read_schema(next(out.glob("part-*.parquet"))))
    assert meta[C.TEXT_SYNTHETIC]["backend"] == "openai"
    assert meta[C.TEXT_SYNTHETIC]["model"] == "tiny"
    assert "rewrite" in json.dumps(info)
    assert (out / "_cache" / "rewrite.sqlite").is_file()


def test_shipped_prompt_and_few_shot_examples_reach_the_server(tmp_path, dataset, server):
    from mmtools.steps.rewrite.prompts import PROMPT_DIR

    rewrite(
        server, dataset, "-o", tmp_path / "out", "--examples", PROMPT_DIR / "rewrite_examples.txt"
    )
    messages = server.messages[0]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 4 + ["user"]
    assert "white cat sleeping on a red sofa" in messages[0]["content"]
    assert messages[1]["content"] == "A white cat is curled up asleep on a red couch."
    assert "Caption: a photo number" in messages[-1]["content"]
    assert "Rewrite the following image caption" in messages[-1]["content"]


def test_requests_overlap_up_to_the_concurrency_limit(tmp_path, dataset):
    with LLMServer(latency=0.3) as server:
        t0 = time.monotonic()
        rewrite(server, dataset, "-o", tmp_path / "out", "--concurrency", 8)
        elapsed = time.monotonic() - t0
    assert server.requests == 30
    assert 6 <= server.max_in_flight <= 8
    assert elapsed < 30 * 0.3  # one at a time would take 9 s of latency alone


def test_batches_smaller_than_the_concurrency_still_fill_every_connection(tmp_path, echo_prompt):
    texts = {f"{i:02d}": f"a photo number {i}" for i in range(40)}
    out = tmp_path / "out"
    with LLMServer(latency=0.3) as server:
        rewrite(
            server,
            write_rows(tmp_path / "in.parquet", texts),
            *("-o", out, "--prompt", echo_prompt, "--concurrency", 8, "--batch-size", 2),
        )
    # Waiting for each 2-row batch before sending more would hold 4 requests in flight at most.
    assert server.max_in_flight == 8
    t = read_dataset(out)
    assert t[C.ID].to_pylist() == list(texts)  # input order kept
    assert t[C.TEXT_SYNTHETIC].to_pylist() == [f"{v} (rewritten)" for v in texts.values()]


def test_429_with_retry_after_and_500s_are_retried_then_succeed(tmp_path, dataset):
    with LLMServer(rate_limit_first=3, retry_after=1, errors_first=3) as server:
        rewrite(server, dataset, "-o", tmp_path / "out", "--concurrency", 8, "--backoff", 0.05)
    assert read_dataset(tmp_path / "out").num_rows == 30
    assert read_rejects(tmp_path / "out") is None
    assert server.requests == 36 and server.answered == 30
    # Retry-After pauses every request: nothing after the first wave before the second is up.
    assert server.times[8] - server.times[0] >= 0.9


def test_failed_rows_become_reject_rows_with_reasons(tmp_path, server, echo_prompt):
    texts = {f"ok{i}": f"a photo number {i}" for i in range(4)}
    texts.update(
        {
            "fail": "FAIL on the server",
            "bad": "BADREQ for this one",
            "empty": "EMPTY answer",
            "blank": "  ",
            "null": None,
        }
    )
    out = tmp_path / "out"
    rewrite(
        server,
        write_rows(tmp_path / "in.parquet", texts),
        "-o",
        out,
        "--prompt",
        echo_prompt,
        "--retries",
        2,
        "--backoff",
        0.01,
    )
    assert read_dataset(out)[C.ID].to_pylist() == ["ok0", "ok1", "ok2", "ok3"]
    rej = read_rejects(out)
    reasons = by_id(rej, C.REJECT_REASON)
    details = by_id(rej, C.REJECT_DETAIL)
    assert reasons == {
        "fail": "generation_failed",
        "bad": "generation_failed",
        "empty": "empty_caption",
        "blank": "missing_text",
        "null": "missing_text",
    }
    assert "HTTP 500" in details["fail"] and "3 attempts" in details["fail"]
    assert "HTTP 400" in details["bad"] and "attempts" not in details["bad"]
    assert set(rej[C.REJECT_STEP].to_pylist()) == {"rewrite"}
    # 4 good rows, the 500 row three times, the 400 row once (not retried), the empty one once.
    assert server.requests == 4 + 3 + 1 + 1
    summary = json.loads((out / "_manifest.json").read_text())["summary"]
    assert summary["reasons"] == {"generation_failed": 2, "empty_caption": 1, "missing_text": 2}


def test_timeouts_are_enforced(tmp_path, echo_prompt):
    rows = write_rows(tmp_path / "in.parquet", {"a": "fast", "b": "a SLOW one", "c": "fast"})
    with LLMServer(slow_seconds=30) as server:
        t0 = time.monotonic()
        rewrite(
            server,
            rows,
            "-o",
            tmp_path / "out",
            "--prompt",
            echo_prompt,
            "--timeout",
            0.5,
            "--retries",
            1,
            "--backoff",
            0.01,
        )
        assert time.monotonic() - t0 < 15
        assert server.requests == 2 + 2
    rej = read_rejects(tmp_path / "out")
    assert rej[C.ID].to_pylist() == ["b"]
    assert "timed out after 0.5 s" in rej[C.REJECT_DETAIL][0].as_py()
    assert read_dataset(tmp_path / "out").num_rows == 2


def test_caption_mode_sends_images_as_jpeg_data_urls(tmp_path, server):
    texts = {"png": "a png", "big": "a wide one", "garbage": "broken", "none": "nothing"}
    images = [image_bytes(1, fmt="PNG"), image_bytes(2, size=(300, 100)), b"not an image", None]
    out = tmp_path / "out"
    rewrite(
        server,
        write_rows(tmp_path / "in.parquet", texts, images),
        "-o",
        out,
        "--mode",
        "caption",
        "--prompt",
        "caption_hint",
        "--max-image-side",
        64,
    )
    assert sorted(server.images) == [(48, 32, "JPEG"), (64, 21, "JPEG")]
    assert any('"a wide one"' in p for p in server.prompts)  # the alt-text hint
    t = read_dataset(out)
    assert t[C.ID].to_pylist() == ["png", "big"]
    assert set(t[C.CAPTION_SOURCE].to_pylist()) == {"caption:openai:tiny"}
    assert by_id(read_rejects(out), C.REJECT_REASON) == {
        "garbage": "not_image",
        "none": "no_media",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_backend_down_exits_75_and_commits_nothing(tmp_path, dataset):
    out = tmp_path / "out"
    proc = mmtools(
        "rewrite",
        dataset,
        "-o",
        out,
        "--model",
        "m",
        "--base-url",
        f"http://127.0.0.1:{free_port()}/v1",
        "--retries",
        1,
        "--backoff",
        0.01,
        check=False,
    )
    assert proc.returncode == 75
    err = proc.stderr.decode()
    assert "mmtools rewrite: error: the backend at http://127.0.0.1:" in err
    assert "unreachable" in err and "Traceback" not in err
    assert not (out / "_manifest.json").exists()
    assert not list(out.glob("part-*.parquet")) and not (out / "_rejects").exists()


def test_rerun_after_backend_died_pays_only_for_rows_left(tmp_path, dataset, echo_prompt):
    out = tmp_path / "out"
    args = [
        "-o",
        out,
        "--prompt",
        echo_prompt,
        "--retries",
        0,
        "--concurrency",
        4,
        "--shard-rows",
        100,
    ]
    with LLMServer(drop_after=12) as dying:
        proc = rewrite(dying, dataset, *args, check=False)
    assert proc.returncode == 75, proc.stderr.decode()
    assert not (out / "_manifest.json").exists()
    # Requests already in flight when the 12th answer went out may be answered too.
    assert 12 <= dying.answered <= 12 + 4
    with LLMServer() as server:
        rewrite(server, dataset, *args)
        assert server.requests == 30 - dying.answered  # every answer paid for was kept
    t = read_dataset(out)
    assert t.num_rows == 30
    assert all(
        s == f"{a} (rewritten)"
        for a, s in zip(t[C.TEXT].to_pylist(), t[C.TEXT_SYNTHETIC].to_pylist(), strict=True)
    )


def test_sigterm_with_requests_in_flight_exits_promptly(tmp_path):
    rows = write_rows(tmp_path / "in.parquet", {str(i): "a SLOW one" for i in range(20)})
    out = tmp_path / "out"
    with LLMServer(slow_seconds=60) as server:
        proc = subprocess.Popen(
            [*MMTOOLS, "rewrite", rows, "-o", out, "--base-url", server.url, "--model", "m", "-q"],
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while server.in_flight < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        stopped_in = time.monotonic() - t0
    assert rc == 143, proc.stderr.read().decode()
    assert stopped_in < 5
    assert not (out / "_manifest.json").exists()


def test_completed_output_is_not_regenerated_and_overwrite_starts_over(tmp_path, dataset, server):
    out = tmp_path / "out"
    rewrite(server, dataset, "-o", out)
    rewrite(server, dataset, "-o", out)
    assert server.requests == 30
    rewrite(server, dataset, "-o", out, "--overwrite")
    assert server.requests == 60
    assert read_dataset(out).num_rows == 30


def test_cache_path_is_written_there_and_a_fresh_run_answers_from_it(
    tmp_path, dataset, server, echo_prompt
):
    cache = tmp_path / "elsewhere" / "captions.sqlite"
    rewrite(server, dataset, "-o", tmp_path / "first", "--prompt", echo_prompt, "--cache", cache)
    assert server.requests == 30
    assert cache.is_file() and not (tmp_path / "first" / "_cache").exists()
    rewrite(server, dataset, "-o", tmp_path / "second", "--prompt", echo_prompt, "--cache", cache)
    assert server.requests == 30
    first, second = read_dataset(tmp_path / "first"), read_dataset(tmp_path / "second")
    assert second[C.TEXT_SYNTHETIC].to_pylist() == first[C.TEXT_SYNTHETIC].to_pylist()
    assert second[C.TEXT_SYNTHETIC].to_pylist() == [
        f"{t} (rewritten)" for t in first[C.TEXT].to_pylist()
    ]


def test_api_key_comes_from_the_named_environment_variable(tmp_path, dataset):
    with LLMServer(api_key="sk-test") as server:
        rewrite(
            server,
            dataset,
            "-o",
            tmp_path / "a",
            "--api-key-env",
            "MY_KEY",
            env={"MY_KEY": "sk-test"},
        )
        assert set(server.auth) == {"Bearer sk-test"}
        proc = rewrite(
            server, dataset, "-o", tmp_path / "b", check=False, env={"OPENAI_API_KEY": "wrong"}
        )
    assert proc.returncode == 2
    err = proc.stderr.decode().strip()
    assert err.startswith("mmtools rewrite: error: the server at http://127.0.0.1:")
    assert "401" in err and "--api-key-env" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b" / "_rejects").exists()
    proc = rewrite(
        server, dataset, "-o", tmp_path / "c", "--api-key-env", "NOPE_UNSET", check=False
    )
    assert proc.returncode == 2 and "NOPE_UNSET" in proc.stderr.decode()


def test_pipe_ingest_caption_template_then_fuse_over_http(tmp_path, image_folder, server):
    ingest = subprocess.Popen(
        [*MMTOOLS, "ingest", image_folder, "-o", "-", "-q"], stdout=subprocess.PIPE
    )
    caption = subprocess.Popen(
        [*MMTOOLS, "rewrite", "--mode", "caption", "--backend", "template", "-q"],
        stdin=ingest.stdout,
        stdout=subprocess.PIPE,
    )
    ingest.stdout.close()
    fuse = subprocess.run(
        [
            *MMTOOLS,
            "rewrite",
            "--mode",
            "fuse",
            "--base-url",
            server.url,
            "--model",
            "tiny",
            "--column",
            "text_fused",
            "-o",
            tmp_path / "out",
            "-q",
        ],
        stdin=caption.stdout,
        capture_output=True,
        timeout=120,
    )
    caption.stdout.close()
    assert fuse.returncode == 0, fuse.stderr.decode()
    assert ingest.wait() == 0 and caption.wait() == 0
    t = read_dataset(tmp_path / "out")
    assert t.num_rows == 30
    assert set(t[C.CAPTION_SOURCE].to_pylist()) == {"fuse:openai:tiny"}
    assert all(s.startswith("a ") for s in t[C.TEXT_SYNTHETIC].to_pylist())  # the description
    prompt = server.prompts[0]
    assert "Alt-text: a photo number" in prompt and "Description: a " in prompt


def run_main(argv: list, monkeypatch, capsys) -> tuple[int, str]:
    """The `mmtools` entry point in-process (fast, for errors raised before any work)."""
    from mmtools.cli import main

    monkeypatch.setattr("sys.argv", ["mmtools", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--mode", "poem"], 2, "--mode must be one of rewrite, caption, fuse"),
        (["--mix", "1.5"], 2, "--mix must be a probability"),
        (["--column", "text"], 2, "would overwrite a kept column"),
        (["--prompt", "no_such_prompt"], 2, "is neither a file nor a shipped prompt"),
        (["--api-key-env", "NOPE_UNSET"], 2, "NOPE_UNSET (--api-key-env) is not set"),
        (["--mode", "fuse"], 3, "needs column(s) text_synthetic"),
        (["--prompt", "{placeholder}.txt"], 3, "needs column(s) artist"),
    ],
)
def test_bad_options_fail_with_one_clear_line(
    tmp_path, dataset, args, code, message, monkeypatch, capsys
):
    prompt = tmp_path / "{placeholder}.txt"
    prompt.write_text("Rewrite {text} in the style of {artist}")
    args = [str(tmp_path / a) if a == "{placeholder}.txt" else a for a in args]
    rc, err = run_main(
        ["rewrite", dataset, "-o", tmp_path / "out", "--model", "m", *args], monkeypatch, capsys
    )
    assert rc == code, err
    assert err.startswith("mmtools rewrite: error:") and message in err
    assert len(err.splitlines()) == 1
