"""The caption backend contract, and building the backend a `RewriteConfig` asks for."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from mmtools.steps.rewrite.prompts import Outcome, Request

OnDone = Callable[[int, str], None]  # called with (request index, caption) as each finishes


class CaptionBackend(Protocol):
    """What `Rewrite` needs of a backend: load, caption a list of requests, close."""

    def load(self) -> None:
        """Load the model or open the connection; called once per worker, in `setup()`."""

    def submit(self, requests: list[Request], on_done: OnDone) -> Future:
        """Start captioning `requests`; the future holds one `Outcome` per request, in order."""

    def close(self) -> None:
        """Release the model or connection."""


class InProcessBackend:
    """A backend that captions in the calling thread: `submit` is `generate`, done at once."""

    def load(self) -> None:
        """Nothing to load."""

    def generate(self, requests: list[Request], on_done: OnDone) -> list[Outcome]:
        """One `Outcome` per request, in order."""
        raise NotImplementedError

    def submit(self, requests: list[Request], on_done: OnDone) -> Future:
        """`generate` now; its result as a finished future."""
        future: Future = Future()
        future.set_result(self.generate(requests, on_done))
        return future

    def close(self) -> None:
        """Nothing to release."""


# The optional module each backend needs (its extra: rewrite).
NEEDS = {"openai": "httpx", "transformers": "transformers"}


def require_backend(config) -> None:
    """Refuse a backend whose module is not installed, with the pip hint."""
    from mmtools.errors import require_module

    if config.backend in NEEDS:
        require_module(NEEDS[config.backend], "rewrite")


def make_backend(config) -> CaptionBackend:
    """The openai, transformers or template backend for `config` (not loaded yet)."""
    if config.backend == "template":
        from mmtools.steps.rewrite.template_backend import TemplateBackend

        return TemplateBackend(config.mode, config.seed)
    if config.backend == "transformers":
        from mmtools.steps.rewrite.transformers_backend import (
            TransformersBackend,
            TransformersOptions,
        )

        return TransformersBackend(
            TransformersOptions(
                model=config.model,
                vision=config.mode == "caption",
                device=config.device,
                precision=config.precision,
                batch_size=config.gen_batch_size,
                max_tokens=config.max_tokens,
                temperature=config.temperature,
                max_image_side=config.max_image_side,
            )
        )
    from mmtools.steps.rewrite.openai_backend import OpenAIBackend, OpenAIOptions

    return OpenAIBackend(
        OpenAIOptions(
            base_url=config.base_url,
            model=config.model,
            api_key=os.environ.get(config.api_key_env),
            concurrency=config.concurrency,
            timeout=config.timeout,
            connect_timeout=config.connect_timeout,
            retries=config.retries,
            backoff=config.backoff,
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            max_image_side=config.max_image_side,
            seed=config.seed if config.temperature else None,
        )
    )
