"""Byte sizes as people write and read them: '4GB', '512M', '1.5GiB' in, '1.5 GiB' out."""

from __future__ import annotations

import math
import re

from mmtools.errors import UsageError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, option: str = "--max-memory") -> int:
    """'4GB', '512M', '1.5GiB' or '1000000' as bytes (K, M, G, T: powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise UsageError(f"{option} takes a size such as 4GB or 512MB, not {text!r}")
    return int(float(m[1]) * _UNITS[m[2]])


def human_bytes(n: float, up: bool = False) -> str:
    """1536 -> '1.5 KiB'; `up` rounds up (a figure to give that is enough)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{math.ceil(n) if up else round(n)} B"
            return f"{math.ceil(n * 10) / 10 if up else n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
