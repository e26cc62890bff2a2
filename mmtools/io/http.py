"""Downloading one URL: a deadline for all of it, retries on transient failures, a size cap.

`timeout` is one deadline for the whole URL: connecting, every read and every retry with
its wait. A read blocked on a silent or dripping server is cut at the deadline (its socket is
shut down by a watchdog thread), so a URL ends within the deadline whatever the server does;
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

Requests go through the standard library's HTTP/1.1 client, one connection per request (a
LAION-style listing rarely asks one host twice in a row): a download costs a fraction of the
CPU time of a full-featured client's, which matters at hundreds of URLs a second. Redirects
are followed, `http_proxy`/`https_proxy`/`all_proxy`/`no_proxy` honoured (http:// proxies,
with user:password), and a gzip or deflate body decoded.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import functools
import heapq
import itertools
import os
import random
import re
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from urllib.parse import quote, unquote, urljoin, urlsplit

from mmtools import __version__
from mmtools.media import MediaError

USER_AGENT = f"mmtools/{__version__} (multimodal dataset curation)"
DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
MAX_BYTES = 50_000_000
MAX_REDIRECTS = 10
REDIRECTS = (301, 302, 303, 307, 308)
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


def _attempt(url: str, options: DownloadOptions, deadline: float) -> bytes:
    """One GET of `url`, redirects followed, ended by `deadline`; `_Retry` for a failure
    worth another attempt."""
    import http.client

    if deadline <= time.monotonic():
        raise MediaError("timeout", f"{url}: timed out after {options.timeout:g} s")
    cutoff = _Cutoff(deadline)
    try:
        target = url
        for _ in range(MAX_REDIRECTS + 1):
            with _get(target, options, cutoff, deadline) as response:
                location = response.getheader("location")
                if response.status in REDIRECTS and location:
                    target = urljoin(target, location.strip())
                    continue
                _check(response, url, options)
                body = _read_body(response, url, options.max_bytes)
            if not cutoff.cancel():  # the watchdog did not cut the body short
                return body
            break
        else:
            detail = f"{url}: more than {MAX_REDIRECTS} redirects (a redirect loop?)"
            raise MediaError("http_error", detail)
    except _InvalidURL as e:
        raise MediaError("http_error", f"{url}: not a valid URL ({e})") from None
    except (http.client.HTTPException, OSError) as e:
        if not (cutoff.cancel() or isinstance(e, TimeoutError)):
            raise _network_error(url, e) from None
    finally:
        cutoff.cancel()
    raise _Retry(MediaError("timeout", f"{url}: timed out after {options.timeout:g} s"))


class _InvalidURL(ValueError):
    """A URL with no host, another scheme than http(s), or a malformed address."""


_PATH_SAFE = "/?#[]@!$&'()*+,;=:-._~%"  # what a request target keeps; the rest is %-encoded


@contextlib.contextmanager
def _get(url: str, options: DownloadOptions, cutoff: _Cutoff, deadline: float):
    """The response to one GET of `url`, on a connection of its own whose socket `cutoff`
    can shut down; the connection closes on leaving."""
    import http.client

    scheme, host, port, target = _parse(url)
    headers = {"Connection": "close"}
    if options.user_agent:
        headers["User-Agent"] = options.user_agent
    proxy = _proxy(scheme, host)
    timeout = max(deadline - time.monotonic(), 0.001)
    if scheme == "https":
        conn = http.client.HTTPSConnection(
            *(proxy or (host, port))[:2], timeout=timeout, context=_tls()
        )
        if proxy:  # a CONNECT tunnel through the proxy
            conn.set_tunnel(host, port, headers=proxy[2])
    else:
        conn = http.client.HTTPConnection(*(proxy or (host, port))[:2], timeout=timeout)
        if proxy:  # the proxy fetches the absolute URL
            netloc = host if port == 80 else f"{host}:{port}"
            headers.update(proxy[2], Host=netloc)
            target = f"http://{netloc}{target}"
    conn._create_connection = cutoff.connect  # http.client's hook for opening the socket
    try:
        conn.request("GET", target, headers=headers)
        yield conn.getresponse()
    finally:
        conn.close()


def _parse(url: str) -> tuple[str, str, int, str]:
    """(scheme, ASCII host, port, request target) of an http(s) URL, or `_InvalidURL`."""
    try:
        parts = urlsplit(url.strip())
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
        if scheme not in ("http", "https") or not host:
            raise _InvalidURL("an http:// or https:// URL with a host name is needed")
        # A host name in IDNA's ASCII form; an IPv6 address in brackets.
        host = f"[{host}]" if ":" in host else host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as e:
        raise _InvalidURL(str(e) or type(e).__name__) from None
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_PATH_SAFE)
    return scheme, host, port or (443 if scheme == "https" else 80), target


def _proxy(scheme: str, host: str) -> tuple[str, int, dict] | None:
    """(host, port, headers) of the proxy the environment names for `scheme`, or None."""
    env = os.environ
    names = (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY")
    url = next((env[n] for n in names if env.get(n)), None)
    if url is None:
        return None
    from urllib.request import proxy_bypass_environment

    if proxy_bypass_environment(host.strip("[]")):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise MediaError("http_error", f"proxy {url}: only http:// proxies are supported")
    headers = {}
    if parts.username is not None:
        user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
    return parts.hostname, parts.port or 80, headers


@functools.cache
def _tls():
    """The TLS settings of https downloads: certificates checked against certifi's roots
    (those of the system where certifi is not installed)."""
    import ssl

    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


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
    status = response.status
    if not 200 <= status < 300:
        error = MediaError("http_error", f"{url}: HTTP {status} {response.reason}".rstrip())
        if status == 429 or status >= 500:
            raise _Retry(error, _retry_after(response.getheader("retry-after")))
        raise error
    if options.disallowed:
        token = options.user_agent.split("/", 1)[0].strip().lower()
        for value in response.headers.get_all("x-robots-tag") or ():
            if disallowed(value, token, options.disallowed):
                raise MediaError("opted_out", f"{url}: X-Robots-Tag: {value}")
    size = (response.getheader("content-length") or "").strip()
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


CHUNK = 1 << 16
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _read_body(response, url: str, max_bytes: int) -> bytes:
    """The body, counted as it comes (an endless one ends at `max_bytes`), and decoded
    where the server compressed it anyway (we ask for none)."""
    if response.length is not None:  # said by Content-Length, and within the limit
        body = response.read()
    else:
        chunks, size = [], 0
        while chunk := response.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise MediaError("too_large", f"{url}: more than {max_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
    encoding = (response.getheader("content-encoding") or "").strip().lower()
    if encoding not in _ENCODINGS:
        return body
    decoder = zlib.decompressobj(_ENCODINGS[encoding])
    try:
        body = decoder.decompress(body, max_bytes + 1)
    except zlib.error as e:  # a damaged body: no retry mends it
        raise MediaError("corrupt", f"{url}: damaged {encoding} body ({e})") from None
    if len(body) > max_bytes:
        raise MediaError("too_large", f"{url}: more than {max_bytes} bytes once decoded")
    return body


class _Cutoff:
    """Ends an attempt at its deadline by shutting its sockets down from the watchdog thread.

    A socket's timeout bounds each wait on its own, so a server dripping a byte a second
    never trips it; shutting the socket down wakes the blocked read at once. The sockets are
    duplicates we own until `cancel`, so the watchdog never touches a number reused
    elsewhere.
    """

    __slots__ = ("_done", "_lock", "_sockets", "deadline", "fired")

    def __init__(self, deadline: float):
        self.deadline, self.fired, self._done = deadline, False, False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        _WATCHDOG.watch(self)

    def connect(self, address, timeout, source_address=None) -> socket.socket:
        """Open a connection (for http.client) and hold a duplicate of its socket."""
        sock = socket.create_connection(address, timeout, source_address)
        with self._lock:
            if not self._done:
                self._sockets.append(sock.dup())
                if self.fired:
                    _shut(self._sockets[-1])
        return sock

    def fire(self) -> None:
        """The deadline has come: shut the sockets down."""
        with self._lock:
            if self._done:
                return
            self.fired = True
            for sock in self._sockets:
                _shut(sock)

    def cancel(self) -> bool:
        """Stop watching and let the sockets go; whether the deadline cut the attempt."""
        with self._lock:
            if self._done:
                return self.fired
            self._done = True
            for sock in self._sockets:
                sock.close()
            self._sockets = []
        _WATCHDOG.forget()
        return self.fired


class _Watchdog:
    """One thread for the process that fires each `_Cutoff` at its deadline."""

    def __init__(self):
        self._heap: list = []
        self._cond = threading.Condition()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._gone = 0  # cutoffs cancelled but still in the heap

    def watch(self, cutoff: _Cutoff) -> None:
        """Fire `cutoff` at its deadline, unless it is cancelled first."""
        with self._cond:
            heapq.heappush(self._heap, (cutoff.deadline, next(self._order), cutoff))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="mmtools-deadlines"
                )
                self._thread.start()
            elif self._heap[0][2] is cutoff:  # sooner than what the thread waits for
                self._cond.notify()

    def forget(self) -> None:
        """A cutoff was cancelled: drop the cancelled ones once they are most of the heap
        (a long deadline must not keep every finished download's entry)."""
        with self._cond:
            self._gone += 1
            if self._gone > 1024 and self._gone * 2 > len(self._heap):
                self._heap = [e for e in self._heap if not e[2]._done]
                heapq.heapify(self._heap)
                self._gone = 0

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    cutoff = heapq.heappop(self._heap)[2]
                    if cutoff._done:
                        self._gone = max(0, self._gone - 1)
                    cutoff.fire()
                self._cond.wait(self._heap[0][0] - now if self._heap else None)

    def _after_fork(self) -> None:
        self.__init__()


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG._after_fork)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the other side
        sock.shutdown(socket.SHUT_RDWR)
