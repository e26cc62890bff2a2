"""Chat completions from any OpenAI-compatible server (vLLM, llama.cpp, Ollama, hosted APIs).

`concurrency` worker threads share one httpx client, so at most that many requests are in
flight. (Threads, not asyncio: httpx's async pool costs several times the CPU per request at
64 connections, which caps throughput on small machines.) Every attempt has connect, read and
total timeouts; failures are retried a bounded number of times with exponential backoff and
jitter; a Retry-After on a 429 or 5xx pauses all requests for that long. 5xx, 429, timeouts
and dropped connections are retried; other 4xx are not.
"""

from __future__ import annotations

import base64
import io
import json
import queue
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from mmtools.errors import UsageError
from mmtools.media import MediaError
from mmtools.steps.rewrite.prompts import Outcome, Request, chat_messages, open_image

MAX_RETRY_AFTER = 300.0  # seconds; a longer Retry-After is capped
_FATAL = {401: "authentication failed", 403: "access denied", 404: "not found"}


@dataclass
class OpenAIOptions:
    """How to reach the server and how hard to try."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key: str | None = None
    concurrency: int = 16
    timeout: float = 120.0
    connect_timeout: float = 10.0
    retries: int = 4
    backoff: float = 1.0
    max_tokens: int = 128
    temperature: float = 0.0
    max_image_side: int = 768
    seed: int | None = None


class _Failure(Exception):
    def __init__(
        self, message: str, retry: bool, connection: bool = False, retry_after: float | None = None
    ):
        super().__init__(message)
        self.retry, self.connection, self.retry_after = retry, connection, retry_after


def image_data_url(data: bytes, max_side: int) -> str:
    """Image bytes, decoded and shrunk to `max_side`, as a `data:image/jpeg;base64,` URL."""
    image = open_image(data, max_side)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _content(body: dict) -> str:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _Failure(f"unexpected response: {str(body)[:200]}", retry=True) from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


class _Batch:
    """Collects the outcomes of one batch's requests into a single future."""

    def __init__(self, n: int):
        self.future: Future = Future()
        self.outcomes: list[Outcome | None] = [None] * n
        self.left = n
        self.lock = threading.Lock()
        if not n:
            self.future.set_result([])

    def done(self, i: int, outcome: Outcome | None, error: BaseException | None = None) -> None:
        with self.lock:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
                return
            self.outcomes[i] = outcome
            self.left -= 1
            if not self.left:
                self.future.set_result(self.outcomes)


class OpenAIBackend:
    """Generate captions through the chat-completions endpoint of `base_url`."""

    def __init__(self, options: OpenAIOptions):
        self.o = options
        self._client = None

    def load(self) -> None:
        """Open the HTTP client and start the worker threads."""
        from mmtools.errors import require_module

        httpx = require_module("httpx", "rewrite")
        o = self.o
        timeout = httpx.Timeout(o.timeout, connect=o.connect_timeout)
        limits = httpx.Limits(
            max_connections=o.concurrency, max_keepalive_connections=o.concurrency
        )
        headers = {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}
        self._client = httpx.Client(
            base_url=o.base_url.rstrip("/") + "/", timeout=timeout, limits=limits, headers=headers
        )
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._resume_at = 0.0
        self._rng = random.Random()
        # Daemon threads: a signal must not wait for requests in flight to time out.
        for n in range(o.concurrency):
            threading.Thread(target=self._work, name=f"mmtools-openai-{n}", daemon=True).start()

    def payload(self, req: Request) -> dict:
        """The chat-completions request body for one row."""
        part = None
        if req.image is not None:
            url = image_data_url(req.image, self.o.max_image_side)
            part = {"type": "image_url", "image_url": {"url": url}}
        body = {
            "model": self.o.model,
            "messages": chat_messages(req, part),
            "max_tokens": self.o.max_tokens,
            "temperature": self.o.temperature,
        }
        if self.o.seed is not None:
            body["seed"] = self.o.seed
        return body

    def submit(self, requests: list[Request], on_done) -> Future:
        """Queue all requests; the future gives one `Outcome` each, in order.

        `on_done(i, text)` is called (on a worker thread) as soon as request `i` succeeds.
        """
        batch = _Batch(len(requests))
        for i, req in enumerate(requests):
            self._jobs.put((batch, i, req, on_done))
        return batch.future

    def generate(self, requests: list[Request], on_done) -> list[Outcome]:
        """Run all requests, `concurrency` at a time."""
        return self.submit(requests, on_done).result()

    def close(self) -> None:
        """Stop the workers (requests in flight are abandoned) and close the client."""
        if self._client is None:
            return
        self._closing.set()
        for _ in range(self.o.concurrency):
            self._jobs.put(None)
        self._client.close()
        self._client = None

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            batch, i, req, on_done = job
            if self._closing.is_set():
                continue
            try:
                outcome = self._one(req)
                if outcome.text is not None:
                    on_done(i, outcome.text)
                batch.done(i, outcome)
            except Exception as e:  # a fatal answer (401) or a bug: fail the batch with it
                batch.done(i, None, e)

    def _one(self, req: Request) -> Outcome:
        try:
            body = self.payload(req)  # on the worker, so only `concurrency` images are held
        except MediaError as e:
            return Outcome(error=e.detail, reason=e.reason)
        for attempt in range(self.o.retries + 1):
            # A Retry-After pauses every request, not only its own.
            while (wait := self._resume_at - time.monotonic()) > 0:
                if self._closing.wait(wait):
                    return Outcome(error="stopped")
            try:
                return Outcome(text=self._post(body))
            except _Failure as e:
                failure = e
            if not failure.retry or attempt == self.o.retries:
                break
            if failure.retry_after is not None:
                with self._lock:
                    self._resume_at = max(self._resume_at, time.monotonic() + failure.retry_after)
            else:
                cap = self.o.backoff * 2**attempt
                if self._closing.wait(self._rng.uniform(0.5 * cap, cap)):
                    return Outcome(error="stopped")
        tries = f" after {attempt + 1} attempts" if attempt else ""
        return Outcome(error=f"{failure}{tries}", connection=failure.connection)

    def _post(self, body: dict) -> str:
        import httpx

        deadline = time.monotonic() + self.o.timeout
        try:
            with self._client.stream("POST", "chat/completions", json=body) as resp:
                chunks = []
                for chunk in resp.iter_bytes():
                    chunks.append(chunk)
                    if time.monotonic() > deadline:  # a server trickling bytes
                        raise httpx.ReadTimeout("total timeout")
                data = b"".join(chunks)
        except (
            httpx.ConnectError,
            httpx.RemoteProtocolError,
            httpx.ReadError,
            httpx.WriteError,
            httpx.ConnectTimeout,
        ) as e:
            raise _Failure(f"{type(e).__name__}: {e}", retry=True, connection=True) from None
        except httpx.TimeoutException:
            raise _Failure(f"timed out after {self.o.timeout:g} s", retry=True) from None
        return self._answer(resp, data)

    def _answer(self, resp, data: bytes) -> str:
        if resp.status_code == 200:
            try:
                return _content(json.loads(data))
            except ValueError:
                raise _Failure("response is not JSON", retry=True) from None
        detail = f"HTTP {resp.status_code}: {data[:200].decode(errors='replace')}"
        if resp.status_code in _FATAL:
            raise UsageError(
                f"the server at {self.o.base_url} answered {detail.strip()} "
                f"({_FATAL[resp.status_code]}); check --base-url, --model and --api-key-env"
            )
        retry = resp.status_code == 429 or resp.status_code >= 500
        after = retry_after_seconds(resp.headers.get("retry-after")) if retry else None
        raise _Failure(detail, retry=retry, retry_after=after)
