"""`mmtools dedup`."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute, open_source
from mmtools.steps.dedup.step import DedupConfig

OPTIONS = O.Bundle(
    DedupConfig,
    {
        "methods": Annotated[
            list[str] | None,
            typer.Option(
                "-m",
                "--method",
                help="exact, phash, minhash or semantic; repeat (or "
                "comma-join) to run several, in the order given.  [default: exact]",
                show_default=False,
            ),
        ],
        "keep": Annotated[
            str,
            typer.Option(
                help="Row kept from each group: first, highest:COLUMN or "
                "lowest:COLUMN (ties go to the smaller id)."
            ),
        ],
        "mark": Annotated[
            bool, typer.Option("--mark", help="Keep every row; add dup_cluster and is_duplicate.")
        ],
        "exact_key": Annotated[
            str,
            typer.Option(
                help="exact: image, audio, text or a '+' of them (image+text); auto "
                "= the media columns present, else text."
            ),
        ],
        "max_distance": Annotated[
            int, typer.Option(help="phash: Hamming radius in bits (of 64).", min=0, max=32)
        ],
        "phash_flip": Annotated[
            bool,
            typer.Option(
                "--phash-flip",
                help="phash: also hash each image mirrored left to right, so flipped "
                "copies are duplicates (twice the hashing).",
            ),
        ],
        "threshold": Annotated[
            float, typer.Option(help="minhash: Jaccard similarity of word shingles.")
        ],
        "shingle": Annotated[int, typer.Option(help="minhash: words per shingle.", min=1)],
        "num_perm": Annotated[int, typer.Option(help="minhash: permutations.", min=2)],
        "eps": Annotated[
            float, typer.Option(help="semantic: duplicates have cosine similarity > 1 - eps.")
        ],
        "clusters": Annotated[
            int | None,
            typer.Option(
                help="semantic: k-means clusters (default: rows / 1000).",
                min=1,
                show_default=False,
            ),
        ],
        "column": Annotated[
            str,
            typer.Option(
                help="semantic: embedding column: image_embedding (the default), "
                "text_embedding, audio_embedding or any fixed-size list of floats.",
                show_default=False,
            ),
        ],
        "seed": O.Seed,
        "index": Annotated[
            str | None,
            typer.Option(
                metavar="DIR",
                help="Also drop rows matching any row kept by earlier runs with this index, "
                "and add this run's kept rows to it once the output commits (made on first "
                "use; a run with other methods or settings exits 6; one run at a time).",
                show_default=False,
            ),
        ],
    },
)


# Dropping nearly every row is far more often a bad --eps or model than a real corpus.
@O.expand(config=OPTIONS, common=O.LIGHT.but(max_drop_rate=0.95))
def dedup(config: DedupConfig, common: Common) -> None:
    """Drop (or mark) duplicate rows: exact, perceptual, near-duplicate caption, semantic.

    Example: mmtools dedup ds/ -m exact -m phash --keep highest:clip_score -o deduped/

    exact: equal sha256 of the media bytes and/or equal normalised caption. phash: 64-bit
    perceptual hashes (imagehash) at most --max-distance bits apart (--phash-flip: mirrored
    copies too). minhash: captions whose word-shingle Jaccard similarity is at least
    --threshold (MinHash LSH, then checked).
    semantic: SemDeDup, i.e. k-means on the embeddings, then rows in one cluster with cosine
    similarity above 1 - eps. Duplicates link rows into groups (transitively); one row per
    group is kept by --keep. Methods run in the order given, each on the rows the previous
    ones kept, as in a pipe. Only keys are held in memory; media are streamed twice.
    Undecodable images (phash) and bad embeddings (semantic) become reject rows.
    --index DIR dedups against every earlier run that used DIR (nightly batches): see
    `mmtools info DIR`.
    A run that drops (or, with --mark, marks) more than --max-drop-rate of its rows, 0.95
    by default, exits 7 after committing its output.
    """
    from mmtools.steps.dedup.step import Dedup

    methods = tuple(O.split_commas(config.methods))
    step = Dedup(replace(config, methods=methods, index_wait=common.wait_lock))

    def marked() -> dict[str, int]:  # with --mark, the rows a plain run would drop
        return {name: s["duplicates"] for name, s in step.stats.items()}

    source = open_source(common.inputs)
    execute("dedup", source, [step], common, marked=marked if config.mark else None)
    if step.stats and not common.quiet and not common.json:
        found = ", ".join(
            f"{name} {s['clusters']} ({s['duplicates']} duplicate rows"
            + (f", {s['of_earlier_runs']} of earlier runs" if "of_earlier_runs" in s else "")
            + ")"
            for name, s in step.stats.items()
        )
        typer.echo(f"mmtools dedup: clusters: {found}", err=True)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("dedup")(dedup)
