"""`mmtools dedup`."""

from __future__ import annotations

from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute


def dedup(
    inputs: O.Inputs = None,
    output: O.Output = None,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "-m",
            "--method",
            help="exact, phash, minhash or semantic; repeat (or "
            "comma-join) to run several, in the order given.  [default: exact]",
            show_default=False,
        ),
    ] = None,
    keep: Annotated[
        str,
        typer.Option(
            help="Row kept from each group: first, highest:COLUMN or "
            "lowest:COLUMN (ties go to the smaller id)."
        ),
    ] = "first",
    mark: Annotated[
        bool, typer.Option("--mark", help="Keep every row; add dup_cluster and is_duplicate.")
    ] = False,
    exact_key: Annotated[
        str,
        typer.Option(
            help="exact: image, audio, text or a '+' of them (image+text); auto "
            "= the media columns present, else text."
        ),
    ] = "auto",
    max_distance: Annotated[
        int, typer.Option(help="phash: Hamming radius in bits (of 64).", min=0, max=32)
    ] = 6,
    threshold: Annotated[
        float, typer.Option(help="minhash: Jaccard similarity of word shingles.")
    ] = 0.6,
    shingle: Annotated[int, typer.Option(help="minhash: words per shingle.", min=1)] = 2,
    num_perm: Annotated[int, typer.Option(help="minhash: permutations.", min=2)] = 128,
    eps: Annotated[
        float, typer.Option(help="semantic: duplicates have cosine similarity > 1 - eps.")
    ] = 0.05,
    clusters: Annotated[
        int | None,
        typer.Option(
            help="semantic: k-means clusters (default: rows / 1000).", min=1, show_default=False
        ),
    ] = None,
    column: Annotated[
        str | None,
        typer.Option(
            help="semantic: embedding column: image_embedding (the default), text_embedding, "
            "audio_embedding or any fixed-size list of floats.",
            show_default=False,
        ),
    ] = None,
    seed: O.Seed = 0,
    overwrite: O.Overwrite = False,
    shard_rows: O.ShardRows = 10_000,
    shard_bytes: O.ShardBytes = 1 << 30,
    batch_size: O.BatchSize = 1024,
    engine: O.Engine = "local",
    ray_address: O.RayAddress = None,
    ray_concurrency: O.Concurrency = None,
    num_gpus_per_worker: O.GpusPerWorker = None,
    quiet: O.Quiet = False,
    verbose: O.Verbose = False,
    json: O.Json = False,
    wait_lock: O.WaitLock = False,
) -> None:
    """Drop (or mark) duplicate rows: exact, perceptual, near-duplicate caption, semantic.

    Example: mmtools dedup ds/ -m exact -m phash --keep highest:clip_score -o deduped/

    exact: equal sha256 of the media bytes and/or equal normalised caption. phash: 64-bit
    perceptual hashes (imagehash) at most --max-distance bits apart. minhash: captions whose
    word-shingle Jaccard similarity is at least --threshold (MinHash LSH, then checked).
    semantic: SemDeDup, i.e. k-means on the embeddings, then rows in one cluster with cosine
    similarity above 1 - eps. Duplicates link rows into groups (transitively); one row per
    group is kept by --keep. Methods run in the order given, each on the rows the previous
    ones kept, as in a pipe. Only keys are held in memory; media are streamed twice.
    Undecodable images (phash) and bad embeddings (semantic) become reject rows.
    """
    from mmtools import columns as C
    from mmtools.cli.common import open_source
    from mmtools.steps.dedup.step import Dedup, DedupConfig

    methods = tuple(m.strip() for spec in (method or ["exact"]) for m in spec.split(","))
    config = DedupConfig(
        methods,
        keep,
        mark,
        exact_key,
        max_distance,
        threshold,
        num_perm,
        shingle,
        eps,
        clusters,
        column or C.IMAGE_EMBEDDING,
        seed,
    )
    step = Dedup(config)
    common = Common.of(locals())
    execute("dedup", open_source(inputs), [step], common)
    if step.stats and not quiet and not json:
        found = ", ".join(
            f"{name} {s['clusters']} ({s['duplicates']} duplicate rows)"
            for name, s in step.stats.items()
        )
        typer.echo(f"mmtools dedup: clusters: {found}", err=True)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("dedup")(dedup)
