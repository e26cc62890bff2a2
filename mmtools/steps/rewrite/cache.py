"""A persistent per-row cache of generated captions, so a rerun never pays twice for a row.

The cache is a SQLite file (WAL mode). Each caption is committed as soon as its request
completes, so a run killed mid-batch keeps what it already paid for. Keys hash everything
that decides the answer: backend, model, mode, generation options, the rendered prompt and
few-shot turns (which hold the row's text) and the image bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time

from mmtools.errors import UsageError

_CHUNK = 500  # SQLite's default limit on bound parameters is 999


def cache_key(**parts) -> str:
    """A stable hash of the parts that decide a generated caption."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class CaptionCache:
    """Completed generations by key, committed one row at a time."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()  # puts come from the HTTP client thread
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._db = sqlite3.connect(
                path, timeout=60, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS captions "
                "(key TEXT PRIMARY KEY, text TEXT NOT NULL, created REAL NOT NULL)"
            )
        except (OSError, sqlite3.Error) as e:
            raise UsageError(
                f"cannot open the rewrite cache {path}: {e}; pass --cache PATH or --no-cache"
            ) from None

    def get_many(self, keys: list[str]) -> dict[str, str]:
        """The cached texts of those `keys` that are present."""
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), _CHUNK):
            chunk = unique[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(
                    f"SELECT key, text FROM captions WHERE key IN ({marks})", chunk
                ).fetchall()
            found.update(rows)
        return found

    def put(self, key: str, text: str) -> None:
        """Store one completed generation (committed at once)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO captions VALUES (?, ?, ?)", (key, text, time.time())
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM captions").fetchone()[0]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
