"""A small OpenAI-compatible chat-completions server on loopback, for tests and benchmarks.

It answers deterministically (an echo of the prompt's last line, or a tiny local transformers
model), with a configurable per-request latency and injected failures: 429 with Retry-After
for the first K requests, 500s, rows whose prompt holds a marker always failing (FAIL -> 500,
BADREQ -> 400), slow (SLOW) or answering nothing (EMPTY), and dropped connections after N
answers. It records what a test wants to check: requests, the concurrency high-water mark,
the images it received (data URLs decoded and verified) and the Authorization headers.

Run it by hand: python tests/llm_server.py --port 8000 --latency 0.2
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DATA_URL = "data:image/jpeg;base64,"


def echo(prompt: str) -> str:
    """The default answer: the prompt's last line, with a chatty prefix and quotes to clean."""
    last = prompt.strip().splitlines()[-1] if prompt.strip() else ""
    return f'Caption: "{last} (rewritten)"'


class LLMServer:
    """An OpenAI-compatible server in a background thread; `url` is the base URL (…/v1)."""

    def __init__(
        self,
        latency: float = 0.0,
        answer=echo,
        rate_limit_first: int = 0,
        retry_after: float = 1,
        errors_first: int = 0,
        slow_seconds: float = 30.0,
        drop_after: int | None = None,
        api_key: str | None = None,
        model_dir: str | None = None,
    ):
        self.latency, self.answer = latency, answer
        self.rate_limit_first, self.retry_after = rate_limit_first, retry_after
        self.errors_first, self.slow_seconds = errors_first, slow_seconds
        self.drop_after, self.api_key = drop_after, api_key
        self._lock = threading.Lock()
        self._model = _TinyModel(model_dir) if model_dir else None
        self.reset()

    def reset(self) -> None:
        """Forget what was recorded (and the failure counters)."""
        self.requests = self.answered = self.in_flight = self.max_in_flight = 0
        self.prompts: list[str] = []
        self.messages: list[list[dict]] = []
        self.images: list[tuple[int, int, str]] = []
        self.auth: list[str | None] = []
        self.times: list[float] = []

    def start(self, port: int = 0) -> LLMServer:
        """Listen on 127.0.0.1 (on a free port unless `port` is given)."""
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = _HTTPServer(("127.0.0.1", port), Handler)
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def enter(self) -> int:
        """Count a request; return its 1-based number."""
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.times.append(time.monotonic())
            return self.requests

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def reply(self, prompt: str) -> str:
        """The answer to a prompt."""
        return self._model.generate(prompt) if self._model else self.answer(prompt)


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256  # a burst of 64+ connects must not overflow the listen backlog
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as model servers (uvicorn, llama.cpp) set it: headers and body go out in two
    # writes, and with Nagle the body waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    owner: LLMServer

    def log_message(self, *args) -> None:
        pass

    def handle(self) -> None:
        # The client may give up (a timeout in a test): not the server's problem.
        with contextlib.suppress(ConnectionError):
            super().handle()

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "code": status}}, headers)

    def do_POST(self) -> None:
        s = self.owner
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._error(404, f"no route {self.path}")
        n = s.enter()
        try:
            self._handle(s, n, body)
        finally:
            s.leave()

    def _handle(self, s: LLMServer, n: int, body: dict) -> None:
        with s._lock:
            s.auth.append(self.headers.get("Authorization"))
            s.messages.append(body.get("messages", []))
            drop = s.drop_after is not None and s.answered >= s.drop_after
        if drop:  # the backend "dies": close without a response
            self.close_connection = True
            return
        if s.api_key and self.headers.get("Authorization") != f"Bearer {s.api_key}":
            return self._error(401, "invalid API key")
        if n <= s.rate_limit_first:
            return self._error(429, "rate limited", {"Retry-After": str(s.retry_after)})
        if n <= s.rate_limit_first + s.errors_first:
            return self._error(500, "internal error")
        prompt, problem = _read_messages(s, body.get("messages", []))
        if problem:
            return self._error(400, problem)
        if "FAIL" in prompt:
            return self._error(500, "this row always fails")
        if "BADREQ" in prompt:
            return self._error(400, "bad request for this row")
        time.sleep(s.slow_seconds if "SLOW" in prompt else s.latency)
        text = '""' if "EMPTY" in prompt else s.reply(prompt)
        with s._lock:
            s.answered += 1
            s.prompts.append(prompt)
        self._send(
            200,
            {
                "id": f"chatcmpl-{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": 8,
                    "total_tokens": len(prompt.split()) + 8,
                },
            },
        )


def _read_messages(s: LLMServer, messages: list) -> tuple[str, str]:
    """The last user message's text; images are checked and recorded. Returns (text, error)."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        return "", "no user message"
    content = users[-1].get("content")
    if isinstance(content, str):
        return content, ""
    texts = []
    for part in content or []:
        if part.get("type") == "text":
            texts.append(part.get("text", ""))
        elif part.get("type") == "image_url":
            problem = _check_image(s, part.get("image_url", {}).get("url", ""))
            if problem:
                return "", problem
    return "\n".join(texts), ""


def _check_image(s: LLMServer, url: str) -> str:
    from PIL import Image

    if not url.startswith(DATA_URL):
        return f"image_url is not a JPEG data URL: {url[:40]!r}"
    try:
        img = Image.open(io.BytesIO(base64.b64decode(url[len(DATA_URL) :], validate=True)))
        img.load()
    except Exception as e:
        return f"image does not decode: {e}"
    with s._lock:
        s.images.append((img.width, img.height, img.format))
    return ""


class _TinyModel:
    """Greedy generation with a local causal LM (e.g. a tiny random-init one), one at a time."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.lock = threading.Lock()

    def generate(self, prompt: str) -> str:
        import torch

        with self.lock, torch.inference_mode():
            enc = self.tok(prompt, return_tensors="pt")
            out = self.model.generate(**enc, max_new_tokens=12, do_sample=False)
        return self.tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    """Serve until interrupted."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--model-dir")
    args = p.parse_args()
    server = LLMServer(latency=args.latency, model_dir=args.model_dir)
    server.start(args.port)
    print(f"serving on {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
