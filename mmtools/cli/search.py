"""`mmtools search`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, open_sink, setup_logging
from mmtools.errors import UsageError
from mmtools.io.jsonout import dumps

Index = Annotated[str, typer.Argument(metavar="INDEX", help="An index made by mmtools index.")]
Text = Annotated[
    str | None, typer.Option("--text", help="Find rows like this caption.", show_default=False)
]
Image = Annotated[
    str | None,
    typer.Option("--image", metavar="FILE", help="Find rows like this image.", show_default=False),
]
RowId = Annotated[
    str | None,
    typer.Option(
        "--id", metavar="ID", help="Find rows like this row of the index.", show_default=False
    ),
]
K = Annotated[int, typer.Option("-k", min=1, help="Number of hits.")]
Json = Annotated[bool, typer.Option("--json", help="Print the hits as JSON.")]
Sheet = Annotated[
    str | None,
    typer.Option(
        "--sheet", metavar="PNG", help="Also draw the hits as a contact sheet.", show_default=False
    ),
]
Nprobe = Annotated[
    int | None,
    typer.Option(
        "--nprobe",
        min=1,
        help="IVF lists to scan (default: the one the build chose).",
        show_default=False,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model", help="Only to check: the model the index was built with.", show_default=False
    ),
]
Width = Annotated[int, typer.Option(help="Widest cell in the table, in characters.")]


def search(
    index: Index,
    text: Text = None,
    image: Image = None,
    row_id: RowId = None,
    k: K = 20,
    json: Json = False,
    output: O.Output = None,
    sheet: Sheet = None,
    nprobe: Nprobe = None,
    model: Model = None,
    pretrained: O.Pretrained = None,
    device: O.Device = "auto",
    overwrite: O.Overwrite = False,
    width: Width = 60,
    quiet: O.Quiet = False,
    verbose: O.Verbose = False,
) -> None:
    """Find the rows nearest to a caption, an image or a row, in an index.

    Example: mmtools search idx/ --text "a red circle" -k 10

    Text and image queries are embedded by the model recorded in the index (the bundled
    mmtools-shapes works offline); another model is refused. Prints a table (rank, id,
    similarity, caption, source), or JSON with --json; -o DIR writes the hit rows as a
    dataset (with a similarity column), --sheet hits.png draws them as a contact sheet.
    """
    from mmtools.io.index import IndexReader
    from mmtools.tools.index import hits as H

    setup_logging(verbose, quiet)
    reader = IndexReader(index)
    vec = H.query_vector(
        reader,
        text=text,
        image=image,
        row_id=row_id,
        device=device,
        model=model,
        pretrained=pretrained,
    )
    found = H.find(reader, vec, k, nprobe)
    rows = _rows(reader, found, full=bool(output or sheet))
    if output:
        query = {"text": text, "image": image, "id": row_id, "k": k, "nprobe": nprobe}
        inputs = [reader.path, reader.manifest["generation"], reader.manifest["updated"]]
        fp = {"command": "search", "params": query, "inputs": inputs}
        argv = ["mmtools", *sys.argv[1:]]
        sink = open_sink(Common(output=output, overwrite=overwrite), argv)
        H.write_hits(sink, rows, fp, {reader.column: reader.model} if reader.model else {}, argv)
    if sheet:
        from mmtools import columns as C
        from mmtools.tools.sheet import SheetConfig, draw

        draw(rows, SheetConfig(labels=(C.SIMILARITY,)), sheet)
    _print(H.table_rows(found, rows), index, json, width, sys.stderr if output == "-" else None)
    if not quiet:
        print(f"mmtools search: {found.num_rows} hits from {reader.rows} vectors", file=sys.stderr)


def _rows(reader, found, full: bool):
    """The hits' rows: all columns for -o/--sheet, else only the caption and source."""
    import logging

    from mmtools import columns as C
    from mmtools.errors import DataContractError
    from mmtools.tools.index import hits as H

    if reader.kind == "centroids":
        if full:
            raise UsageError(f"{reader.path} holds k-means centres: there are no rows to write")
        return None
    if full:
        return H.hit_rows(reader, found)
    try:
        return H.hit_rows(reader, found, [C.ID, C.TEXT, C.SOURCE])
    except (DataContractError, OSError) as e:
        logging.getLogger("mmtools").warning("%s; showing the hits without captions", e)
        return None


def _print(table: list[dict], index: str, as_json: bool, width: int, out) -> None:
    """The hits as a table or JSON on stdout (stderr when stdout carries the Arrow stream)."""
    from mmtools import columns as C
    from mmtools.tools.preview import render_table

    out = out or sys.stdout
    if as_json:
        print(dumps({"index": index, "hits": table}), file=out)
    elif table:
        shown = [{**r, C.SIMILARITY: f"{r[C.SIMILARITY]:.4f}"} for r in table]
        print(render_table(shown, list(table[0]), width), file=out)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("search")(search)
