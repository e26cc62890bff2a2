"""Which failed rows `ingest --retry-failed` re-attempts, and serving only those.

A download that timed out, lost its connection or met a server error (HTTP 429 or 5xx) may
succeed later; a 404, an unknown host, a broken image or a file too large will not.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C

URL = re.compile(r"https?://", re.IGNORECASE)
STATUS = re.compile(r"\bHTTP \d{3}\b")
NO_HOST = re.compile(r"Name or service not known|nodename nor servname|getaddrinfo failed")


def retryable(reason: str, detail: str | None) -> bool:
    """Whether a reject with this reason and detail may succeed on another attempt: the
    downloader's own rule (`io.http.transient`). Outputs made before the downloader had its
    reasons called every URL failure `missing_file`; those are read by their detail."""
    from mmtools.io.http import transient

    detail = detail or ""
    if reason == "missing_file" and URL.search(detail):
        if STATUS.search(detail):
            reason = "http_error"
        else:
            reason = "dns_error" if NO_HOST.search(detail) else "connection_error"
    return transient(reason, detail)


def retry_ids(rejects: pa.Table, step: str = "ingest") -> list[str]:
    """Ids of the reject rows of `step` that `retryable` picks, each once, in order."""
    if not rejects.num_rows:
        return []
    mine = rejects.filter(pc.equal(rejects.column(C.REJECT_STEP), step))
    ids = mine.column(C.ID).to_pylist()
    reasons = mine.column(C.REJECT_REASON).to_pylist()
    details = mine.column(C.REJECT_DETAIL).to_pylist()
    picked = dict.fromkeys(
        i for i, r, d in zip(ids, reasons, details, strict=True) if retryable(r, d)
    )
    return list(picked)


def restrict(source, ids: list[str]) -> None:
    """Serve only the listing rows of `ids` (the source's identity and kinds stay the full
    listing's, so the retry matches the run that made the output)."""
    table = source.table
    source.table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(ids, pa.string())))
    source.total_rows = source.table.num_rows
