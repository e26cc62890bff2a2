"""Build the backend a `RewriteConfig` asks for."""

from __future__ import annotations

import os


def make_backend(config):
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
