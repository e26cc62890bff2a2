"""`score`: clip_score (and the audio–text score) from embeddings, embedding where missing."""

from mmtools.steps.score.step import Score, ScoreConfig, score_steps

__all__ = ["Score", "ScoreConfig", "score_steps"]
