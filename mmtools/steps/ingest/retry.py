"""Which failed rows `ingest --retry-failed` re-attempts: the one list of transient reasons.

A download that timed out, lost its connection or met a server error (HTTP 429 or 5xx) may
succeed later; a 404, an unknown host, a broken image or a file too large will not.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C

# Always transient.
TRANSIENT_REASONS = frozenset({"timeout", "connection_error"})
# Transient when the detail names a retryable HTTP status (or, for `missing_file`, a URL that
# failed before any status: the network).
HTTP_REASONS = frozenset({"http_error", "missing_file"})
RETRYABLE_STATUS = frozenset({408, 425, 429})  # and every 5xx
STATUS = re.compile(r"\b(?:HTTP(?:/[\d.]+)?|status)[ :=]*(\d{3})\b", re.IGNORECASE)
URL = re.compile(r"https?://", re.IGNORECASE)
NO_HOST = re.compile(r"Name or service not known|nodename nor servname|getaddrinfo failed")


def retryable(reason: str, detail: str | None) -> bool:
    """Whether a reject with this reason and detail may succeed on another attempt."""
    if reason in TRANSIENT_REASONS:
        return True
    if reason not in HTTP_REASONS:
        return False
    detail = detail or ""
    if m := STATUS.search(detail) or re.match(r"\s*(\d{3})\b", detail):
        status = int(m.group(1))
        return status >= 500 or status in RETRYABLE_STATUS
    return reason == "missing_file" and bool(URL.search(detail)) and not NO_HOST.search(detail)


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
