"""`score`: cosine similarity of media and text embeddings (`clip_score`, `audio_text_score`).

Scores are raw cosines in [-1, 1] (not x100, not times the logit scale). LAION-400M kept
pairs whose cosine under OpenAI's ViT-B/32 (`--model ViT-B-32 --pretrained openai`) was at
least 0.28 on this scale; other models need their own threshold. Embeddings are compared
only when their metadata says one model made both; missing ones are computed on the fly
with the same steps `mmtools embed` runs, so `embed | score` and `score` agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools import models
from mmtools.errors import DataContractError, UsageError
from mmtools.step import Result, Step, rejects_at
from mmtools.steps.embed import ClapEmbed, ClipEmbed, EmbedConfig
from mmtools.steps.score.heads import HeadScore, HeadScoreConfig

log = logging.getLogger("mmtools")

SCORES = {"image": C.CLIP_SCORE, "audio": C.AUDIO_TEXT_SCORE}


@dataclass
class ScoreConfig:
    """Which media to score against the text: "image" (clip_score) or "audio"."""

    media: str = "image"


def _describe(info: dict) -> str:
    pretrained = info.get("pretrained")
    return f"{info.get('model')}" + (f" ({pretrained})" if pretrained else "")


def check_same_model(schema: pa.Schema, a: str, b: str) -> dict:
    """Refuse to compare embeddings of different sizes or models; return their provenance."""
    dims = []
    for name in (a, b):
        t = schema.field(name).type
        if not pa.types.is_fixed_size_list(t) or not pa.types.is_floating(t.value_type):
            raise DataContractError(
                f"{name} is {t}, not a fixed-size list of floats; re-embed it with mmtools embed"
            )
        dims.append(t.list_size)
    if dims[0] != dims[1]:
        raise DataContractError(
            f"{a} has {dims[0]} dimensions but {b} has {dims[1]}: they come "
            "from different models; re-embed both with mmtools embed"
        )
    info = C.column_info(schema)
    ia, ib = info.get(a), info.get(b)
    if ia and ib:
        if (ia.get("model"), ia.get("pretrained")) != (ib.get("model"), ib.get("pretrained")):
            raise DataContractError(
                f"{a} was made by {_describe(ia)} but {b} by {_describe(ib)}; their cosine means "
                "nothing. Re-embed both with one model (mmtools embed --model ...)"
            )
        return ia
    if ia or ib:
        log.warning(
            "%s has no model metadata; assuming it comes from %s",
            b if ia else a,
            _describe(ia or ib),
        )
        return ia or ib
    log.warning("%s and %s carry no model metadata; cannot check they share a model", a, b)
    return {}


class Score(Step):
    """Add the cosine of a media embedding and the text embedding as a float32 column."""

    name = "score"
    light = True

    def __init__(self, config: ScoreConfig | None = None):
        super().__init__(config or ScoreConfig())
        if self.config.media not in SCORES:
            raise UsageError(f"--media must be image or audio, not {self.config.media!r}")
        self.pair = (C.EMBEDDINGS[self.config.media], C.TEXT_EMBEDDING)
        self.requires = (C.ID, *self.pair)
        self.produces = (SCORES[self.config.media],)
        self._info: dict = {}

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The input plus the score column (replacing an old one)."""
        C.require(schema, self.requires, self.name)
        emb = check_same_model(schema, *self.pair)
        self._info = {k: emb[k] for k in ("model", "pretrained", "library") if k in emb}
        self._info["of"] = list(self.pair)
        fields = [f for f in schema if f.name not in self.produces]
        fields.append(pa.field(self.produces[0], pa.float32()))
        return C.with_metadata(pa.schema(fields, metadata=schema.metadata), self.column_info())

    def column_info(self) -> dict:
        """The model behind the score and the columns it compares."""
        return {self.produces[0]: dict(self._info)} if self._info else {}

    def process(self, batch: pa.RecordBatch) -> Result:
        """Score one batch; rows with a missing or broken embedding become rejects."""
        (a, ok_a), (b, ok_b) = (_unit_rows(batch.column(c)) for c in self.pair)
        score = np.clip(np.einsum("ij,ij->i", a, b), -1.0, 1.0).astype(np.float32)
        reasons = _reasons(
            batch.column(self.pair[0]), ok_a, batch.column(self.pair[1]), ok_b, self.pair
        )
        keep = np.array([r is None for r in reasons], dtype=bool)
        out = batch.drop_columns([c for c in self.produces if c in batch.schema.names])
        out = out.append_column(self.produces[0], pa.array(score, pa.float32()))
        if keep.all():
            return Result(out)
        rejects = rejects_at(self.name, batch, np.flatnonzero(~keep), reasons)
        return Result(out.filter(pa.array(keep)), rejects)


def _unit_rows(col: pa.FixedSizeListArray) -> tuple[np.ndarray, np.ndarray]:
    """Rows as a float32 matrix normalised in float32, and which rows are usable."""
    dim = col.type.list_size
    values = col.values.slice(col.offset * dim, len(col) * dim)
    mat = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), dim)
    with np.errstate(invalid="ignore", over="ignore"):
        norm = np.linalg.norm(mat, axis=1)
        ok = np.isfinite(mat).all(axis=1) & np.isfinite(norm) & (norm > 0)
    ok &= ~np.asarray(col.is_null())
    mat = np.where(ok[:, None], mat, 0.0) / np.where(ok, norm, 1.0)[:, None]
    return mat, ok


def _reasons(col_a, ok_a, col_b, ok_b, names) -> list:
    null_a, null_b = np.asarray(col_a.is_null()), np.asarray(col_b.is_null())
    out = []
    for i in range(len(ok_a)):
        if ok_a[i] and ok_b[i]:
            out.append(None)
        elif null_a[i] or null_b[i]:
            out.append(("no_embedding", f"{names[0] if null_a[i] else names[1]} is null"))
        else:
            out.append(
                (
                    "bad_embedding",
                    f"{names[0] if not ok_a[i] else names[1]} is NaN, infinite or zero",
                )
            )
    return out


def score_steps(
    schema: pa.Schema,
    media: str | None,
    config: EmbedConfig,
    probes: HeadScoreConfig | None = None,
    pair: bool = True,
) -> list:
    """Embedding steps for what is missing (with the model of what is there), then `Score`
    (when `pair` and the input has text, or always without `probes`), then `HeadScore` for
    the heads and queries of `probes`."""
    names = schema.names
    probes = probes if probes is not None and probes.columns() else None
    if media is None:
        found = [m for m in SCORES if C.EMBEDDINGS[m] in names or m in names]
        if len(found) != 1:
            what = "both image and audio" if found else "no image or audio (or embedding)"
            raise UsageError(f"the input has {what}; choose with --media image or --media audio")
        media = found[0]
    has_text = C.TEXT in names or C.TEXT_EMBEDDING in names
    if probes is None and not pair:
        raise UsageError("--no-clip-score leaves nothing to do; add --head or --query")
    pair = pair and (has_text or probes is None)
    wanted = [media, "text"] if pair else [media]
    missing = [m for m in wanted if C.EMBEDDINGS[m] not in names]
    steps: list = []
    if missing:
        recorded = next(
            (C.column_info(schema).get(C.EMBEDDINGS[m]) for m in wanted if m not in missing),
            None,
        )
        embed = replace(_default_to(config, media, recorded or {}), modalities=missing)
        steps.append(ClapEmbed(embed) if media == "audio" else ClipEmbed(embed))
    if pair:
        steps.append(Score(ScoreConfig(media=media)))
    if probes is not None:
        steps.append(HeadScore(replace(probes, media=media, embed=config)))
    return steps


def _default_to(config: EmbedConfig, media: str, recorded: dict) -> EmbedConfig:
    """Fill unset model options from the embedding already present, else `embed`'s defaults
    (the class attributes of `EmbedConfig`)."""
    if media == "audio":
        return replace(
            config,
            audio_model=config.audio_model or recorded.get("model") or EmbedConfig.audio_model,
        )
    if config.model is not None:
        return config
    if not recorded.get("model"):
        return replace(config, model=EmbedConfig.model)
    pretrained = config.pretrained
    if pretrained is None and recorded.get("pretrained") != models.BUNDLED:
        pretrained = recorded.get("pretrained")
    return replace(config, model=recorded["model"], pretrained=pretrained)
