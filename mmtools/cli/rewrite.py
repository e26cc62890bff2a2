"""`mmtools rewrite`."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute, open_source

_HTTP = "OpenAI-compatible server"
_LOCAL = "transformers backend"


def rewrite(
    inputs: O.Inputs = None,
    output: O.Output = None,
    mode: Annotated[
        str,
        typer.Option(
            help="rewrite (alt-text with an LLM), caption (the image "
            "with a VLM) or fuse (alt-text + a description)."
        ),
    ] = "rewrite",
    backend: Annotated[
        str,
        typer.Option(
            help="openai (any OpenAI-compatible server), "
            "transformers (a local model) or template (offline "
            "rules)."
        ),
    ] = "openai",
    model: Annotated[
        str,
        typer.Option(
            help="Model name on the server, or a Hugging Face model id or local directory."
        ),
    ] = "",
    prompt: Annotated[
        str | None,
        typer.Option(
            help="Prompt file, or the name of a shipped one "
            "(rewrite, caption, caption_hint, fuse); {text} "
            "and {column} are filled per row."
        ),
    ] = None,
    examples: Annotated[
        str | None,
        typer.Option(help="Few-shot examples: 'alt => caption' lines or JSONL with an output key."),
    ] = None,
    column: Annotated[str, typer.Option(help="Output column.")] = "text_synthetic",
    description_column: Annotated[
        str, typer.Option(help="fuse: the column with the generated description.")
    ] = "text_synthetic",
    mix: Annotated[
        float | None,
        typer.Option(
            help="Put the synthetic caption into text with "
            "this probability per row, the alt-text "
            "otherwise (kept in text_original)."
        ),
    ] = None,
    seed: O.Seed = 0,
    base_url: Annotated[
        str, typer.Option(help=f"{_HTTP}: base URL.", rich_help_panel=_HTTP)
    ] = "http://127.0.0.1:8000/v1",
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable holding the API key.", rich_help_panel=_HTTP)
    ] = "OPENAI_API_KEY",
    concurrency: Annotated[
        int, typer.Option(min=1, help="Requests in flight.", rich_help_panel=_HTTP)
    ] = 16,
    timeout: Annotated[
        float, typer.Option(help="Seconds per request attempt, in all.", rich_help_panel=_HTTP)
    ] = 120.0,
    connect_timeout: Annotated[
        float, typer.Option(help="Seconds to connect.", rich_help_panel=_HTTP)
    ] = 10.0,
    retries: Annotated[
        int,
        typer.Option(
            min=0,
            help="Retries per row (429, 5xx, timeouts, dropped connections).",
            rich_help_panel=_HTTP,
        ),
    ] = 4,
    backoff: Annotated[
        float,
        typer.Option(
            help="First retry delay in seconds; doubles, with jitter.", rich_help_panel=_HTTP
        ),
    ] = 1.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per row.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.0,
    max_chars: Annotated[
        int,
        typer.Option(help="Cut captions to this many characters at a word boundary (0: no limit)."),
    ] = 300,
    max_image_side: Annotated[
        int, typer.Option(help="caption: shrink images to this many pixels on the long side first.")
    ] = 768,
    cache: Annotated[
        str | None,
        typer.Option(
            help="Cache of finished generations (SQLite); default OUTPUT/_cache/rewrite.sqlite.",
            show_default=False,
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the cache.")
    ] = False,
    device: O.Device = "auto",
    precision: O.Precision = "fp32",
    gen_batch_size: Annotated[
        int, typer.Option(min=1, help="Rows per generate() call.", rich_help_panel=_LOCAL)
    ] = 8,
    overwrite: O.Overwrite = False,
    shard_rows: O.ShardRows = 10_000,
    shard_bytes: O.ShardBytes = 1 << 30,
    batch_size: O.BatchSize = 256,
    engine: O.Engine = "local",
    ray_address: O.RayAddress = None,
    ray_concurrency: O.RayConcurrency = None,
    num_gpus_per_worker: O.GpusPerWorker = None,
    quiet: O.Quiet = False,
    verbose: O.Verbose = False,
    json: O.Json = False,
    wait_lock: O.WaitLock = False,
) -> None:
    """Add synthetic captions (text_synthetic) beside the alt-text, with caption_source.

    Example: mmtools rewrite ds/ --model qwen2.5 --base-url http://localhost:8000/v1 -o out/

    Modes: rewrite (an LLM rewrites the alt-text, LaCLIP style; --examples adds few-shot
    turns), caption (a vision-language model describes the image, sent as a JPEG data URL;
    --prompt caption_hint passes the alt-text as a hint), fuse (an LLM merges the alt-text with
    the description in --description-column: mmtools rewrite ds --mode caption | mmtools
    rewrite --mode fuse -o out/). Rows that still fail after retries are reject rows
    (generation_failed, empty_caption); an unreachable backend exits 75 without committing the
    batch. Finished generations are cached per row in OUTPUT/_cache/rewrite.sqlite (or
    --cache PATH), so a rerun after a crash pays only for the rows left.
    """
    from mmtools.steps.rewrite.prompts import load_examples, load_prompt
    from mmtools.steps.rewrite.step import Rewrite, RewriteConfig

    cache_path = None if no_cache else cache or _default_cache(output, overwrite, wait_lock)
    config = RewriteConfig(
        mode=mode,
        backend=backend,
        model=model,
        prompt=load_prompt(prompt) if prompt else "",
        examples=load_examples(examples),
        column=column,
        description_column=description_column,
        mix=mix,
        seed=seed,
        max_tokens=max_tokens,
        temperature=temperature,
        max_chars=max_chars,
        max_image_side=max_image_side,
        precision=precision,
        base_url=base_url,
        api_key_env=api_key_env,
        concurrency=concurrency,
        timeout=timeout,
        connect_timeout=connect_timeout,
        retries=retries,
        backoff=backoff,
        device=device,
        gen_batch_size=gen_batch_size,
        cache=cache_path and os.path.abspath(cache_path),
    )
    step = Rewrite(config)
    common = Common.of(locals())
    execute("rewrite", open_source(inputs), [step], common)


def _default_cache(output: str | None, overwrite: bool, wait_lock: bool) -> str | None:
    """OUTPUT/_cache/rewrite.sqlite for a directory output; none for a stream."""
    if output in (None, "-"):
        return None
    cache_dir = os.path.join(output, "_cache")
    if overwrite and os.path.isdir(cache_dir):
        import shutil

        from mmtools.io.layout import LOCK_FILE
        from mmtools.io.lock import DirLock

        # Starting over includes the cache; under the output's lock, so a running writer
        # keeps its own.
        lock = DirLock(os.path.join(output, LOCK_FILE), wait=wait_lock)
        lock.acquire()
        try:
            shutil.rmtree(cache_dir)
        finally:
            lock.release()
    return os.path.join(cache_dir, "rewrite.sqlite")


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("rewrite")(rewrite)
