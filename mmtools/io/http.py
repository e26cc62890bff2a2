"""Downloading one URL: a deadline for all of it, retries on transient failures, a size cap.

`timeout` is one deadline for the whole URL: connecting, every read and every retry with
its wait. A read blocked on a silent or dripping server is cut at the deadline (its socket is
shut down from a timer thread), so a URL ends within the deadline whatever the server does;
only a name lookup that hangs in the resolver can outlast it. Failures raise
`MediaError(reason, detail)`, the detail naming the URL and the cause:

- `timeout`: the deadline passed;
- `connection_error`: refused, reset, or cut short (retried);
- `http_error`: a status other than 2xx (in the detail; 429 and 5xx retried), more than
  `MAX_REDIRECTS` redirects (a loop), or a URL that is not valid;
- `dns_error`: the host name does not resolve;
- `too_large`: more than `max_bytes`, said by Content-Length or counted while reading;
- `opted_out`: the answer carries an X-Robots-Tag directive of `disallowed`.

Retries wait `BACKOFF` seconds, doubled each time, with jitter, or what a 429's (or 503's)
Retry-After asks, and are given up when the wait would pass the deadline.
"""

from __future__ import annotations

import contextlib
import email.utils
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

from mmtools import __version__
from mmtools.media import MediaError

USER_AGENT = f"mmtools/{__version__} (multimodal dataset curation)"
DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
MAX_BYTES = 50_000_000
MAX_REDIRECTS = 10
BACKOFF = 0.5  # seconds before the first retry
TRANSIENT_REASONS = ("timeout", "connection_error")  # and http_error for 429 and 5xx
_RETRIED_STATUS = re.compile(r"\bHTTP (429|5\d\d)\b")


@dataclass(frozen=True)
class DownloadOptions:
    """How a URL is fetched (see the module docstring)."""

    timeout: float = 10.0
    retries: int = 2
    max_bytes: int = MAX_BYTES
    user_agent: str = USER_AGENT
    disallowed: tuple[str, ...] = DISALLOWED_DIRECTIVES


def is_url(path: str) -> bool:
    """Whether `path` is an http(s) URL."""
    return path.startswith(("http://", "https://"))


def transient(reason: str, detail: str) -> bool:
    """Whether a download that failed this way may succeed later (a retry is worth it)."""
    return reason in TRANSIENT_REASONS or (
        reason == "http_error" and bool(_RETRIED_STATUS.search(detail))
    )


class _Retry(Exception):
    """A transient failure: `error` if no retry is left, after waiting `wait` s otherwise."""

    def __init__(self, error: MediaError, wait: float | None = None):
        super().__init__(str(error))
        self.error, self.wait = error, wait


def download(url: str, options: DownloadOptions | None = None) -> bytes:
    """The body of `url`, or `MediaError`; `options.timeout` bounds it all, retries included."""
    options = options or DownloadOptions()
    _client()  # made once per process, before the deadline starts
    deadline = time.monotonic() + options.timeout
    for attempt in range(options.retries + 1):
        try:
            return _attempt(url, options, deadline)
        except _Retry as e:
            last = attempt == options.retries
            wait = 0.0 if last else e.wait if e.wait is not None else _backoff(attempt)
            if last or time.monotonic() + wait >= deadline:
                raise _given_up(e, attempt, last) from None
            time.sleep(wait)
    raise AssertionError("unreachable")


def _given_up(retry: _Retry, attempt: int, last: bool) -> MediaError:
    """The error of the last attempt, saying how many there were and why no more."""
    detail = retry.error.detail
    if attempt:
        detail += f" ({attempt + 1} attempts)"
    if retry.wait is not None and not last:
        detail += f"; Retry-After {retry.wait:g} s is past the deadline"
    return MediaError(retry.error.reason, detail)


def _backoff(attempt: int) -> float:
    """BACKOFF·2^attempt, half of it random, so that many failing URLs do not retry in step."""
    base = BACKOFF * 2**attempt
    return base / 2 + random.uniform(0, base / 2)


_CLIENT_LOCK = threading.Lock()


def _client():
    """One client for the process (thread-safe); no kept-alive connections: each attempt
    connects afresh, which lets its deadline find the socket, and LAION-style listings
    rarely ask one host twice in a row anyway."""
    with _CLIENT_LOCK:
        return _new_client()


@lru_cache(maxsize=1)
def _new_client():
    import httpx

    return httpx.Client(
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
    )


def _attempt(url: str, options: DownloadOptions, deadline: float) -> bytes:
    """One GET of `url` ended by `deadline`; `_Retry` for a failure worth another attempt."""
    import httpx

    left = deadline - time.monotonic()
    if left <= 0:
        raise MediaError("timeout", f"{url}: timed out after {options.timeout:g} s")
    cutoff = _Cutoff(left)
    try:
        with _client().stream(
            "GET",
            url,
            headers={"User-Agent": options.user_agent} if options.user_agent else None,
            timeout=left,
            extensions={"trace": cutoff.trace},
        ) as response:
            try:
                _check(response, url, options)
                body = _read_body(response, url, options.max_bytes)
            finally:
                cutoff.cancel()  # before the response closes its socket
            if not cutoff.fired:
                return body
    except httpx.TooManyRedirects:
        detail = f"{url}: more than {MAX_REDIRECTS} redirects (a redirect loop?)"
        raise MediaError("http_error", detail) from None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, UnicodeError) as e:
        raise MediaError("http_error", f"{url}: not a valid URL ({e})") from None
    except httpx.DecodingError as e:  # a damaged gzip or deflate body: no retry mends it
        raise MediaError("corrupt", f"{url}: {e}") from None
    except (httpx.HTTPError, OSError) as e:
        if not (cutoff.fired or isinstance(e, httpx.TimeoutException)):
            raise _network_error(url, e) from None
    finally:
        cutoff.cancel()
    raise _Retry(MediaError("timeout", f"{url}: timed out after {options.timeout:g} s"))


def _network_error(url: str, error: Exception) -> Exception:
    """`dns_error` (never retried) when the name did not resolve, else `connection_error`."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, socket.gaierror):
        cause = cause.__cause__ or cause.__context__
    message = " ".join(str(error).split()) or type(error).__name__
    if cause is not None:
        return MediaError("dns_error", f"{url}: cannot resolve the host name ({message})")
    return _Retry(MediaError("connection_error", f"{url}: {message}"))


def _check(response, url: str, options: DownloadOptions) -> None:
    """Refuse an answer by its status and headers, before reading its body."""
    status = response.status_code
    if not 200 <= status < 300:
        error = MediaError("http_error", f"{url}: HTTP {status} {response.reason_phrase}")
        if status == 429 or status >= 500:
            raise _Retry(error, _retry_after(response.headers.get("retry-after")))
        raise error
    if options.disallowed:
        token = options.user_agent.split("/", 1)[0].strip().lower()
        for value in response.headers.get_list("x-robots-tag"):
            if disallowed(value, token, options.disallowed):
                raise MediaError("opted_out", f"{url}: X-Robots-Tag: {value}")
    size = response.headers.get("content-length", "")
    if size.isdigit() and int(size) > options.max_bytes:
        detail = f"{url}: Content-Length {size} is over the limit of {options.max_bytes} bytes"
        raise MediaError("too_large", detail)


def disallowed(value: str, token: str, directives: tuple[str, ...]) -> bool:
    """Whether one X-Robots-Tag value forbids our use, as img2dataset reads it.

    `noai, noindex` applies to every agent; `otherbot: noai` only to the agent whose product
    token is `otherbot`. A value with commas before its colon (`noindex, unavailable_after:
    DATE`) names no agent, so its directives apply to every agent.
    """
    agent, colon, rest = value.partition(":")
    scoped = bool(colon) and "," not in agent
    if scoped and agent.strip().lower() != token:
        return False
    said = {d.strip().lower() for d in (rest if scoped else value).split(",")}
    return any(d in said for d in directives)


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks to wait (a number or an HTTP date), if it says."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _read_body(response, url: str, max_bytes: int) -> bytes:
    """The body, counted as it comes: an endless one ends at `max_bytes`."""
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise MediaError("too_large", f"{url}: more than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _Cutoff:
    """Ends an attempt at its deadline by shutting its sockets down from a timer thread.

    httpx's timeouts bound each wait on its own, so a server dripping a byte a second never
    trips them; shutting the socket down wakes the blocked read at once. The sockets are
    duplicates we own until `cancel`, so the timer never touches a number reused elsewhere.
    """

    def __init__(self, seconds: float):
        self.fired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, event: str, info: dict) -> None:
        """httpx's trace hook: hold each connection the attempt opens (redirects open more)."""
        if not event.endswith(".connect_tcp.complete"):  # to the server, or to a proxy
            return
        sock = info["return_value"].get_extra_info("socket")
        with self._lock:
            if self._timer is None:
                return
            self._sockets.append(sock.dup())
            if self.fired:
                _shut(self._sockets[-1])

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._sockets:
                _shut(sock)

    def cancel(self) -> None:
        """Stop the timer and let the sockets go."""
        with self._lock:
            if self._timer is None:
                return
            self._timer.cancel()
            self._timer = None
            for sock in self._sockets:
                sock.close()
            self._sockets = []


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the other side
        sock.shutdown(socket.SHUT_RDWR)
