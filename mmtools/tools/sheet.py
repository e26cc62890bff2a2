"""Contact sheets: rows drawn as image tiles with their id, caption and values (PNG, HTML).

What a sheet shows: the first rows, the top rows by a column (`sort`), the rows either side
of a cut (`around`: those the cut keeps above a line, those it drops below), or duplicate
groups from `dedup --mark` (`groups`: one group a row, the kept row first). Only the chosen
rows are read in full (the row groups that hold them); choosing them reads one small column.
Every tile has the same size, so the sheet is exactly cols x rows tiles.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C
from mmtools.errors import UsageError

PAD = 6
FONT_SIZE = 12
LINE = 15
CAPTION_LINES = 2
KEPT, DROPPED, PLAIN = (40, 150, 60), (200, 40, 40), (210, 210, 210)
INK, FAINT = (30, 30, 30), (110, 110, 110)


@dataclass
class SheetConfig:
    """What a sheet shows and how large its tiles are."""

    n: int | None = None  # tiles (48), or groups with `groups` (8)
    cols: int = 8
    sort: str | None = None
    ascending: bool = False
    around: float | None = None
    groups: bool = False
    labels: tuple[str, ...] = ()  # columns printed under each tile (default: the sort column)
    tile: int = 160


@dataclass
class Layout:
    """The rows to draw and where: `slots[i]` is a row of `rows` or None (a blank tile)."""

    rows: pa.Table
    slots: list[int | None]
    labels: tuple[str, ...] = ()
    kept: list[bool | None] = field(default_factory=list)  # per row: frame colour
    status: list[str] = field(default_factory=list)  # per row: a word under the values
    cut_row: int | None = None  # the cut is drawn above this grid row
    cut_text: str = ""


def tile_size(config: SheetConfig, labels: int) -> tuple[int, int]:
    """Width and height of one tile with `labels` value lines."""
    text_lines = 1 + CAPTION_LINES + labels + 1  # id, caption, values, status
    return config.tile + 2 * PAD, config.tile + 2 * PAD + text_lines * LINE


# -- choosing the rows --------------------------------------------------------------------------


def select(source, config: SheetConfig) -> Layout:
    """Choose and read the rows of a sheet from a dataset `Source`."""
    if config.around is not None and config.sort is None:
        raise UsageError("--around needs --sort COLUMN (the column the cut is on)")
    if config.sort is not None or config.groups:
        source.spool()  # a stream on stdin is read twice: to choose the rows, then to draw them
    if config.groups:
        return _groups(source, config)
    labels = config.labels or ((config.sort,) if config.sort else _default_labels(source.schema))
    C.require(source.schema, [*labels, *([config.sort] if config.sort else [])], "sheet")
    n = config.n or 48
    if config.sort is None:
        return _first(source, n, labels)
    pos, values = _column(source, config.sort)
    if config.around is None:
        order = np.argsort(-values if not config.ascending else values, kind="stable")[:n]
        return _layout(source, pos[order].tolist(), labels, [None] * len(order))
    return _around(source, config, pos, values, labels, n)


def _default_labels(schema: pa.Schema) -> tuple[str, ...]:
    return tuple(c for c in (C.SIMILARITY, C.CLIP_SCORE) if c in schema.names)[:1]


def _column(source, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions and values of the rows where a numeric column is set (not null, not NaN)."""
    t = source.schema.field(name).type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise UsageError(f"--sort {name}: a numeric column is needed, it is {t}")
    chunks, start = [], 0
    for batch in source.batches(columns=[name], batch_size=65_536):
        col = pc.fill_null(batch.column(name).cast(pa.float64()), np.nan)
        chunks.append(col.to_numpy(zero_copy_only=False))
        start += batch.num_rows
    values = np.concatenate(chunks) if chunks else np.zeros(0)
    pos = np.flatnonzero(~np.isnan(values))
    return pos, values[pos]


def _around(source, config, pos, values, labels, n) -> Layout:
    """Rows just above the cut (kept: value >= cut) over rows just below it (dropped)."""
    cols = config.cols
    grid_rows = max(2, math.ceil(n / cols))
    above_n, below_n = (grid_rows // 2) * cols, (grid_rows - grid_rows // 2) * cols
    above = np.flatnonzero(values >= config.around)
    below = np.flatnonzero(values < config.around)
    above = above[np.argsort(values[above], kind="stable")][:above_n][::-1]  # nearest last
    below = below[np.argsort(-values[below], kind="stable")][:below_n]  # nearest first
    chosen = [*pos[above].tolist(), *pos[below].tolist()]
    layout = _layout(source, chosen, labels, [True] * len(above) + [False] * len(below))
    blanks = [None] * (above_n - len(above))
    layout.slots = [*blanks, *range(len(above)), *range(len(above), len(chosen))]
    layout.cut_row = grid_rows // 2
    layout.cut_text = f"{config.sort} = {config.around:g}: kept above (>=), dropped below"
    layout.status = ["kept" if k else "dropped" for k in layout.kept]
    return layout


def _groups(source, config: SheetConfig) -> Layout:
    """Duplicate groups of `dedup --mark`, largest first: the kept row, then its copies."""
    C.require(source.schema, [C.DUP_CLUSTER], "sheet --groups (run dedup --mark first)")
    labels = config.labels
    C.require(source.schema, labels, "sheet")
    marked = C.IS_DUPLICATE in source.schema.names
    names = [C.DUP_CLUSTER, *([C.IS_DUPLICATE] if marked else [])]
    cluster, dup = [], []
    for batch in source.batches(columns=names, batch_size=65_536):
        cluster.append(pc.fill_null(batch.column(C.DUP_CLUSTER), -1).to_numpy())
        flag = batch.column(C.IS_DUPLICATE) if marked else pa.array([False] * batch.num_rows)
        dup.append(np.asarray(pc.fill_null(flag, False)))
    cluster = np.concatenate(cluster) if cluster else np.zeros(0, np.int64)
    dup = np.concatenate(dup) if dup else np.zeros(0, bool)
    ids, first, sizes = np.unique(cluster, return_index=True, return_counts=True)
    wanted = [(s, f, c) for c, f, s in zip(ids, first, sizes, strict=True) if c >= 0 and s > 1]
    wanted.sort(key=lambda g: (-g[0], g[1]))
    chosen, slots, kept = [], [], []
    status: list[str] = []
    for size, _, c in wanted[: config.n or 8]:
        members = np.flatnonzero(cluster == c)
        members = members[np.argsort(dup[members], kind="stable")][: config.cols]
        slots += [*range(len(chosen), len(chosen) + len(members))]
        slots += [None] * (config.cols - len(members))
        chosen += members.tolist()
        kept += (~dup[members]).tolist()
        status += [
            (f"kept, 1 of {size}" if not dup[m] else f"duplicate, group {c}") for m in members
        ]
    layout = _layout(source, chosen, labels, kept)
    layout.slots = slots
    layout.status = status
    return layout


def _first(source, n: int, labels) -> Layout:
    """The first `n` rows, reading no further than they go."""
    batches, got = [], 0
    for batch in source.batches(columns=_wanted(source, labels), batch_size=n):
        batches.append(batch.slice(0, n - got))
        got += batches[-1].num_rows
        if got >= n:
            break
    rows = pa.Table.from_batches(batches) if batches else pa.table({})
    return Layout(rows, list(range(rows.num_rows)), tuple(labels), [None] * rows.num_rows)


def _wanted(source, labels) -> list[str]:
    if C.IMAGE not in source.schema.names:
        raise UsageError("a sheet draws images; the input has no image column")
    wanted = [C.ID, C.IMAGE, C.TEXT, *labels]
    return [c for c in wanted if c in source.schema.names]


def _layout(source, positions: list[int], labels, kept: list) -> Layout:
    from mmtools.io.rows import take_positions

    rows = take_positions(source, positions, _wanted(source, labels))
    return Layout(rows, list(range(len(positions))), tuple(labels), list(kept))


def layout_of(rows: pa.Table, labels: tuple[str, ...]) -> Layout:
    """Rows already in hand (search hits), drawn in order."""
    return Layout(rows, list(range(rows.num_rows)), labels, [None] * rows.num_rows)


# -- drawing ------------------------------------------------------------------------------------


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def thumbnail(value, side: int):
    """The image of a media cell scaled to fit `side` x `side`, or the reason it cannot be.
    A large JPEG decodes at reduced scale, to no less than twice the tile (as Pillow's own
    thumbnail() does): a 4000x3000 photograph in about a third of the time."""
    from PIL import Image

    from mmtools.media import MediaError, decoded_image, read

    try:
        with decoded_image(read(value, "image"), min_side=2 * side, longest=True) as img:
            scale = side / max(img.width, img.height)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            # Small images are enlarged too, so that every tile reads at the same size.
            return img.resize(size, Image.Resampling.LANCZOS)
    except MediaError as e:
        return e.reason


def _fit(draw, text: str, font, width: int, lines: int) -> list[str]:
    """Words wrapped to `lines` lines of `width` pixels; the last one cut with an ellipsis."""
    out, words = [], text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words or (out and draw.textlength(out[-1], font=font) > width):
        last = out[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        out[-1] = last + "…"
    return out


def _value(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _texts(layout: Layout, i: int) -> tuple[str, str, list[str], str]:
    row = {c: layout.rows.column(c)[i].as_py() for c in layout.rows.column_names if c != C.IMAGE}
    values = [f"{c}: {_value(row.get(c))}" for c in layout.labels]
    status = layout.status[i] if i < len(layout.status) else ""
    return str(row.get(C.ID, "")), row.get(C.TEXT) or "", values, status


def render_png(layout: Layout, config: SheetConfig, path: str) -> tuple[int, int]:
    """Draw the sheet as a PNG at `path` (written atomically); its size in pixels."""
    from PIL import Image, ImageDraw

    tw, th = tile_size(config, len(layout.labels))
    grid_rows = max(1, math.ceil(len(layout.slots) / config.cols))
    sheet = Image.new("RGB", (config.cols * tw, grid_rows * th), "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    images = layout.rows.column(C.IMAGE).to_pylist() if layout.rows.num_rows else []
    for k, i in enumerate(layout.slots):
        if i is not None:
            at = ((k % config.cols) * tw, (k // config.cols) * th)
            _tile(sheet, draw, font, layout, config, i, at, images[i])
    if layout.cut_row is not None:
        y = layout.cut_row * th
        draw.rectangle([0, y - 2, sheet.width, y + 2], fill=DROPPED)
        box = draw.textbbox((PAD, y + 4), layout.cut_text, font=font)
        draw.rectangle([box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2], fill="white")
        draw.text((PAD, y + 4), layout.cut_text, fill=DROPPED, font=font)
    _save(sheet, path)
    return sheet.size


def _tile(sheet, draw, font, layout: Layout, config: SheetConfig, i: int, at, image) -> None:
    """One tile: the framed thumbnail, then id, caption, values and status."""
    (x, y), side = at, config.tile
    tw, _ = tile_size(config, len(layout.labels))
    thumb = thumbnail(image, side)
    colour = {True: KEPT, False: DROPPED}.get(layout.kept[i] if layout.kept else None, PLAIN)
    draw.rectangle([x + 2, y + 2, x + tw - 3, y + PAD + side + 3], outline=colour, width=3)
    if isinstance(thumb, str):
        draw.rectangle([x + PAD, y + PAD, x + PAD + side, y + PAD + side], fill=PLAIN)
        draw.text((x + PAD + 4, y + PAD + 4), thumb, fill=DROPPED, font=font)
    else:
        off = ((side - thumb.width) // 2, (side - thumb.height) // 2)
        sheet.paste(thumb, (x + PAD + off[0], y + PAD + off[1]))
    row_id, caption, values, status = _texts(layout, i)
    width = tw - 2 * PAD
    lines = [(t, INK) for t in _fit(draw, row_id, font, width, 1)]
    lines += [(t, FAINT) for t in _fit(draw, caption, font, width, CAPTION_LINES)]
    lines += [("", INK)] * (1 + CAPTION_LINES - len(lines))
    lines += [(t, colour if colour != PLAIN else INK) for t in values]
    lines += [(status, colour)] if status else []
    for n, (text, fill) in enumerate(lines):
        draw.text((x + PAD, y + 2 * PAD + side + n * LINE), text, fill=fill, font=font)


def _save(img, path: str) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp-" + os.path.basename(path))
    img.save(tmp, "PNG", optimize=True)
    os.replace(tmp, path)


def render_html(layout: Layout, config: SheetConfig, path: str) -> None:
    """The same tiles as a self-contained HTML page (thumbnails inline as JPEG)."""
    tw, _ = tile_size(config, len(layout.labels))
    images = layout.rows.column(C.IMAGE).to_pylist() if layout.rows.num_rows else []
    cells = []
    for k, i in enumerate(layout.slots):
        if layout.cut_row is not None and k == layout.cut_row * config.cols:
            cells.append(f'<div class="cut">{html.escape(layout.cut_text)}</div>')
        if i is None:
            cells.append('<div class="tile blank"></div>')
            continue
        row_id, caption, values, status = _texts(layout, i)
        thumb = thumbnail(images[i], config.tile)
        if isinstance(thumb, str):
            picture = f'<div class="bad">{html.escape(thumb)}</div>'
        else:
            buf = io.BytesIO()
            thumb.save(buf, "JPEG", quality=85)
            data = base64.b64encode(buf.getvalue()).decode()
            picture = f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(row_id)}">'
        kind = {True: "kept", False: "dropped"}.get(layout.kept[i] if layout.kept else None, "")
        lines = "".join(f"<div class=v>{html.escape(v)}</div>" for v in [*values, status] if v)
        cells.append(
            f'<div class="tile {kind}">{picture}<div class=id>{html.escape(row_id)}</div>'
            f"<div class=cap>{html.escape(caption)}</div>{lines}</div>"
        )
    style = (
        f"body{{font:12px sans-serif}}.grid{{display:grid;grid-template-columns:"
        f"repeat({config.cols},{tw}px);gap:0}}.tile{{padding:{PAD}px;border:3px solid #ddd}}"
        f".tile img,.bad{{width:{config.tile}px;height:{config.tile}px;object-fit:contain;"
        "background:#eee}.kept{border-color:#289628}.dropped{border-color:#c82828}"
        ".id{font-weight:bold;overflow:hidden;white-space:nowrap}.cap{color:#666}"
        ".cut{grid-column:1/-1;border-top:4px solid #c82828;color:#c82828;padding:2px}"
    )
    page = (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(os.path.basename(path))}"
        f"</title><style>{style}</style><div class=grid>{''.join(cells)}</div>\n"
    )
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp-" + os.path.basename(path))
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)


def draw(rows: pa.Table, config: SheetConfig, path: str) -> tuple[int, int]:
    """Draw rows already in hand (e.g. search hits) in order, labelled with `config.labels`."""
    labels = tuple(c for c in config.labels if c in rows.column_names)
    return render_png(layout_of(rows, labels), config, path)
