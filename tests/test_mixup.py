"""`mmtools mixup`: the arithmetic of each mode, pairing, determinism, rejects and resume."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import (
    MMTOOLS,
    by_id,
    image_bytes,
    ingest_folder,
    make_image_folder,
    manifest_summary,
    mmtools,
    read_dataset,
    read_rejects,
    wav_bytes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmtools.io.source import Source
from mmtools.media import decode_audio, decode_image
from mmtools.steps.mixup.mix import mix_waveforms, slerp
from mmtools.steps.mixup.plan import plan_pairs


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """30 captioned JPEGs and their dataset (3 shards), for the tests that only read them."""
    folder = make_image_folder(tmp_path_factory.mktemp("mixup") / "imgs", 30)
    return folder, ingest_folder(folder)


@pytest.fixture
def dataset(shared):
    """The shared 30-row dataset (read only)."""
    return shared[1]


def mixup(src, out, *args, quiet: bool = True, check: bool = True):
    """Run `mmtools mixup SRC -o OUT ARGS...` in a subprocess."""
    return mmtools("mixup", src, "-o", out, *args, *(["-q"] if quiet else []), check=check)


def angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.arccos(np.clip(np.sum(a * b, axis=-1), -1, 1))


def embedding_file(path, n: int, dim: int = 16, seed: int = 0, groups: int = 5):
    """A Parquet file of `n` rows with float32 image and float16 text embeddings and a label."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, dim)).astype(np.float32)
    txt = rng.normal(size=(n, dim)).astype(np.float16)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt.astype(np.float32), axis=1, keepdims=True).astype(np.float16)
    table = pa.table(
        {
            "id": [f"e{i:05d}" for i in range(n)],
            "text": [f"caption {i}" for i in range(n)],
            "label": [i % groups for i in range(n)],
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.ravel()), dim),
            "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.ravel()), dim),
            "clip_score": pa.array(rng.random(n), pa.float32()),
        }
    )
    pq.write_table(table, path)
    return table


# -- image-text ------------------------------------------------------------------------------


def test_mixed_image_is_the_lambda_blend_of_its_parents(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):  # two sizes, JPEG and RGBA PNG, so resizing and alpha are exercised
        name, data = (f"a{i}.jpg", image_bytes(i)) if i % 2 else (f"b{i}.png", _rgba_png(i))
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(f"caption {i}")
    mmtools("ingest", folder, "-o", tmp_path / "ds", "-q")
    mixup(tmp_path / "ds", tmp_path / "out", "--lam", 0.3, "--format", "png")
    parents = by_id(read_dataset(tmp_path / "ds"))
    out = read_dataset(tmp_path / "out")
    assert out.num_rows == 12 and len(set(out.column("id").to_pylist())) == 12
    assert manifest_summary(tmp_path / "out")["dropped"] == {"mixup_source": 12}
    for row in out.to_pylist():
        a, b = (parents[p] for p in row["mixup_parents"])
        assert row["id"] == f"mixup:{a['id']}+{b['id']}" and row["id"] not in parents
        assert row["mixup_lambda"] == pytest.approx(0.3) and row["mixup_mode"] == "image-text"
        first = decode_image(a["image"]["bytes"])
        second = decode_image(b["image"]["bytes"]).resize(first.size, Image.BILINEAR)
        want = 0.3 * np.asarray(first, np.float64) + 0.7 * np.asarray(second, np.float64)
        got = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))
        assert got.shape == want.shape and np.abs(got - want).max() <= 1.0  # rounding only
        data = row["image"]["bytes"]
        assert (row["width"], row["height"]) == first.size
        assert row["image_format"] == "png" and row["image_nbytes"] == len(data)
        assert row["image_sha256"] == hashlib.sha256(data).hexdigest()
        assert row["text"] == f"{a['text']} {b['text']}" and row["source"] is None


def _rgba_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA").save(buf, "PNG")
    return buf.getvalue()


def test_same_rows_whatever_batch_size_shard_layout_input_order_or_pipe(tmp_path, shared):
    image_folder, dataset = shared
    args = ["--fraction", 0.5, "--seed", 7]
    mixup(dataset, tmp_path / "a", "--batch-size", 7, *args)
    # The same rows in one file, in reverse order, read in batches of 64.
    table = read_dataset(dataset)
    pq.write_table(table.take(np.arange(table.num_rows)[::-1]), tmp_path / "reversed.parquet")
    mixup(tmp_path / "reversed.parquet", tmp_path / "b", "--batch-size", 64, *args)
    # A real pipe: ingest | mixup.
    ingest = subprocess.Popen([*MMTOOLS, "ingest", str(image_folder), "-q"], stdout=subprocess.PIPE)
    cmd = [*MMTOOLS, "mixup", "-", "-o", str(tmp_path / "c"), "--batch-size", "4", "-q"]
    piped = subprocess.run(
        cmd + list(map(str, args)), stdin=ingest.stdout, capture_output=True, timeout=120
    )
    ingest.stdout.close()
    assert ingest.wait() == 0 and piped.returncode == 0, piped.stderr.decode()
    runs = [by_id(read_dataset(tmp_path / d)) for d in "abc"]
    assert len(runs[0]) == 15 and runs[0] == runs[1] == runs[2]
    inputs = set(table.column("id").to_pylist())
    assert all(set(r["mixup_parents"]) <= inputs for r in runs[0].values())
    mixup(dataset, tmp_path / "d", "--fraction", 0.5, "--seed", 8)
    assert by_id(read_dataset(tmp_path / "d")).keys() != runs[0].keys()


def test_undecodable_parent_becomes_a_reject_and_the_rest_is_made(tmp_path, dataset):
    table = read_dataset(dataset)
    images = table.column("image").to_pylist()
    bad = {
        table["id"][3].as_py(): b"this is not an image",
        table["id"][17].as_py(): images[17]["bytes"][: len(images[17]["bytes"]) // 2],
    }
    for i, row_id in enumerate(table.column("id").to_pylist()):
        if row_id in bad:
            images[i] = {"bytes": bad[row_id], "path": images[i]["path"]}
    damaged = table.set_column(1, "image", pa.array(images, table.schema.field("image").type))
    pq.write_table(damaged, tmp_path / "damaged.parquet")
    mixup(dataset, tmp_path / "clean", "--keep-originals")
    proc = mixup(tmp_path / "damaged.parquet", tmp_path / "out", "--keep-originals", quiet=False)
    rejects = read_rejects(tmp_path / "out")
    assert dict(zip(rejects["id"].to_pylist(), rejects["reason"].to_pylist(), strict=True)) == {
        table["id"][3].as_py(): "not_image",
        table["id"][17].as_py(): "truncated",
    }
    assert set(rejects["step"].to_pylist()) == {"mixup"}
    clean, out = by_id(read_dataset(tmp_path / "clean")), by_id(read_dataset(tmp_path / "out"))
    expected = {k: v for k, v in clean.items() if not set(v["mixup_parents"] or [k]) & set(bad)}
    assert out == expected  # every other original and mixed row, byte for byte
    made = sum(1 for r in out.values() if r["mixup_parents"])
    skipped = sum(1 for r in clean.values() if r["mixup_parents"]) - made
    assert skipped >= 2 and f"pairs skipped {skipped}" in proc.stderr.decode()
    s = manifest_summary(tmp_path / "out")
    assert s["notes"] == {"pairs_skipped": skipped}
    assert (s["rows_in"], s["rows_out"], s["generated"], s["rejected"]) == (30, 28 + made, made, 2)
    originals = [r for r in out.values() if not r["mixup_parents"]]
    assert all(r["mixup_lambda"] is None and r["mixup_mode"] is None for r in originals)


def test_resume_after_a_crash_gives_the_uninterrupted_rows(tmp_path, dataset, monkeypatch):
    """Also: the partner spool has no name while the run reads it, so a run killed outright
    (SIGKILL, no cleanup) leaves no temporary file behind."""
    from mmtools import engines as engine
    from mmtools.io.dataset import DatasetSink
    from mmtools.steps.mixup import Mixup, MixupConfig

    spool_dir = tmp_path / "tmp"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    seen = []

    class Crashing(Source):
        """Dies after two batches of the streaming pass, as a killed run would."""

        def batches(self, columns=None, batch_size=1024, skip_rows=0):
            for i, batch in enumerate(super().batches(columns, batch_size, skip_rows)):
                if columns is None and i == 2:
                    seen.append(sorted(os.listdir(spool_dir)))
                    raise KeyboardInterrupt
                yield batch

    def run(source, out):
        step = Mixup(MixupConfig(fraction=0.8, seed=1))
        sink = DatasetSink(str(out), shard_rows=4)
        return engine.run("mixup", source, [step], sink, batch_size=4, quiet=True)[0]

    with pytest.raises(KeyboardInterrupt):
        run(Crashing([str(dataset)]), tmp_path / "resumed")
    again = run(Source([str(dataset)]), tmp_path / "resumed")
    run(Source([str(dataset)]), tmp_path / "whole")
    assert again.resumed_from == 8 and seen == [[]]
    whole = by_id(read_dataset(tmp_path / "whole"))
    assert len(whole) == 24 and by_id(read_dataset(tmp_path / "resumed")) == whole


# -- audio-text ------------------------------------------------------------------------------


def _sine(freq: float, seconds: float, sr: int, amp: float, subtype: str) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(
        buf,
        (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32),
        sr,
        format="WAV",
        subtype=subtype,
    )
    return buf.getvalue()


def _expected_mix(a: bytes, b: bytes, lam: float) -> np.ndarray:
    first, sr = decode_audio(a)
    second, _ = decode_audio(b, sr)
    n = max(len(first), len(second))
    mix = np.zeros(n)
    mix[: len(first)] += lam * first
    mix[: len(second)] += (1 - lam) * second
    return mix


def test_audio_mix_equals_the_lambda_sum(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(6):  # two rates, stereo and mono, different lengths
        sr = 16000 if i % 2 else 22050
        data = wav_bytes(0.2 + 0.05 * i, sr, channels=1 + i % 2, freq=220.0 * (i + 1))
        (folder / f"c{i}.wav").write_bytes(data)
        (folder / f"c{i}.txt").write_text(f"sound {i}")
    mmtools("ingest", folder, "-o", tmp_path / "ds", "-q")
    mixup(tmp_path / "ds", tmp_path / "out", "--mode", "audio-text", "--lam", 0.6)
    parents = by_id(read_dataset(tmp_path / "ds"))
    out = read_dataset(tmp_path / "out").to_pylist()
    assert len(out) == 6
    for row in out:
        a, b = (parents[p] for p in row["mixup_parents"])
        want = _expected_mix(a["audio"]["bytes"], b["audio"]["bytes"], 0.6)
        got, sr = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float64")
        assert sr == a["sample_rate"] == row["sample_rate"] and row["channels"] == 1
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
        assert row["duration"] == pytest.approx(len(got) / sr)
        assert row["audio_format"] == "wav" and row["text"] == f"{a['text']} {b['text']}"


def test_loud_audio_mix_is_scaled_below_full_scale(tmp_path):
    folder = tmp_path / "loud"
    folder.mkdir()
    for i in range(4):  # float WAVs above full scale, in phase: the λ-sum clips
        (folder / f"l{i}.wav").write_bytes(_sine(440, 0.1 + 0.02 * i, 16000, 1.5, "FLOAT"))
    mmtools("ingest", folder, "-o", tmp_path / "ds", "-q")
    mixup(tmp_path / "ds", tmp_path / "out", "--mode", "audio-text", "--lam", 0.5)
    parents = by_id(read_dataset(tmp_path / "ds"))
    for row in read_dataset(tmp_path / "out").to_pylist():
        a, b = (parents[p] for p in row["mixup_parents"])
        want = _expected_mix(a["audio"]["bytes"], b["audio"]["bytes"], 0.5)
        got, _ = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float64")
        assert np.abs(want).max() > 1.4 and np.abs(got).max() <= 1.0
        assert np.abs(got - want / np.abs(want).max()).max() < 1e-4


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.floats(0, 1), st.floats(0.1, 3.0))
def test_waveform_mix_is_the_lambda_sum_until_it_would_clip(n, m, lam, amp):
    rng = np.random.default_rng(n * 1000 + m)
    a, b = amp * rng.uniform(-1, 1, n), amp * rng.uniform(-1, 1, m)
    mix, peak = mix_waveforms(a, b, lam)
    want = np.zeros(max(n, m))
    want[:n] += lam * a
    want[:m] += (1 - lam) * b
    assert peak == pytest.approx(np.abs(want).max())
    assert np.abs(mix).max() <= 1.0 + 1e-6
    np.testing.assert_allclose(mix, want / max(1.0, peak), atol=1e-6)


# -- embedding -------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.integers(2, 64),
    st.floats(0, 1),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["random", "same", "opposite", "close"]),
)
def test_slerp_stays_on_the_sphere_and_on_the_arc(dim, lam, seed, case):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(1, dim))
    b = {
        "random": rng.normal(size=(1, dim)),
        "same": 3 * a,
        "opposite": -a,
        "close": a + 1e-9 * rng.normal(size=(1, dim)),
    }[case]
    out = slerp(a, b, np.array([lam]))
    theta = angle(a, b)
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-9)
    assert angle(out, a) == pytest.approx((1 - lam) * theta, abs=1e-6)
    assert angle(out, b) == pytest.approx(lam * theta, abs=1e-6)


def test_embedding_mixup_lambda_is_beta_and_vectors_lie_on_the_arc(tmp_path):
    from scipy import stats

    src = embedding_file(tmp_path / "emb.parquet", 2000)
    mixup(
        tmp_path / "emb.parquet",
        tmp_path / "out",
        "--mode",
        "embedding",
        "--alpha",
        0.4,
        "--seed",
        3,
    )
    out = read_dataset(tmp_path / "out")
    assert out.num_rows == 2000
    lam = np.asarray(out["mixup_lambda"], np.float64)
    assert stats.kstest(lam, stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    assert lam.mean() == pytest.approx(0.5, abs=0.03)
    assert lam.var() == pytest.approx(1 / (4 * (2 * 0.4 + 1)), rel=0.1)
    rows = by_id(src)
    for column, tol in (("image_embedding", 1e-5), ("text_embedding", 2e-3)):
        got = np.asarray(out[column].combine_chunks().flatten(), np.float64).reshape(-1, 16)
        a = np.array([rows[p[0]][column] for p in out["mixup_parents"].to_pylist()], np.float64)
        b = np.array([rows[p[1]][column] for p in out["mixup_parents"].to_pylist()], np.float64)
        theta = angle(a, b)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=tol)
        np.testing.assert_allclose(angle(got, a), (1 - lam) * theta, atol=50 * tol)
        np.testing.assert_allclose(angle(got, b), lam * theta, atol=50 * tol)
    assert out["text"].null_count == out["clip_score"].null_count == 2000


def test_cross_modal_mixup_goes_from_image_to_text(tmp_path):
    src = by_id(embedding_file(tmp_path / "emb.parquet", 40))
    mixup(
        tmp_path / "emb.parquet",
        tmp_path / "out",
        "--mode",
        "embedding",
        "--columns",
        "image_embedding:text_embedding",
        "--lam",
        0.25,
    )
    out = read_dataset(tmp_path / "out")
    assert out["text_embedding"].null_count == 40
    for row in out.to_pylist():
        a = np.array(src[row["mixup_parents"][0]]["image_embedding"])
        b = np.array(src[row["mixup_parents"][1]]["text_embedding"], np.float64)
        got = np.array(row["image_embedding"])
        theta = angle(a, b)
        assert angle(got, a) == pytest.approx(0.75 * theta, abs=1e-3)
        assert angle(got, b) == pytest.approx(0.25 * theta, abs=1e-3)


def test_pairing_within_a_group_and_with_the_nearest_neighbour(tmp_path):
    src = embedding_file(tmp_path / "emb.parquet", 60, groups=4)
    rows = by_id(src)
    mixup(
        tmp_path / "emb.parquet",
        tmp_path / "same",
        "--mode",
        "embedding",
        "--pairing",
        "same:label",
    )
    for row in read_dataset(tmp_path / "same").to_pylist():
        a, b = row["mixup_parents"]
        assert a != b and rows[a]["label"] == rows[b]["label"]
    mixup(
        tmp_path / "emb.parquet",
        tmp_path / "near",
        "--mode",
        "embedding",
        "--pairing",
        "nearest:text_embedding",
        "--fraction",
        0.5,
    )
    x = np.array([r["text_embedding"] for r in rows.values()], np.float64)
    sims = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ x.T
    np.fill_diagonal(sims, -np.inf)
    ids = list(rows)
    near = read_dataset(tmp_path / "near").to_pylist()
    assert len(near) == 30
    for row in near:
        a, b = row["mixup_parents"]
        assert b == ids[int(np.argmax(sims[ids.index(a)]))]


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 80),
    st.integers(0, 1000),
    st.sampled_from(["random", "same"]),
    st.floats(0.05, 1.0),
)
def test_plan_depends_on_the_rows_not_their_order(n, seed, kind, fraction):
    ids = pa.array([f"r{i}" for i in range(n)])
    key = pa.array([i % 3 for i in range(n)]) if kind == "same" else None
    perm = np.random.default_rng(seed).permutation(n)
    p = plan_pairs(ids, key, kind, fraction, 0.5, None, seed)
    q = plan_pairs(
        ids.take(perm), key.take(perm) if key is not None else None, kind, fraction, 0.5, None, seed
    )
    pairs = list(zip(p.first.to_pylist(), p.second.to_pylist(), p.lam.tolist(), strict=True))
    assert pairs == list(
        zip(q.first.to_pylist(), q.second.to_pylist(), q.lam.tolist(), strict=True)
    )
    eligible = n if kind == "random" else sum(len(range(i % 3, n, 3)) >= 2 for i in range(n))
    assert len(pairs) == int(np.floor(fraction * eligible + 0.5))
    assert all(a != b for a, b, _ in pairs) and len({a for a, _, _ in pairs}) == len(pairs)
    if kind == "same":
        assert all(int(a[1:]) % 3 == int(b[1:]) % 3 for a, b, _ in pairs)


# -- bad input and options ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--lam", "1.5"], 2, "--lam must be in [0, 1]"),
        (["--mode", "video"], 2, "--mode must be one of"),
        (["--pairing", "closest"], 2, "--pairing must be"),
        (["--mode", "audio-text"], 3, "needs column(s) audio"),
        (["--pairing", "same:nope"], 2, "--pairing: unknown column nope"),
        (["--pairing", "nearest"], 3, "--pairing nearest needs image_embedding"),
        (["--mode", "embedding"], 3, "needs an embedding column"),
    ],
)
def test_bad_options_give_one_line_errors(dataset, tmp_path, args, code, message):
    proc = mixup(dataset, tmp_path / "out", *args, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == code and message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("mmtools mixup: error: ")


def test_unusable_embeddings_become_rejects(tmp_path):
    table = embedding_file(tmp_path / "emb.parquet", 20)
    vectors = table["image_embedding"].to_pylist()
    vectors[4] = [float("nan")] * 16
    vectors[9] = [0.0] * 16
    vectors[13] = None
    col = pa.array(vectors, table.schema.field("image_embedding").type)
    pq.write_table(table.set_column(3, "image_embedding", col), tmp_path / "bad.parquet")
    mixup(tmp_path / "bad.parquet", tmp_path / "out", "--mode", "embedding", "--keep-originals")
    rejects = read_rejects(tmp_path / "out")
    assert dict(zip(rejects["id"].to_pylist(), rejects["reason"].to_pylist(), strict=True)) == {
        "e00004": "nan_embedding",
        "e00009": "zero_norm_embedding",
        "e00013": "missing_embedding",
    }
    out = read_dataset(tmp_path / "out")
    mixed = out.filter(pc.is_valid(out["mixup_mode"]))
    assert out.num_rows - mixed.num_rows == 17 and mixed.num_rows > 0
    parents = {p for pair in mixed["mixup_parents"].to_pylist() for p in pair}
    assert not parents & {"e00004", "e00009", "e00013"}
    x = np.asarray(mixed["image_embedding"].combine_chunks().flatten()).reshape(-1, 16)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_duplicate_ids_are_a_data_error(tmp_path):
    table = embedding_file(tmp_path / "emb.parquet", 10)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), tmp_path / "dup.parquet")
    proc = mixup(tmp_path / "dup.parquet", tmp_path / "out", "--mode", "embedding", check=False)
    assert proc.returncode == 3 and "id 'e00000' occurs more than once" in proc.stderr.decode()


def test_help_opens_with_an_example():
    out = mmtools("mixup", "--help").stdout.decode()
    assert "Example: mmtools mixup" in out and "--keep-originals" in out
