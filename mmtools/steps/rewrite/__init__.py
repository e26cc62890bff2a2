"""`rewrite`: synthetic captions from an LLM, a VLM or templates, beside the alt-text."""

from mmtools.steps.rewrite.step import Rewrite, RewriteConfig

__all__ = ["Rewrite", "RewriteConfig"]
