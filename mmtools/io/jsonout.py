"""JSON that every reader accepts: a NaN or infinite number is written as null."""

from __future__ import annotations

import json
import math


def dumps(obj, **options) -> str:
    """`json.dumps(obj, ensure_ascii=False, default=str, **options)`, strict: NaN and
    infinities (which Python writes as bare NaN/Infinity) become null."""
    options = {"ensure_ascii": False, "default": str, **options}
    try:
        return json.dumps(obj, allow_nan=False, **options)
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False, **options)


def _finite(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v
