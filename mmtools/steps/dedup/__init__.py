"""`dedup`: exact, perceptual (pHash), text near-duplicate (MinHash LSH) and semantic dedup."""

from mmtools.steps.dedup.step import METHODS, Dedup, DedupConfig

__all__ = ["METHODS", "Dedup", "DedupConfig"]
