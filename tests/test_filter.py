"""`mmtools filter`: SQL conditions, exact global top fraction, presets, audio rules, invert."""

from __future__ import annotations

import io
import json
import re
import subprocess

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MMTOOLS, mmtools, read_dataset, write_shards
from hypothesis import given, settings
from hypothesis import strategies as st

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.io.dataset import read_dropped
from mmtools.steps.filter.rank import TopFraction, TopFractionConfig
from mmtools.steps.filter.step import FilterConfig, make_filter, sql_columns


def dropped(path) -> dict:
    return json.loads((path / "_manifest.json").read_text())["dropped"]


def ids(path) -> list[str]:
    return read_dataset(path).column(C.ID).to_pylist()


def scored_table(n: int, seed: int = 0) -> pa.Table:
    """Rows with ids in shuffled order, scores with many ties, sizes, captions, embeddings."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.uniform(0.1, 0.4, n), 2).astype(np.float32)
    scores[rng.choice(n, min(n, 5), replace=False)] = np.nan
    emb = rng.standard_normal((n, 8)).astype(np.float16)
    return pa.table(
        {
            C.ID: pa.array([f"s{i:05d}" for i in rng.permutation(n)]),
            C.TEXT: pa.array([f"caption {i}" for i in range(n)]),
            C.WIDTH: pa.array(rng.integers(100, 600, n), pa.int32()),
            C.HEIGHT: pa.array(rng.integers(100, 600, n), pa.int32()),
            C.CLIP_SCORE: pa.array(scores, pa.float32(), mask=np.arange(n) % 97 == 3),
            C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 8),
        }
    )


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """600 scored rows in 3 Parquet shards, and the same rows as a polars frame."""
    table = scored_table(600)
    return write_shards(tmp_path_factory.mktemp("scored") / "in", table, 3), pl.from_arrow(table)


def pipe(*commands, input: bytes | None = None) -> list[subprocess.CompletedProcess]:
    """Run mmtools commands joined by real OS pipes; return each one's result."""
    procs, stdin = [], subprocess.PIPE if input is not None else None
    for args in commands:
        p = subprocess.Popen(
            [*MMTOOLS, *map(str, args)], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        if procs:
            procs[-1].stdout.close()  # only the next process holds the read end
        procs.append(p)
        stdin = p.stdout
    if input is not None:
        procs[0].stdin.write(input)
        procs[0].stdin.close()
    out = []
    for p in procs:
        stdout = p.stdout.read() if p is procs[-1] else b""
        err = p.stderr.read()
        out.append(subprocess.CompletedProcess(p.args, p.wait(timeout=120), stdout, err))
    return out


def expected_top(frame: pl.DataFrame, k: int) -> set[str]:
    """The k best ids by score (NaN and null last), ties broken by the smaller id."""
    ranked = frame.with_columns(pl.col(C.CLIP_SCORE).fill_nan(None)).sort(
        [C.CLIP_SCORE, C.ID], descending=[True, False], nulls_last=True
    )
    return set(ranked.head(k)[C.ID].to_list())


# -- --where -------------------------------------------------------------------------------


def test_where_keeps_exactly_the_matching_rows_in_input_order(scored, tmp_path):
    src, frame = scored
    out = tmp_path / "out"
    mmtools("filter", src, "--where", "clip_score >= 0.28 AND width >= 256", "-o", out, "-q")
    want = frame.filter(
        (pl.col(C.CLIP_SCORE) >= 0.28)
        & pl.col(C.CLIP_SCORE).is_not_nan()
        & (pl.col(C.WIDTH) >= 256)
    )
    assert ids(out) == want[C.ID].to_list()
    assert dropped(out) == {"where": 600 - want.height}
    # Columns polars never saw (the embedding) come through unchanged.
    kept = read_dataset(out)
    assert kept.schema.field(C.IMAGE_EMBEDDING).type == C.embedding_type(8)
    assert kept.column(C.IMAGE_EMBEDDING).to_pylist() == want[C.IMAGE_EMBEDDING].to_list()


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("clip_scor >= 0.3", "unknown column clip_scor; the input has columns id, text, width"),
        ("clip_score >>= 0.3", "is not valid SQL: Expected: an expression, found: = at column 14"),
    ],
)
def test_bad_expression_is_one_clear_line_before_any_row_is_read(
    scored, tmp_path, expression, message
):
    src, _ = scored
    proc = mmtools("filter", src, "--where", expression, "-o", tmp_path / "out", check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.startswith(f"mmtools filter: error: --where {expression!r}")
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("text > 3 AND", "is not valid SQL: Expected: an expression, found: EOF"),
        ("text > 3", "cannot compare string with numeric type (i32); the input has columns id,"),
        ("width + 1", "must be a condition (true or false); it gives Int32"),
        ("frobnicate(text)", "unsupported function 'frobnicate'"),
    ],
)
def test_expression_checked_against_the_schema(expression, message):
    schema = scored_table(3).schema
    with pytest.raises(UsageError, match=re.escape(message)):
        sql_columns(expression, schema)
    assert sql_columns("length(text) > 3 AND width < height", schema) == [C.TEXT, C.WIDTH, C.HEIGHT]


def test_options_that_make_no_sense_are_usage_errors(scored, tmp_path):
    src, _ = scored
    proc = mmtools("filter", src, "-o", tmp_path / "o", check=False)
    assert proc.returncode == 2
    assert proc.stderr.decode() == (
        "mmtools filter: error: give at least one rule: --where, "
        "--top-fraction/--top-k, --preset, --near, or an audio option\n"
    )
    cases = [
        (dict(top_fraction=0.3), "need --by COLUMN"),
        (dict(top_fraction=1.5, by="clip_score"), "must be in (0, 1]"),
        (dict(top_fraction=0.3, top_k=3, by="clip_score"), "not both"),
        (dict(top_k=3, by="text"), "--by text must be a numeric column"),
        (dict(top_k=3, by="score"), "--by score: unknown column; the input has id, text"),
        (dict(presets=("datacomp",)), "unknown preset 'datacomp'; choose from datacomp-"),
    ]
    for options, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)):
            make_filter(FilterConfig(**options)).output_schema(scored_table(3).schema)


# -- --top-fraction / --top-k --------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["--top-fraction", "0.3"], ["--top-k", "7"], ["--top-fraction", "0.995"]]
)
def test_top_fraction_is_exact_with_ties_and_nulls(scored, tmp_path, args):
    src, frame = scored
    out = tmp_path / "out"
    mmtools("filter", src, *args, "--by", "clip_score", "-o", out, "--batch-size", "50", "-q")
    k = 7 if args[0] == "--top-k" else int(float(args[1]) * 1000) * 600 // 1000
    got = ids(out)
    assert len(got) == k and set(got) == expected_top(frame, k)
    assert got == [i for i in frame[C.ID].to_list() if i in set(got)]  # input order kept
    assert dropped(out) == {"top_fraction": 600 - k}


def test_top_fraction_over_a_stdin_pipe(scored, tmp_path):
    src, frame = scored
    out = tmp_path / "out"
    upstream, downstream = pipe(
        ["filter", src, "--where", "TRUE", "-q"],
        ["filter", "-", "--top-fraction", "0.3", "--by", "clip_score", "-o", out, "-q"],
    )
    assert upstream.returncode == 0 and downstream.returncode == 0, downstream.stderr
    assert set(ids(out)) == expected_top(frame, 180) and len(ids(out)) == 180


# Non-integer F·N: exactly floor(F·N) rows, with F·N taken as written in decimal (0.29 × 100
# is 29, though 0.29 * 100 is 28.999... in floating point).
FRACTIONS = [(10, "0.25", 2), (7, "0.35", 2), (3, "0.99", 2), (100, "0.29", 29), (9, "0.5", 4)]


@pytest.mark.parametrize(("n", "fraction", "k"), FRACTIONS)
def test_top_fraction_keeps_floor_of_a_non_integer_share(tmp_path, n, fraction, k):
    rng = np.random.default_rng(n)
    table = pa.table({C.ID: [f"r{i:03d}" for i in range(n)], "key": rng.permutation(n) / n})
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    mmtools("filter", tmp_path / "in.parquet", "--top-fraction", fraction, "--by", "key", "-o", out)
    best = pl.from_arrow(table).sort("key", descending=True).head(k)[C.ID].to_list()
    assert sorted(ids(out)) == sorted(best) and len(best) == k
    assert dropped(out) == {"top_fraction": n - k}


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(
        st.one_of(st.none(), st.sampled_from([0.1, 0.2, 0.3]), st.floats(-1, 1, width=32)),
        max_size=40,
    ),
    k=st.integers(0, 45),
    batch=st.integers(1, 9),
)
def test_top_k_matches_a_full_sort_for_any_batching(keys, k, batch):
    n = len(keys)
    table = pa.table(
        {
            C.ID: [f"{(i * 7919) % 101:03d}" for i in range(n)],
            C.CLIP_SCORE: pa.array(keys, pa.float32()),
        }
    )
    step = TopFraction(TopFractionConfig(by=C.CLIP_SCORE, k=k))
    step.output_schema(table.schema)
    batches = table.to_batches(max_chunksize=batch)
    for b in batches:
        step.scan(step.keys(b))
    step.finish_scan()
    kept = []
    for b in batches:
        res = step.process(b)
        res.check(b.num_rows, step.name)
        kept += res.batch.column(C.ID).to_pylist()
    assert set(kept) == expected_top(pl.from_arrow(table), min(k, n)) and len(kept) == min(k, n)


# -- presets -------------------------------------------------------------------------------


def test_datacomp_basic_preset_rule_by_rule(tmp_path):
    rows = [  # (id, caption, width, height, language, the rule that drops it or None)
        ("keep", "a red cat sitting", 300, 200, "en", None),
        ("edge", "a b cd", 200, 600, "en-US", None),  # > 2 words, > 5 chars, aspect 3
        ("words", "red cat", 300, 300, "en", "min_words"),
        ("chars", "a b c", 300, 300, "en", "min_chars"),
        ("side", "a red cat sitting", 199, 400, "en", "min_side"),
        ("aspect", "a red cat sitting", 901, 300, "en", "max_aspect"),
        ("german", "eine rote Katze sitzt", 300, 300, "de", "english"),
        ("unknown", "a red cat sitting", 300, 300, None, "english"),
        ("nullcap", None, 300, 300, "en", "min_words"),
    ]
    table = pa.table(
        {
            C.ID: [r[0] for r in rows],
            C.TEXT: [r[1] for r in rows],
            C.WIDTH: pa.array([r[2] for r in rows], pa.int32()),
            C.HEIGHT: pa.array([r[3] for r in rows], pa.int32()),
            C.LANGUAGE: [r[4] for r in rows],
        }
    )
    src, out = write_shards(tmp_path / "in", table, 1), tmp_path / "out"
    mmtools("filter", src, "--preset", "datacomp-basic", "-o", out, "-q")
    assert ids(out) == ["keep", "edge"]
    want: dict[str, int] = {}
    for r in rows:
        if r[5]:
            want[r[5]] = want.get(r[5], 0) + 1
    assert dropped(out) == want
    # Without a language column the English rule does not apply.
    src2, out2 = write_shards(tmp_path / "in2", table.drop([C.LANGUAGE]), 1), tmp_path / "out2"
    mmtools("filter", src2, "--preset", "datacomp-basic", "-o", out2, "-q")
    assert ids(out2) == ["keep", "edge", "german", "unknown"]


def test_laion_preset_rule_by_rule(tmp_path):
    rows = [  # (id, clip_score, caption, image bytes, the rule that drops it or None)
        ("keep", 0.28, "abcde", 5000, None),
        ("low", 0.2799, "a cat on a mat", 90000, "clip_score"),
        ("nan", float("nan"), "a cat on a mat", 90000, "clip_score"),
        ("null", None, "a cat on a mat", 90000, "clip_score"),
        ("short", 0.5, "abcd", 90000, "min_chars"),
        ("tiny", 0.5, "a cat on a mat", 4999, "min_bytes"),
    ]
    table = pa.table(
        {
            C.ID: [r[0] for r in rows],
            C.CLIP_SCORE: pa.array([r[1] for r in rows], pa.float32()),
            C.TEXT: [r[2] for r in rows],
            C.IMAGE_NBYTES: [r[3] for r in rows],
        }
    )
    src, out = write_shards(tmp_path / "in", table, 1), tmp_path / "out"
    mmtools("filter", src, "--preset", "laion", "-o", out, "-q")
    assert ids(out) == ["keep"]
    assert dropped(out) == {"clip_score": 3, "min_chars": 1, "min_bytes": 1}


def wav(parts: list[tuple[float, float]], sr: int = 16000) -> bytes:
    """A WAV of consecutive (seconds, amplitude) stretches of a 440 Hz tone (0: silence)."""
    import soundfile as sf

    signal = np.concatenate(
        [a * np.sin(2 * np.pi * 440 * np.arange(int(s * sr)) / sr) for s, a in parts]
    ).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, signal, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_audio_rules_decode_and_measure_each_clip(tmp_path):
    rows = [  # (id, audio bytes, duration column, the rule that drops it / the reject reason)
        ("tone", wav([(2.0, 0.3)]), 2.0, None),
        ("short", wav([(0.5, 0.3)]), 0.5, "duration"),
        ("silent", wav([(2.0, 0.0)]), 2.0, "silence"),
        ("mostly", wav([(1.5, 0.0), (0.5, 0.3)]), 2.0, "silence"),
        ("quiet", wav([(2.0, 0.002)]), 2.0, "loudness"),  # -57 dBFS: not silent, too quiet
        ("broken", b"this is not audio", 2.0, "not_audio"),
    ]
    table = pa.table(
        {
            C.ID: [r[0] for r in rows],
            C.AUDIO: C.media_array([r[1] for r in rows], [None] * len(rows)),
            C.DURATION: [r[2] for r in rows],
        }
    )
    src, out, out2 = write_shards(tmp_path / "in", table, 1), tmp_path / "out", tmp_path / "out2"
    # Rules from options: a looser silence limit keeps "mostly"; frames under -50 dBFS
    # count as silent, so "quiet" is now all silence. (Both runs at once: librosa loads slowly.)
    runs = [
        subprocess.Popen([*MMTOOLS, "filter", src, *args, "-q"], stderr=subprocess.PIPE)
        for args in (
            ["--preset", "audio-basic", "-o", out],
            ["--min-duration", "1", "--max-silence", "0.9", "--silence-db", "-50", "-o", out2],
        )
    ]
    assert [p.wait(timeout=120) for p in runs] == [0, 0], [p.stderr.read() for p in runs]
    assert ids(out) == ["tone"]
    assert dropped(out) == {"duration": 1, "silence": 2, "loudness": 1}
    rejects = pq.read_table(out / "_rejects").to_pylist()
    assert [(r["id"], r["step"], r["reason"]) for r in rejects] == [
        ("broken", "filter", "not_audio")
    ]
    assert ids(out2) == ["tone", "mostly"]
    assert dropped(out2) == {"duration": 1, "silence": 2}


def test_max_duration_and_min_loudness_options_drop_exactly_the_long_and_quiet_clips(tmp_path):
    """A sine's RMS is its amplitude less 3 dB: 0.04 is at -31 dBFS, 0.05 at -29."""
    clips = {  # name: (seconds, amplitude, the rule that drops it or None)
        "half.wav": (0.5, 0.1, None),
        "two.wav": (2.0, 0.1, None),
        "long.wav": (2.5, 0.1, "duration"),
        "long_quiet.wav": (3.0, 0.01, "duration"),
        "quiet.wav": (1.0, 0.04, "loudness"),
        "just_loud.wav": (1.0, 0.05, None),
        "silent.wav": (1.0, 0.0, "loudness"),
    }
    folder = tmp_path / "clips"
    folder.mkdir()
    for name, (seconds, amplitude, _) in clips.items():
        (folder / name).write_bytes(wav([(seconds, amplitude)]))
    out = tmp_path / "out"
    ingest, filtered = pipe(
        ["ingest", folder, "-q"],
        ["filter", "-", "--max-duration", "2", "--min-loudness", "-30", "-o", out, "-q"],
    )
    assert ingest.returncode == 0 and filtered.returncode == 0, filtered.stderr.decode()
    assert sorted(ids(out)) == sorted(n for n, (*_, rule) in clips.items() if rule is None)
    ledger = read_dropped(str(out))
    got = dict(zip(ledger[C.ID].to_pylist(), ledger[C.DROP_RULE].to_pylist(), strict=True))
    assert got == {n: rule for n, (*_, rule) in clips.items() if rule is not None}
    assert dropped(out) == {"duration": 2, "loudness": 2}


# -- --invert ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rules",
    [
        ["--where", "width >= 300 OR text LIKE '%7%'"],
        ["--top-fraction", "0.4", "--by", "clip_score", "--where", "height < 500"],
    ],
)
def test_invert_and_kept_partition_the_input_exactly(scored, tmp_path, rules):
    src, _ = scored
    kept, inverted = tmp_path / "kept", tmp_path / "inv"
    mmtools("filter", src, *rules, "-o", kept, "-q")
    proc = mmtools("filter", src, *rules, "--invert", "-o", inverted, "--json")
    a, b = read_dataset(kept), read_dataset(inverted)
    assert set(a.column(C.ID).to_pylist()).isdisjoint(b.column(C.ID).to_pylist())
    union = pl.from_arrow(pa.concat_tables([a, b]).sort_by(C.ID))
    assert union.equals(pl.from_arrow(pq.read_table(src).sort_by(C.ID)))  # NaN equals NaN here
    assert dropped(inverted) == {"inverted": a.num_rows}
    assert sum(dropped(kept).values()) == b.num_rows
    # The summary notes what each rule would have dropped: the kept run's drop counts.
    notes = json.loads(proc.stderr.decode().strip().splitlines()[-1])["notes"]
    assert notes == {f"would_drop_{k}": v for k, v in dropped(kept).items()}


def test_missing_column_for_a_rule_is_a_data_contract_error(dataset, tmp_path):
    proc = mmtools("filter", dataset, "--preset", "laion", "-o", tmp_path / "o", check=False)
    assert proc.returncode == 3
    assert proc.stderr.decode().startswith(
        "mmtools filter: error: filter rule clip_score needs column(s) clip_score; the input has"
    )
