"""Scores over one embedding column: heads (`--head NAME=PATH`) and queries (`--query`).

A query is the cosine between each row's media embedding and a text (or an example image)
embedded by the model that made that embedding: a linear head whose one row is the query's
unit vector. Heads are read by `mmtools.models.heads`. Every score is a float32 column;
its metadata records the model of the embedding it was computed from, and the query or the
head file, so a query made with another model than the embedding's is refused (exit 3), as
is a head made for another model (unless `force`).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from mmtools import columns as C
from mmtools import models
from mmtools.errors import DataContractError, UsageError
from mmtools.models import heads as H
from mmtools.step import Result, Step, rejects_at
from mmtools.steps.embed import ClapEmbed, ClipEmbed, EmbedConfig

log = logging.getLogger("mmtools")

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
QUERY_PREFIX = "sim_"  # a query's derived column: sim_a_watermark
MAX_DERIVED = 40


@dataclass
class HeadScoreConfig:
    """Heads and queries to score, each as (column, head file / text / image file)."""

    media: str = "image"
    heads: list[tuple[str, str]] = field(default_factory=list)
    queries: list[tuple[str, str]] = field(default_factory=list)
    query_images: list[tuple[str, str]] = field(default_factory=list)
    force: bool = False  # accept heads made for another model of the same size
    # The model the queries are embedded with; model None: the one recorded for the media
    # embedding. Its device also runs the heads.
    embed: EmbedConfig = field(default_factory=lambda: EmbedConfig(model=None, audio_model=None))

    def columns(self) -> list[str]:
        """The columns made, in order."""
        return [name for name, _ in (*self.heads, *self.queries, *self.query_images)]


def probe_config(
    heads: list[str], queries: list[str], names: list[str], images: list[str], force: bool
) -> HeadScoreConfig:
    """A config from the command line: heads as NAME=PATH; `names` name the text queries,
    then the image queries, in order; queries without one get a name from their text."""
    pairs = []
    for spec in heads:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(
                f"--head takes NAME=PATH, e.g. aesthetic=sa_0_4_vit_l_14_linear.pth, not {spec!r}"
            )
        pairs.append((name.strip(), path.strip()))
    if len(names) > len(queries) + len(images):
        raise UsageError(f"{len(names)} --query-name for {len(queries) + len(images)} queries")
    derived = [derive_name(q) for q in queries] + [derive_name(_stem(p)) for p in images]
    given = names + derived[len(names) :]
    texts = list(zip(given[: len(queries)], queries, strict=True))
    pictures = list(zip(given[len(queries) :], images, strict=True))
    config = HeadScoreConfig(heads=pairs, queries=texts, query_images=pictures, force=force)
    check_names(config.columns())
    return config


def _stem(path: str) -> str:
    """'logos/watermark.png' -> 'watermark'."""
    return os.path.splitext(os.path.basename(path))[0]


def derive_name(text: str) -> str:
    """'A watermark!' -> 'sim_a_watermark' (letters and digits, at most 40 characters)."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:MAX_DERIVED].strip("_")
    return QUERY_PREFIX + (slug or "query")


def check_names(names: list[str]) -> None:
    """Column names a user may give: identifiers, unique, none that mmtools owns."""
    seen = set()
    for name in names:
        if not NAME.match(name):
            raise UsageError(
                f"column name {name!r} must be letters, digits and _ (not first a "
                "digit), so that --where can name it"
            )
        if name in C.own_names():
            raise UsageError(f"{name} is a column mmtools owns; give the score another name")
        if name in seen:
            raise UsageError(
                f"two scores would be named {name}; name them apart "
                "(--head NAME=..., --query-name NAME)"
            )
        seen.add(name)


class HeadScore(Step):
    """Add one float32 column per head and per query over the embedding columns."""

    name = "score_heads"
    loads_model = True  # head weights, and the embedding model for queries
    transient = ("_device", "_fns", "_queries")

    def __init__(self, config: HeadScoreConfig):
        super().__init__(config)
        if config.media not in ("image", "audio"):
            raise UsageError(f"--media must be image or audio, not {config.media!r}")
        if config.query_images and config.media != "image":
            raise UsageError("--query-image compares with image embeddings; not with --media audio")
        check_names(config.columns())
        self.media_column = C.EMBEDDINGS[config.media]
        self.requires = (C.ID,)
        self.produces = tuple(config.columns())
        self._inputs: dict[str, str] = {}  # produced column -> its embedding column
        self._embed: EmbedConfig | None = None  # the resolved query model
        self._info: dict = {}
        self._device = None
        self._fns: dict = {}
        self._queries = None

    def params(self) -> dict:
        """Head files (with their size and time), queries, and the query model."""
        c = self.config
        files = [[n, os.path.abspath(p), models.file_stamps(p)] for n, p in c.heads]
        images = [[n, os.path.abspath(p), models.file_stamps(p)] for n, p in c.query_images]
        model = self._embed and [
            self._embed.model or self._embed.audio_model,
            self._embed.pretrained,
            self._embed.precision,
        ]
        return {
            self.name: {
                "heads": files,
                "queries": c.queries,
                "query_images": images,
                "model": model,
                "force": c.force,
            }
        }

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The input plus the score columns; refuses heads or queries that do not fit."""
        C.require(schema, self.requires, self.name)
        info = C.column_info(schema)
        self._info = {}
        for name, path in self.config.heads:
            head = H.load(path)
            column = head.input or self.media_column
            dim = _embedding_dim(schema, column, f"head {name}")
            head.check(column, dim, info.get(column), name, self.config.force)
            self._inputs[name] = column
            self._info[name] = _provenance(info.get(column), column) | {
                "head": head.format,
                "file": head.path,
                "label": head.label,
                "head_model": head.model,
                "head_pretrained": head.pretrained,
            }
        if self.config.queries or self.config.query_images:
            self._resolve_queries(schema, info)
        fields = [f for f in schema if f.name not in self.produces]
        fields += [pa.field(name, pa.float32()) for name in self.produces]
        return C.with_metadata(pa.schema(fields, metadata=schema.metadata), self.column_info())

    def _resolve_queries(self, schema: pa.Schema, info: dict) -> None:
        column = self.media_column
        _embedding_dim(schema, column, "the queries")
        recorded = info.get(column) or {}
        self._embed = query_model(self.config.embed, self.config.media, recorded, column)
        made = _query_step(self._embed, self.config.media, ["text"]).column_info()[C.TEXT_EMBEDDING]
        if recorded.get("model"):
            if not H.same_model(
                (made["model"], made["pretrained"]), (recorded["model"], recorded.get("pretrained"))
            ):
                raise DataContractError(
                    f"{column} was made by {_describe(recorded)} but the queries would be "
                    f"embedded by {_describe(made)}; their cosine means nothing. Leave out "
                    "--model to use the embedding's own model"
                )
        else:
            log.warning("%s has no model metadata; assuming %s made it", column, _describe(made))
        base = _provenance(made, column)
        for name, text in self.config.queries:
            self._inputs[name] = column
            self._info[name] = base | {"query": text}
        for name, path in self.config.query_images:
            self._inputs[name] = column
            self._info[name] = base | {"query_image": os.path.abspath(path)}

    def column_info(self) -> dict:
        """Per column: the embedding model, and the head file or the query."""
        return {k: dict(v) for k, v in self._info.items()}

    def setup(self) -> None:
        """Load the heads and embed the queries (once per worker)."""
        from mmtools.models.device import resolve_device

        if self._device is not None:
            return
        self._device = resolve_device(self.config.embed.device)
        fns = {}
        for name, path in self.config.heads:
            head = H.load(path)
            fns[name] = (head.normalize, head.build(self._device))
        self._fns = fns
        if self.config.queries or self.config.query_images:
            import torch

            vectors = self._embed_queries()
            self._queries = torch.from_numpy(vectors).to(self._device)

    def _embed_queries(self) -> np.ndarray:
        """Unit vectors of the text queries, then the image queries, by the embedding's model."""
        parts = []
        if self.config.queries:
            texts = [t for _, t in self.config.queries]
            batch = pa.record_batch(
                [pa.array([f"q{i}" for i in range(len(texts))]), pa.array(texts, pa.string())],
                names=[C.ID, C.TEXT],
            )
            parts.append(self._run_query(batch, "text"))
        if self.config.query_images:
            data = [_read_file(p) for _, p in self.config.query_images]
            paths = [os.path.abspath(p) for _, p in self.config.query_images]
            batch = pa.record_batch(
                [pa.array(paths), C.media_array(data, paths)], names=[C.ID, C.IMAGE]
            )
            parts.append(self._run_query(batch, "image"))
        return np.concatenate(parts).astype(np.float32)

    def _run_query(self, batch: pa.RecordBatch, modality: str) -> np.ndarray:
        step = _query_step(self._embed, self.config.media, [modality])
        step.output_schema(batch.schema)
        step.setup()
        result = step.process(batch)
        if result.rejected:
            row = result.rejects.to_pylist()[0]
            raise UsageError(
                f"query {row['id']!r} cannot be embedded: {row['reason']} ({row['detail']})"
            )
        return _matrix(result.batch.column(C.EMBEDDINGS[modality]))

    def process(self, batch: pa.RecordBatch) -> Result:
        """Score one batch; rows with a null, NaN or zero input embedding become rejects."""
        import torch

        used = dict.fromkeys(self._inputs.values())
        rows = {c: _device_rows(batch.column(c), self._device) for c in used}
        ok = np.ones(batch.num_rows, dtype=bool)
        for _, good, _ in rows.values():
            ok &= good
        scores = {}
        with torch.inference_mode():
            for name, (normalize, fn) in self._fns.items():
                raw, _, unit = rows[self._inputs[name]]
                scores[name] = fn(unit if normalize else raw)
            if self._queries is not None:
                _, _, unit = rows[self.media_column]
                sims = (unit @ self._queries.T).clamp_(-1.0, 1.0)
                for j, name in enumerate(self.produces[len(self.config.heads) :]):
                    scores[name] = sims[:, j]
        out = batch.drop_columns([c for c in self.produces if c in batch.schema.names])
        for name in self.produces:
            values = scores[name].float().cpu().numpy()
            out = out.append_column(name, pa.array(values, pa.float32()))
        if ok.all():
            return Result(out)
        bad = np.flatnonzero(~ok)
        return Result(
            out.filter(pa.array(ok)), rejects_at(self.name, batch, bad, _reasons(batch, rows, bad))
        )


def query_model(config: EmbedConfig, media: str, recorded: dict, column: str) -> EmbedConfig:
    """The model for the queries: the one given, else the one recorded for `column`."""
    given = config.audio_model if media == "audio" else config.model
    if given is None and not recorded.get("model"):
        raise UsageError(
            f"{column} has no model metadata, so the queries' model is unknown; pass the model "
            "that made it (--model and --pretrained, or --audio-model)"
        )
    if given is not None:
        return config
    if media == "audio":
        return replace(config, audio_model=recorded["model"])
    pretrained = recorded.get("pretrained")
    return replace(
        config,
        model=recorded["model"],
        pretrained=None if pretrained == models.BUNDLED else pretrained,
    )


def _query_step(config: EmbedConfig, media: str, modalities: list[str]):
    """An embedding step for the queries: float32, this process's device."""
    config = replace(config, modalities=modalities, dtype="float32", workers=1)
    return ClapEmbed(config) if media == "audio" else ClipEmbed(config)


def _describe(info: dict) -> str:
    return f"{info.get('model')}" + (f" ({info['pretrained']})" if info.get("pretrained") else "")


def _provenance(info: dict | None, column: str) -> dict:
    kept = {k: info[k] for k in ("model", "pretrained", "library") if info and k in info}
    return kept | {"of": [column]}


def _embedding_dim(schema: pa.Schema, column: str, what: str) -> int:
    if column not in schema.names:
        raise DataContractError(
            f"{what} needs column {column}; the input has {', '.join(schema.names)}"
        )
    t = schema.field(column).type
    if not pa.types.is_fixed_size_list(t) or not pa.types.is_floating(t.value_type):
        raise DataContractError(f"{column} is {t}, not a fixed-size list of floats")
    return t.list_size


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read --query-image {path}: {e.strerror}") from None


def _matrix(col: pa.FixedSizeListArray) -> np.ndarray:
    dim = col.type.list_size
    values = col.values.slice(col.offset * dim, len(col) * dim)
    return values.to_numpy(zero_copy_only=False).reshape(len(col), dim)


def _device_rows(col: pa.FixedSizeListArray, device):
    """(raw float32 rows, usable rows (numpy), unit rows) of an embedding column on `device`;
    unusable rows (null, NaN, infinite, zero) are zeros."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Arrow's buffers are read-only; nothing writes them
        x = torch.from_numpy(_matrix(col)).to(device).float()
    norm = torch.linalg.vector_norm(x, dim=1)
    good = torch.isfinite(norm) & (norm > 0)
    if col.null_count:
        good &= torch.from_numpy(~np.asarray(col.is_null())).to(device)
    if not bool(good.all()):
        x = torch.where(good[:, None], x, 0.0)
        norm = torch.where(good, norm, 1.0)
    return x, good.cpu().numpy(), x / norm[:, None]


def _reasons(batch: pa.RecordBatch, rows: dict, bad: np.ndarray) -> dict:
    """(reason, detail) of each unusable row: the first of its input columns at fault."""
    out = {}
    for i in bad:
        for column, (_, good, _) in rows.items():
            if good[i]:
                continue
            if batch.column(column)[int(i)].is_valid:
                out[int(i)] = ("bad_embedding", f"{column} is NaN, infinite or zero")
            else:
                out[int(i)] = ("no_embedding", f"{column} is null")
            break
    return out
