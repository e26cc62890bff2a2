"""`score`: clip_score (and the audio–text score) from embeddings, embedding where missing;
scores from heads (aesthetic, NSFW, trained probes) and text or image queries."""

from mmtools.steps.score.heads import HeadScore, HeadScoreConfig, probe_config
from mmtools.steps.score.step import Score, ScoreConfig, score_steps

__all__ = ["HeadScore", "HeadScoreConfig", "Score", "ScoreConfig", "probe_config", "score_steps"]
