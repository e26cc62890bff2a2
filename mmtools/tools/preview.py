"""Readable previews of rows: media as format and size, embeddings as their shape."""

from __future__ import annotations

import pyarrow as pa

from mmtools.media import sniff_format


def _cell(value, field: pa.Field):
    if isinstance(value, dict) and set(value) == {"bytes", "path"}:
        data = value["bytes"]
        if data is None:
            return f"<path {value['path']}>"
        return f"<{sniff_format(data)} {len(data)} B>"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list) and pa.types.is_fixed_size_list(field.type):
        head = ", ".join(f"{v:.3f}" for v in value[:3] if v is not None)
        return f"[{head}, … ×{len(value)} {field.type.value_type}]"
    if isinstance(value, float):
        return round(value, 4)
    return value


def preview_rows(source, n: int, columns: list[str] | None) -> list[dict]:
    """The first `n` rows as JSON-ready dicts, reading no more batches than needed."""
    rows: list[dict] = []
    if n == 0:
        return rows
    fields = {f.name: f for f in source.schema}
    for batch in source.batches(columns=columns, batch_size=max(n, 1)):
        for row in batch.slice(0, n - len(rows)).to_pylist():
            rows.append({k: _cell(v, fields[k]) for k, v in row.items()})
        if len(rows) >= n:
            break
    return rows


def render_table(rows: list[dict], names: list[str], width: int) -> str:
    """A plain text table; long cells are cut with an ellipsis."""

    def cut(v) -> str:
        s = "" if v is None else str(v).replace("\n", " ")
        return s if len(s) <= width else s[: width - 1] + "…"

    cells = [[cut(r.get(k)) for k in names] for r in rows]
    widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(names)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(names, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
