"""`Mixup`: a two-pass step that writes mixed rows with their provenance.

Pass 1 scans ids (and the pairing key) and fixes the plan: which rows are first parents,
their partners and λ (see `plan.py`). A gather pass then copies the partners' media bytes
(read from their paths where the rows hold paths) or embeddings to a temporary Arrow file and
decodes each partner once, so that a partner that cannot be decoded is known before any
output is written. Pass 2 streams the input: each mixed row is made and emitted with the
batch holding its first parent, and a row that cannot be decoded becomes a reject row in its
own batch. The output is therefore the same whatever the input order, shard layout, batch
size or resume point.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C
from mmtools.errors import UsageError, require_module
from mmtools.media import DEFAULT_MAX_PIXELS, MediaError, cells, decode_audio, decode_image, read
from mmtools.step import GlobalStep, Result, reject_batch
from mmtools.steps.mixup import mix
from mmtools.steps.mixup.plan import Plan, parse_pairing, plan_pairs
from mmtools.steps.mixup.vectors import (
    check_embedding,
    default_nearest,
    embedding_problems,
    embedding_specs,
    mix_embeddings,
    spec_columns,
)

MODES = ("image-text", "audio-text", "embedding")
DROPPED_RULE = "mixup_source"
PROVENANCE = [
    pa.field(C.MIXUP_PARENTS, pa.list_(pa.string())),
    pa.field(C.MIXUP_LAMBDA, pa.float32()),
    pa.field(C.MIXUP_MODE, pa.string()),
]


@dataclass
class MixupConfig:
    """Options of `mixup`; see the command's help for their meaning."""

    mode: str = "image-text"
    alpha: float = 0.2
    lam: float | None = None
    fraction: float = 1.0
    pairing: str = "random"
    columns: list[str] = field(default_factory=list)
    keep_originals: bool = False
    format: str | None = None
    quality: int = 95
    sample_rate: int | None = None
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        """Raise a usage error for an option out of range."""
        if self.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not 0 < self.fraction <= 1:
            raise UsageError(f"--fraction must be in (0, 1], not {self.fraction}")
        if self.alpha <= 0:
            raise UsageError(f"--alpha must be positive, not {self.alpha}")
        if self.lam is not None and not 0 <= self.lam <= 1:
            raise UsageError(f"--lam must be in [0, 1], not {self.lam}")
        formats = mix.AUDIO_FORMATS if self.mode == "audio-text" else mix.IMAGE_FORMATS
        if self.format is not None and self.format not in formats:
            raise UsageError(f"--format for {self.mode} must be one of {', '.join(formats)}")
        if not 1 <= self.quality <= 100:
            raise UsageError(f"--quality must be in 1..100, not {self.quality}")
        if self.columns and self.mode != "embedding":
            raise UsageError("--columns is for --mode embedding")
        parse_pairing(self.pairing)


class Mixup(GlobalStep):
    """Mix pairs of rows (images, audio clips or embeddings) into new rows with provenance."""

    name = "mixup"
    # Workers get the plan and the partners, not the thread pool or the spool file.
    transient = ("_pool", "_spool")
    light_keys = True  # ids, and the column pairs are chosen by (`Step.light`)

    def __init__(self, config: MixupConfig, workers: int = 2):
        config.validate()
        super().__init__(config)
        self.workers = workers
        self.kind, self.pair_column = parse_pairing(config.pairing)
        self.media = {"image-text": C.IMAGE, "audio-text": C.AUDIO}.get(config.mode)
        self.format = config.format or ("wav" if config.mode == "audio-text" else "jpeg")
        self.requires = (C.ID, self.media) if self.media else (C.ID,)
        self.scan_columns = (C.ID,)
        self.specs: list[tuple[str, str]] = []  # embedding mode: (first's column, partner's)
        self.skipped = 0  # pairs not made because a parent was rejected
        self._pool: ThreadPoolExecutor | None = None
        self._spool: str | None = None

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The input columns, then mixup_parents, mixup_lambda and mixup_mode."""
        C.require(schema, self.requires, self.name)
        if self.pair_column is not None:  # named in --pairing same:COLUMN / nearest:COLUMN
            C.require_named(schema, [self.pair_column], "--pairing")
        if self.config.mode == "embedding":
            self.specs = embedding_specs(schema, self.config.columns)
        if self.kind == "nearest":
            require_module("faiss", "dedup")  # before the output is touched
        if self.kind == "nearest" and self.pair_column is None:
            self.pair_column = default_nearest(schema, self.config.mode, self.specs)
        if self.pair_column is not None:
            C.require(schema, [self.pair_column], self.name)
            if self.kind == "nearest":
                check_embedding(schema, self.pair_column)
            self.scan_columns = (C.ID, self.pair_column)
        fields = list(schema) + [f for f in PROVENANCE if f.name not in schema.names]
        self.schema = pa.schema(fields)
        return self.schema

    def column_info(self) -> dict:
        """How the mixed rows were made."""
        c = self.config
        info = {
            "mode": c.mode,
            "pairing": c.pairing,
            "seed": c.seed,
            "fraction": c.fraction,
            "lambda": f"fixed {c.lam}" if c.lam is not None else f"Beta({c.alpha}, {c.alpha})",
        }
        if self.media:
            info["format"] = self.format
        return {C.MIXUP_PARENTS: info, C.MIXUP_LAMBDA: info}

    def setup(self) -> None:
        """Start the decoding threads (Pillow, libsndfile and numpy release the GIL)."""
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mixup")
        self._ids: list[pa.Array] = []
        self._keys: list[pa.Array] = []

    def close(self) -> None:
        """Stop the threads and remove the partner spool."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._partners = None
        if self._spool:
            os.unlink(self._spool)
            self._spool = None

    # -- pass 1 and the plan ------------------------------------------------------------------

    def scan(self, batch: pa.RecordBatch) -> None:
        """Remember ids and pairing keys."""
        self._ids.append(batch.column(C.ID))
        if self.pair_column is not None:
            self._keys.append(batch.column(self.pair_column))

    def finish_scan(self) -> None:
        """Fix the plan: pairs and λ from the sorted ids and the seed."""
        ids = pa.concat_arrays(self._ids) if self._ids else pa.array([], pa.string())
        keys = pa.concat_arrays(self._keys) if self._keys else None
        self._ids, self._keys = [], []
        c = self.config
        self.plan: Plan = plan_pairs(ids, keys, self.kind, c.fraction, c.alpha, c.lam, c.seed)

    def gather_columns(self) -> list[str]:
        """The partners' rows are read once more, between the passes."""
        if self.media:
            return [C.ID, self.media, C.TEXT]
        return [C.ID, *spec_columns(self.specs)]

    def gather(self, batches) -> None:
        """Copy the partners' rows to a temporary Arrow file; note those that fail to decode.
        Where the file can be mapped through its descriptor (Linux), it loses its name as soon
        as it is made: a run killed at any point leaves nothing behind."""
        wanted = pc.unique(self.plan.second)
        fd, path = tempfile.mkstemp(prefix="mmtools-mixup-", suffix=".arrow")
        source = f"/proc/self/fd/{fd}"
        if os.path.exists(source):
            os.unlink(path)
        else:
            source = self._spool = path  # removed by `close`
        bad: list[tuple[str, str, str]] = []
        writer = None
        self._partners = None
        with os.fdopen(fd, "wb") as f:
            for batch in batches:
                rows = batch.filter(pc.is_in(batch.column(C.ID), value_set=wanted))
                rows, failed = self._check_partners(rows)
                if writer is None:
                    writer = pa.ipc.new_file(f, rows.schema)
                writer.write_batch(rows)
                bad += failed
            if writer is not None:
                writer.close()
                f.flush()
                self._partners = pa.ipc.open_file(pa.memory_map(source)).read_all()
                self._partner_ids = self._partners.column(C.ID).combine_chunks()
        self._bad_ids = pa.array([b[0] for b in bad], pa.string())
        self._bad = bad

    def _check_partners(self, rows: pa.RecordBatch) -> tuple[pa.RecordBatch, list[tuple]]:
        """The rows with their media bytes read in (a path is read once), and the bad ones."""
        ids = rows.column(C.ID).to_pylist()
        if not self.media:
            problems = embedding_problems(rows, spec_columns(self.specs))
            return rows, [(ids[i], reason, detail) for i, reason, detail in problems]
        values = cells(rows.column(self.media))
        found = list(self._pool.map(self._check_one, values))
        data = [d if isinstance(d, bytes) else None for d in found]
        media = C.media_array(data, [v[1] if v else None for v in values])
        at = rows.schema.get_field_index(self.media)
        rows = rows.set_column(at, self.media, media.cast(rows.schema.field(at).type))
        bad = [(i, *d) for i, d in zip(ids, found, strict=True) if not isinstance(d, bytes)]
        return rows, bad

    # -- pass 2 -----------------------------------------------------------------------------------

    def process(self, batch: pa.RecordBatch) -> Result:
        """Reject bad parents of this batch, make the pairs whose first parent is here."""
        ids = batch.column(C.ID)
        skipped = self.skipped
        rejected = np.zeros(batch.num_rows, bool)
        rejects = []
        bad_at = pc.index_in(ids, value_set=self._bad_ids)
        for row in np.flatnonzero(np.asarray(bad_at.is_valid(), bool)):
            rejected[row] = True
            rejects.append(self._bad[bad_at[row].as_py()])
        rows, pairs = self._pairs_here(ids, rejected)
        made, failed = self._make(batch.take(rows), pairs)
        for k, reason, detail in failed:  # first parents that could not be decoded
            rejected[rows[k]] = True
            rejects.append((ids[int(rows[k])].as_py(), reason, detail))
        out, dropped, drops = [made], {}, None
        if self.config.keep_originals:
            out.insert(0, self._originals(batch.filter(pa.array(~rejected))))
        elif (~rejected).any():
            dropped[DROPPED_RULE] = int((~rejected).sum())
            drops = self.drop_rows(batch, ~rejected, DROPPED_RULE)
        rej = reject_batch(self.name, *zip(*rejects, strict=True)) if rejects else None
        notes = {"pairs_skipped": self.skipped - skipped}  # a parent was rejected
        return Result(pa.concat_batches(out), rej, dropped, made.num_rows, notes, drops)

    def _pairs_here(self, ids: pa.Array, rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of this batch that are first parents of a pair to make, and those pairs."""
        at = pc.index_in(ids, value_set=self.plan.first)
        first = np.asarray(at.is_valid(), bool)
        rows = np.flatnonzero(first & ~rejected)
        pairs = np.asarray(at.take(rows), np.int64) if len(rows) else np.zeros(0, np.int64)
        partner_bad = np.asarray(pc.is_in(self.plan.second.take(pairs), self._bad_ids), bool)
        self.skipped += int((first & rejected).sum()) + int(partner_bad.sum())
        return rows[~partner_bad], pairs[~partner_bad]

    def _originals(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        cols = [
            batch.column(f.name)
            if f.name in batch.schema.names
            else pa.nulls(batch.num_rows, f.type)
            for f in self.schema
        ]
        return pa.RecordBatch.from_arrays(cols, schema=self.schema)

    def _make(self, firsts: pa.RecordBatch, pairs: np.ndarray):
        """Mixed rows of `pairs` (first parents in `firsts`); failures as (k, reason, detail)."""
        if not len(pairs):
            return self._generated(pairs, {}), []
        partners = self._partners.take(
            pc.index_in(self.plan.second.take(pairs), value_set=self._partner_ids)
        )
        lam = self.plan.lam[pairs]
        if self.media is None:
            ok, values, failed = mix_embeddings(firsts, partners, lam, self.specs)
        else:
            ok, values, failed = self._mix_media(firsts, partners, lam)
        self.skipped += len(pairs) - len(ok)
        return self._generated(pairs[ok], values), failed

    def _mix_media(self, firsts: pa.RecordBatch, partners: pa.Table, lam: np.ndarray):
        a, b = cells(firsts.column(self.media)), cells(partners.column(self.media))
        results = list(self._pool.map(self._mix_one, a, b, lam.tolist()))
        ok = np.array(
            [i for i, r in enumerate(results) if not isinstance(r, mix.ParentError)], np.int64
        )
        failed = [
            (i, r.error.reason, r.error.detail)
            for i, r in enumerate(results)
            if isinstance(r, mix.ParentError) and r.which == 0
        ]
        made = [results[i] for i in ok]
        values = _media_columns(self.media, self.format, made)
        if C.TEXT in firsts.schema.names:
            values[C.TEXT] = _join_text(
                firsts.column(C.TEXT).take(ok), partners.column(C.TEXT).combine_chunks().take(ok)
            )
        return ok, values, failed

    def _generated(self, pairs: np.ndarray, values: dict) -> pa.RecordBatch:
        """Rows of the output schema for the made pairs: new id, provenance, mixed columns."""
        n, plan = len(pairs), self.plan
        first, second = plan.first.take(pairs), plan.second.take(pairs)
        both = pa.concat_arrays([first, second]).take(np.arange(2 * n).reshape(2, n).T.ravel())
        values = {
            **values,
            C.ID: plan.new_id.take(pairs),
            C.MIXUP_PARENTS: pa.ListArray.from_arrays(
                pa.array(np.arange(0, 2 * n + 1, 2), pa.int32()), both
            ),
            C.MIXUP_LAMBDA: pa.array(plan.lam[pairs], pa.float32()),
            C.MIXUP_MODE: pa.array([self.config.mode] * n, pa.string()),
        }
        cols = [
            values[f.name].cast(f.type) if f.name in values else pa.nulls(n, f.type)
            for f in self.schema
        ]
        return pa.RecordBatch.from_arrays(cols, schema=self.schema)

    def _mix_one(self, a, b, lam: float):
        """One mix of two media cells, or the `ParentError` naming the parent that failed."""
        c = self.config
        try:
            a, b = _read_parent(0, a, self.media), _read_parent(1, b, self.media)
            if self.media == C.IMAGE:
                return mix.mix_images(a, b, lam, self.format, c.quality, c.max_pixels)
            return mix.mix_audio(a, b, lam, self.format, c.sample_rate)
        except mix.ParentError as e:
            return e

    def _check_one(self, value) -> bytes | tuple[str, str]:
        """A partner's media bytes, or (reason, detail) if they cannot be read or decoded."""
        try:
            data = read(value, self.media)
            if self.media == C.IMAGE:
                decode_image(data, self.config.max_pixels)
            else:
                decode_audio(data)
        except MediaError as e:
            return e.reason, e.detail
        return data


def _read_parent(which: int, value, kind: str) -> bytes:
    try:
        return read(value, kind)
    except MediaError as e:
        raise mix.ParentError(which, e) from None


def _media_columns(media: str, fmt: str, made: list[tuple]) -> dict[str, pa.Array]:
    """The media column and the metadata ingest records, recomputed for mixed rows."""
    import hashlib

    data = [m[0] for m in made]
    values = {
        media: C.media_array(data, [None] * len(data)),
        C.IMAGE_FORMAT if media == C.IMAGE else C.AUDIO_FORMAT: pa.array([fmt] * len(data)),
        C.IMAGE_NBYTES if media == C.IMAGE else C.AUDIO_NBYTES: pa.array([len(d) for d in data]),
        C.IMAGE_SHA256 if media == C.IMAGE else C.AUDIO_SHA256: pa.array(
            [hashlib.sha256(d).hexdigest() for d in data], pa.string()
        ),
    }
    if media == C.IMAGE:
        values[C.WIDTH] = pa.array([m[1] for m in made], pa.int32())
        values[C.HEIGHT] = pa.array([m[2] for m in made], pa.int32())
    else:
        values[C.SAMPLE_RATE] = pa.array([m[1] for m in made], pa.int32())
        values[C.CHANNELS] = pa.array([1] * len(made), pa.int16())
        values[C.DURATION] = pa.array([m[2] for m in made], pa.float64())
    return values


def _join_text(a: pa.Array, b: pa.Array) -> pa.Array:
    """MixGen captions: the first caption, a space, the second; null only if both are."""
    joined = pc.binary_join_element_wise(a, b, " ")
    return pc.if_else(a.is_null(), b, pc.if_else(b.is_null(), a, joined))
