"""`mmtools rewrite`."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Annotated

import typer

from mmtools.cli import options as O
from mmtools.cli.common import Common, execute, open_source
from mmtools.steps.rewrite.step import RewriteConfig

_HTTP = "OpenAI-compatible server"
_LOCAL = "transformers backend"


def _http(help: str, type_: type, **kw) -> object:
    """An option of the OpenAI-compatible backend."""
    return Annotated[type_, typer.Option(help=help, rich_help_panel=_HTTP, **kw)]


OPTIONS = O.Bundle(
    RewriteConfig,
    {
        "mode": Annotated[
            str,
            typer.Option(
                help="rewrite (alt-text with an LLM), caption (the image "
                "with a VLM) or fuse (alt-text + a description)."
            ),
        ],
        "backend": Annotated[
            str,
            typer.Option(
                help="openai (any OpenAI-compatible server), "
                "transformers (a local model) or template (offline "
                "rules)."
            ),
        ],
        "model": Annotated[
            str,
            typer.Option(
                help="Model name on the server, or a Hugging Face model id or local directory."
            ),
        ],
        "prompt": Annotated[
            str | None,
            typer.Option(
                help="Prompt file, or the name of a shipped one "
                "(rewrite, caption, caption_hint, fuse); {text} "
                "and {column} are filled per row."
            ),
        ],
        "examples": Annotated[
            str | None,
            typer.Option(
                help="Few-shot examples: 'alt => caption' lines or JSONL with an output key."
            ),
        ],
        "column": Annotated[str, typer.Option(help="Output column.")],
        "description_column": Annotated[
            str, typer.Option(help="fuse: the column with the generated description.")
        ],
        "mix": Annotated[
            float | None,
            typer.Option(
                help="Put the synthetic caption into text with "
                "this probability per row, the alt-text "
                "otherwise (kept in text_original)."
            ),
        ],
        "seed": O.Seed,
        "base_url": _http(f"{_HTTP}: base URL.", str),
        "api_key_env": _http("Environment variable holding the API key.", str),
        "concurrency": _http("Requests in flight.", int, min=1),
        "timeout": _http("Seconds per request attempt, in all.", float),
        "connect_timeout": _http("Seconds to connect.", float),
        "retries": _http("Retries per row (429, 5xx, timeouts, dropped connections).", int, min=0),
        "backoff": _http("First retry delay in seconds; doubles, with jitter.", float),
        "max_tokens": Annotated[int, typer.Option(min=1, help="Tokens to generate per row.")],
        "temperature": Annotated[float, typer.Option(help="0 means greedy.")],
        "max_chars": Annotated[
            int,
            typer.Option(
                help="Cut captions to this many characters at a word boundary (0: no limit)."
            ),
        ],
        "max_image_side": Annotated[
            int,
            typer.Option(help="caption: shrink images to this many pixels on the long side first."),
        ],
        "cache": Annotated[
            str | None,
            typer.Option(
                help="Cache of finished generations (SQLite); default "
                "OUTPUT/_cache/rewrite.sqlite.",
                show_default=False,
            ),
        ],
        "device": O.Device,
        "precision": O.Precision,
        "gen_batch_size": Annotated[
            int, typer.Option(min=1, help="Rows per generate() call.", rich_help_panel=_LOCAL)
        ],
    },
).but(prompt=None, examples=None)  # a file or name, and a file; loaded into the config
# --concurrency is the requests in flight here; Ray's is --ray-concurrency only.
DATASET = O.DATASET.declare(ray_concurrency=O.RayConcurrency).but(batch_size=256)


@O.expand(config=OPTIONS, common=DATASET)
def rewrite(
    config: RewriteConfig,
    common: Common,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the cache.")
    ] = False,
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
    from mmtools.steps.rewrite.step import Rewrite

    c = common
    cache = None if no_cache else config.cache or _default_cache(c.output, c.overwrite, c.wait_lock)
    config = replace(
        config,
        prompt=load_prompt(config.prompt) if config.prompt else "",
        examples=load_examples(config.examples),
        cache=cache and os.path.abspath(cache),
    )
    step = Rewrite(config)
    execute("rewrite", open_source(c.inputs), [step], c)


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
