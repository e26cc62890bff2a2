"""The `Rewrite` step: synthetic captions beside the original alt-text, with provenance.

Modes: `rewrite` (an LLM rewrites the alt-text, LaCLIP style), `caption` (a VLM describes the
image, optionally hinted with the alt-text), `fuse` (an LLM merges the alt-text with a
generated description, CapsFusion style). Backends: `openai` (any OpenAI-compatible server),
`transformers` (a local model) and `template` (offline rules). Rows whose generation failed
become reject rows; completed generations are cached per row so a rerun never pays twice.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C
from mmtools.errors import TemporaryError, UsageError
from mmtools.media import MediaError, cells, read
from mmtools.step import Result, Step, reject_batch, sources_of
from mmtools.steps.rewrite.cache import CaptionCache, cache_key
from mmtools.steps.rewrite.clean import clean_caption
from mmtools.steps.rewrite.prompts import (
    DESCRIPTION,
    MODES,
    Outcome,
    Request,
    example_turns,
    load_prompt,
    placeholders,
    render,
)

BACKENDS = ("openai", "transformers", "template")
DEFAULT_PROMPTS = {"rewrite": "rewrite", "caption": "caption", "fuse": "fuse"}
ALT = "alt"  # caption_source of a row whose mixed `text` is the original alt-text
# Options that change how fast or where captions are made, not what they say: kept out of the
# resume fingerprint, so a cron job may raise --concurrency or move the server and resume.
OPERATIONAL = (
    "base_url",
    "api_key_env",
    "concurrency",
    "timeout",
    "connect_timeout",
    "retries",
    "backoff",
    "device",
    "gen_batch_size",
    "cache",
)


@dataclass
class RewriteConfig:
    """Options of the rewrite step."""

    mode: str = "rewrite"
    backend: str = "openai"
    model: str = ""
    prompt: str = ""  # prompt text; empty means the shipped prompt for the mode
    examples: list[dict] = field(default_factory=list)
    column: str = C.TEXT_SYNTHETIC
    description_column: str = C.TEXT_SYNTHETIC
    mix: float | None = None
    seed: int = 0
    max_tokens: int = 128
    temperature: float = 0.0
    max_chars: int = 300
    max_image_side: int = 768
    precision: str = "fp32"
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    timeout: float = 120.0
    connect_timeout: float = 10.0
    retries: int = 4
    backoff: float = 1.0
    device: str = "auto"
    gen_batch_size: int = 8
    cache: str | None = None


def _check(c: RewriteConfig) -> None:
    if c.mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {c.mode!r}")
    if c.backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {c.backend!r}")
    if c.backend != "template" and not c.model:
        raise UsageError(f"the {c.backend} backend needs --model NAME")
    if c.mix is not None and not 0.0 <= c.mix <= 1.0:
        raise UsageError(f"--mix must be a probability between 0 and 1, not {c.mix}")
    reserved = (C.ID, C.TEXT, C.IMAGE, C.AUDIO, C.CAPTION_SOURCE, C.TEXT_ORIGINAL)
    if c.column in reserved:
        raise UsageError(
            f"--column {c.column} would overwrite a kept column; choose another "
            "name (use --mix to put synthetic captions into text)"
        )
    if c.concurrency < 1 or c.retries < 0 or c.timeout <= 0 or c.connect_timeout <= 0:
        raise UsageError("--concurrency must be >= 1, --retries >= 0 and timeouts > 0")
    if (
        c.backend == "openai"
        and c.api_key_env != "OPENAI_API_KEY"
        and (c.api_key_env not in os.environ)
    ):
        raise UsageError(f"environment variable {c.api_key_env} (--api-key-env) is not set")


def mix_choice(seed: int, row_id: str) -> float:
    """A uniform number in [0, 1) per (seed, row id): the same whatever the batch layout."""
    digest = hashlib.blake2b(f"mix:{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass
class _Pending:
    """A batch whose requests are with the backend."""

    batch: pa.RecordBatch
    ids: list
    failed: dict
    raw: dict = field(default_factory=dict)
    todo: list = field(default_factory=list)
    future: Future | None = None


def _set(batch: pa.RecordBatch, name: str, values: pa.Array) -> pa.RecordBatch:
    if name in batch.schema.names:
        return batch.set_column(batch.schema.get_field_index(name), name, values)
    return batch.append_column(name, values)


class Rewrite(Step):
    """Add a synthetic caption column and its `caption_source`; keep the alt-text."""

    name = "rewrite"
    loads_model = True  # a local model, or an HTTP client and cache worth keeping per worker
    transient = ("backend", "cache")

    def __init__(self, config: RewriteConfig):
        super().__init__(config)
        _check(config)
        self.prompt = config.prompt or load_prompt(DEFAULT_PROMPTS[config.mode])
        self.turns = example_turns(self.prompt, config.examples)
        self.source = ":".join(p for p in (config.mode, config.backend, config.model) if p)
        self.fields = self._fields()
        self.requires = tuple(dict.fromkeys([C.ID, *self._mode_columns(), *self.fields.values()]))
        self.produces = (config.column, C.CAPTION_SOURCE) + (
            (C.TEXT, C.TEXT_ORIGINAL) if config.mix is not None else ()
        )
        self.backend = self.cache = None

    def _mode_columns(self) -> list[str]:
        c = self.config
        cols = {"rewrite": [C.TEXT], "caption": [C.IMAGE], "fuse": [C.TEXT, c.description_column]}
        return cols[c.mode] + ([C.TEXT] if c.mix is not None else [])

    def _fields(self) -> dict[str, str]:
        """Prompt placeholder -> input column."""
        out = {}
        for name in placeholders(self.prompt):
            col = self.config.description_column if name == DESCRIPTION else name
            if col in C.MEDIA:
                raise UsageError(
                    f"the prompt uses {{{name}}}, a media column; the image is "
                    "sent with the prompt in caption mode, not pasted into it"
                )
            out[name] = col
        return out

    def params(self) -> dict:
        """Everything that decides the captions (the prompt text included)."""
        p = {k: v for k, v in asdict(self.config).items() if k not in OPERATIONAL}
        p["prompt"] = self.prompt
        return p

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """Input columns, plus (or replacing) the caption and provenance columns."""
        from mmtools.steps.rewrite.backends import require_backend

        require_backend(self.config)  # a missing module is refused before the output is touched
        if self.config.mode == "fuse" and self.config.description_column != C.TEXT_SYNTHETIC:
            C.require_named(schema, [self.config.description_column], "--description-column")
        C.require(schema, self.requires, self.name)
        if self.config.mix is not None and C.TEXT_ORIGINAL in schema.names:
            raise UsageError(
                f"the input already has {C.TEXT_ORIGINAL} (it was mixed before); "
                "mix only once, from the original alt-text"
            )
        for name in self.produces:
            f = pa.field(name, pa.string())
            if name in schema.names:
                schema = schema.set(schema.get_field_index(name), f)
            else:
                schema = schema.append(f)
        return schema

    def column_info(self) -> dict:
        """Which backend, model and prompt made the captions."""
        c = self.config
        info = {
            "mode": c.mode,
            "backend": c.backend,
            "model": c.model or None,
            "prompt_sha256": hashlib.sha256(self.prompt.encode()).hexdigest(),
            "examples": len(c.examples),
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
            "max_chars": c.max_chars,
        }
        out = {c.column: info, C.CAPTION_SOURCE: {"synthetic": self.source}}
        if c.mix is not None:
            out[C.TEXT] = {
                "mix": c.mix,
                "seed": c.seed,
                "synthetic_from": c.column,
                "alt_text_in": C.TEXT_ORIGINAL,
            }
        return out

    def setup(self) -> None:
        """Start the backend and open the cache."""
        from mmtools.steps.rewrite.backends import make_backend

        self.backend = make_backend(self.config)
        self.backend.load()
        if self.config.cache and self.config.backend != "template":
            self.cache = CaptionCache(self.config.cache)

    def close(self) -> None:
        """Stop the backend and close the cache."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def process(self, batch: pa.RecordBatch) -> Result:
        """Caption every row; failed rows become reject rows."""
        return self._finish(self._start(batch))

    def run(self, batches: Iterable[pa.RecordBatch]) -> Iterator[Result]:
        """Like `process` per batch, in order, with later batches' requests sent meanwhile.

        Batches are started until the rows behind the oldest unfinished one could keep every
        connection busy twice over (2 x concurrency), so small batches or a slow row at the
        head do not leave connections idle; a finished batch is yielded at once. Memory stays
        bounded by that window plus a batch.
        """
        pending: deque[_Pending] = deque()
        behind, window = 0, 2 * self.config.concurrency  # rows in pending[1:]
        for batch in batches:
            job = self._start(batch)
            behind += batch.num_rows if pending else 0
            pending.append(job)
            while pending and (pending[0].future.done() or behind >= window):
                yield self._finish(pending.popleft())
                behind -= pending[0].batch.num_rows if pending else 0
        while pending:
            yield self._finish(pending.popleft())

    def _start(self, batch: pa.RecordBatch) -> _Pending:
        """Build the requests, take what the cache has, and send the rest to the backend."""
        ids = batch.column(C.ID).to_pylist()
        requests, failed = self._requests(batch, ids)
        job = _Pending(batch, ids, failed)
        keys = {i: self._key(r) for i, r in requests.items()} if self.cache is not None else {}
        cached = self.cache.get_many(list(keys.values())) if keys else {}
        job.raw = {i: cached[keys[i]] for i in requests if keys.get(i) in cached}
        job.todo = [i for i in requests if i not in job.raw]

        def done(j: int, text: str) -> None:
            if keys:
                self.cache.put(keys[job.todo[j]], text)

        todo = [requests[i] for i in job.todo]
        job.future = self.backend.submit(todo, done)
        return job

    def _finish(self, job: _Pending) -> Result:
        """Wait for the backend; clean the captions; build the output and the reject rows."""
        outcomes = job.future.result()
        self._check_reachable(outcomes)
        failed, captions = job.failed, {}
        for i, o in zip(job.todo, outcomes, strict=True):
            if o.text is None:
                failed[i] = (o.reason, o.error)
            else:
                job.raw[i] = o.text
        for i, text in job.raw.items():
            cleaned = clean_caption(text, self.config.max_chars)
            if cleaned:
                captions[i] = cleaned
            else:
                failed[i] = ("empty_caption", f"nothing left after cleaning {text[:200]!r}")
        keep, bad, ids = sorted(captions), sorted(failed), job.ids
        out = self._output(
            job.batch.take(pa.array(keep, pa.int64())),
            [ids[i] for i in keep],
            [captions[i] for i in keep],
        )
        if not bad:
            return Result(out)
        reasons, details = [failed[i][0] for i in bad], [failed[i][1] for i in bad]
        sources = sources_of(job.batch, bad)
        return Result(
            out, reject_batch(self.name, [ids[i] for i in bad], reasons, details, sources)
        )

    def _requests(self, batch: pa.RecordBatch, ids: list) -> tuple[dict, dict]:
        c, n = self.config, batch.num_rows
        values = {
            k: batch.column(col).cast(pa.string()).to_pylist() for k, col in self.fields.items()
        }
        text = batch.column(C.TEXT).to_pylist() if C.TEXT in batch.schema.names else [None] * n
        desc = (
            batch.column(c.description_column).cast(pa.string()).to_pylist()
            if c.mode == "fuse"
            else [None] * n
        )
        images = _image_bytes(batch) if c.mode == "caption" else [(None, None)] * n
        hint = c.mode != "caption" or "text" in self.fields
        requests, failed = {}, {}
        for i in range(n):
            data, problem = images[i]
            if c.mode != "caption" and not (text[i] or "").strip():
                problem = ("missing_text", f"{C.TEXT} is empty")
            elif c.mode == "fuse" and not (desc[i] or "").strip():
                problem = ("missing_description", f"{c.description_column} is empty")
            if problem:
                failed[i] = problem
                continue
            prompt = render(self.prompt, {k: v[i] or "" for k, v in values.items()})
            key = hashlib.sha256(data).hexdigest() if data else ""
            requests[i] = Request(
                ids[i], prompt, self.turns, text[i] if hint else None, desc[i], data, key
            )
        return requests, failed

    def _key(self, req: Request) -> str:
        c = self.config
        return cache_key(
            backend=c.backend,
            model=c.model,
            mode=c.mode,
            prompt=req.prompt,
            examples=req.examples,
            image=req.image_key,
            seed=c.seed if c.temperature else None,  # greedy output ignores the seed
            max_tokens=c.max_tokens,
            temperature=c.temperature,
            max_image_side=c.max_image_side if req.image_key else None,
        )

    def _check_reachable(self, outcomes: list[Outcome]) -> None:
        down = [o for o in outcomes if o.connection]
        if down and 2 * len(down) > len(outcomes):
            raise TemporaryError(
                f"the backend at {self.config.base_url} is unreachable ({len(down)} of "
                f"{len(outcomes)} requests in this batch failed: {down[-1].error}); nothing was "
                "committed for this batch and finished rows are cached: rerun to resume"
            )

    def _output(self, out: pa.RecordBatch, ids: list, captions: list[str]) -> pa.RecordBatch:
        c = self.config
        synthetic = pa.array(captions, pa.string())
        source = pa.array([self.source] * len(ids), pa.string())
        out = _set(_set(out, c.column, synthetic), C.CAPTION_SOURCE, source)
        if c.mix is not None:
            alt = out.column(C.TEXT).cast(pa.string())
            pick = pa.array([mix_choice(c.seed, i) < c.mix for i in ids], pa.bool_())
            out = _set(out, C.CAPTION_SOURCE, pc.if_else(pick, source, ALT))
            out = _set(_set(out, C.TEXT, pc.if_else(pick, synthetic, alt)), C.TEXT_ORIGINAL, alt)
        return out


def _image_bytes(batch: pa.RecordBatch) -> list[tuple[bytes | None, tuple | None]]:
    """Per row: the image bytes (read from `path` when not stored), or a reject reason."""
    out = []
    for value in cells(batch.column(C.IMAGE)):
        try:
            out.append((read(value, "image"), None))
        except MediaError as e:
            out.append((None, (e.reason, e.detail)))
    return out
