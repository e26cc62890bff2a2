"""The drop ledger: a row in `_dropped/` for every dropped row, with its rule, the value that
decided and, for a duplicate, the row kept instead; through pipes, resume and `--no-ledger`."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, image_bytes, mmtools, read_dataset, write_shards
from PIL import Image

from mmtools import columns as C
from mmtools import engines
from mmtools.io.dataset import DatasetSink, read_dropped
from mmtools.io.source import Source
from mmtools.steps.filter.step import FRAME_LENGTH, HOP_LENGTH, FilterConfig, make_filter

LEDGER = ["id", "step", "rule", "value", "kept_id", "source"]


def manifest(path: Path) -> dict:
    return json.loads((path / "_manifest.json").read_text())


def ledger_by_id(path: Path) -> dict[str, tuple]:
    """id -> (step, rule, value, kept_id) of a dataset's ledger."""
    table = read_dropped(str(path))
    assert table is not None and table.schema.names == LEDGER
    return {r["id"]: (r["step"], r["rule"], r["value"], r["kept_id"]) for r in table.to_pylist()}


def rule_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, rule, _, _ in ledger_by_id(path).values():
        counts[rule] = counts.get(rule, 0) + 1
    return counts


# -- filter ---------------------------------------------------------------------------------

ROWS = [  # id, caption, width, height, clip_score, and the first rule it fails with its value
    ("a", "a red circle on blue", 300, 250, 0.35, None),
    ("b", "two words", 300, 250, 0.40, ("min_words", 2.0)),
    ("c", "one two three", 150, 400, 0.50, ("min_side", 150.0)),
    ("d", "one two three four", 900, 250, 0.45, ("max_aspect", 3.6)),
    ("e", "one two three four", 300, 300, 0.10, ("where", float(np.float32(0.10)))),
    ("f", "one two three four", 300, 300, None, ("where", None)),
    ("g", "one two three four", 300, 300, float("nan"), ("where", None)),
    ("h", "a b c", 300, 300, 0.30, ("min_chars", 5.0)),
    ("i", "A red circle, on blue!", 640, 480, 0.31, None),  # a's caption, as dedup sees it
]


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory) -> Path:
    ids, texts, widths, heights, scores, _ = zip(*ROWS, strict=True)
    table = pa.table(
        {
            C.ID: list(ids),
            C.TEXT: list(texts),
            C.WIDTH: pa.array(widths, pa.int32()),
            C.HEIGHT: pa.array(heights, pa.int32()),
            C.CLIP_SCORE: pa.array(scores, pa.float32()),
        }
    )
    return write_shards(tmp_path_factory.mktemp("ledger") / "rows", table, 2)


def test_filter_ledger_names_the_first_failing_rule_and_its_value(rows_dir, tmp_path):
    out = tmp_path / "out"
    where = ["--where", "clip_score >= 0.3", "--preset", "datacomp-basic"]
    mmtools("filter", rows_dir, *where, "-o", out, "--batch-size", "4", "-q")
    found = ledger_by_id(out)
    expected = {i: why for i, *_, why in ROWS if why is not None}
    assert {i: (rule, pytest.approx(v) if v else v) for i, (_, rule, v, _) in found.items()} == {
        i: (rule, value) for i, (rule, value) in expected.items()
    }
    assert {s for s, *_ in found.values()} == {"filter"}
    assert all(kept is None for *_, kept in found.values())
    assert rule_counts(out) == manifest(out)["dropped"] == manifest(out)["summary"]["dropped"]
    assert manifest(out)["ledger"] == {"rows": 7, "shards": ["_dropped/part-00000.parquet"]}
    assert sorted(read_dataset(out)[C.ID].to_pylist()) == ["a", "i"]


def test_inverted_filter_ledgers_the_rows_every_rule_keeps(rows_dir, tmp_path):
    mmtools("filter", rows_dir, "--where", "clip_score >= 0.3", "--invert", "-o", tmp_path / "o")
    kept = ["a", "b", "c", "d", "h", "i"]
    assert ledger_by_id(tmp_path / "o") == {i: ("filter", "inverted", None, None) for i in kept}


def test_top_fraction_ledger_holds_each_dropped_rows_key(tmp_path):
    keys = [0.9, 0.1, None, 0.5, 0.7, 0.3, float("nan"), 0.2, 0.8, 0.4]
    table = pa.table({C.ID: [f"k{i}" for i in range(10)], "key": pa.array(keys, pa.float64())})
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    mmtools("filter", tmp_path / "in.parquet", "--top-fraction", "0.3", "--by", "key", "-o", out)
    assert read_dataset(out)[C.ID].to_pylist() == ["k0", "k4", "k8"]
    expected = {f"k{i}": k for i, k in enumerate(keys) if f"k{i}" not in ("k0", "k4", "k8")}
    expected["k6"] = None  # NaN: no value
    found = {i: (rule, v) for i, (_, rule, v, _) in ledger_by_id(out).items()}
    assert found == {i: ("top_fraction", v) for i, v in expected.items()}


@pytest.mark.parametrize(
    ("condition", "dropped"),
    [("clip_score >= 0.3 AND width >= 300", "cefg"), ("length(text) > 12", "bh")],
)
def test_where_ledger_value_is_null_unless_one_numeric_column_decides(
    rows_dir, tmp_path, condition, dropped
):
    mmtools("filter", rows_dir, "--where", condition, "-o", tmp_path / "out", "-q")
    assert ledger_by_id(tmp_path / "out") == {i: ("filter", "where", None, None) for i in dropped}


@pytest.fixture(scope="module")
def laion_rows(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Captioned images ingested for real, with clip scores added; each image's file size."""
    folder = tmp_path_factory.mktemp("laion") / "imgs"
    folder.mkdir()
    rows = {  # id: (image, clip_score)
        "keep.png": (image_bytes(1, (64, 64), "PNG"), 0.5),
        "low.png": (image_bytes(2, (64, 64), "PNG"), 0.2799),
        "unscored.png": (image_bytes(3, (64, 64), "PNG"), None),
        "small.jpg": (image_bytes(4), 0.9),
        "smaller.jpg": (image_bytes(5, (24, 24)), 0.6),
        "small_and_low.jpg": (image_bytes(6), 0.1),
    }
    for name, (data, _) in rows.items():
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(f"a photo called {name}")
    mmtools("ingest", folder, "-o", folder.parent / "ds", "-q")
    table = read_dataset(folder.parent / "ds")
    scores = pa.array([rows[i][1] for i in table[C.ID].to_pylist()], pa.float32())
    pq.write_table(table.append_column(C.CLIP_SCORE, scores), folder.parent / "scored.parquet")
    return folder.parent / "scored.parquet", {i: len(d) for i, (d, _) in rows.items()}


def test_clip_score_and_min_bytes_ledger_hold_the_column_that_decided(laion_rows, tmp_path):
    src, nbytes = laion_rows
    assert [n >= 5000 for n in nbytes.values()] == [True] * 3 + [False] * 3
    mmtools("filter", src, "--preset", "laion", "-o", tmp_path / "out", "-q")
    assert ledger_by_id(tmp_path / "out") == {
        "low.png": ("filter", "clip_score", float(np.float32(0.2799)), None),
        "unscored.png": ("filter", "clip_score", None, None),
        "small.jpg": ("filter", "min_bytes", float(nbytes["small.jpg"]), None),
        "smaller.jpg": ("filter", "min_bytes", float(nbytes["smaller.jpg"]), None),
        "small_and_low.jpg": ("filter", "clip_score", float(np.float32(0.1)), None),
    }


def _square_wave(seconds: float, amplitude: float, sr: int = 16000) -> np.ndarray:
    """A 400 Hz square wave: every sample is +-amplitude, so its RMS is exactly amplitude."""
    n = int(seconds * sr)
    return np.where(np.arange(n) // 20 % 2 == 0, amplitude, -amplitude).astype(np.float32)


def _silent_share(silent: int, total: int) -> float:
    """The share of RMS frames (centred, zero-padded) of a clip of `total` samples whose first
    `silent` samples are zeros and the rest loud, that hold no loud sample."""
    frames = 1 + total // HOP_LENGTH
    quiet = (silent - FRAME_LENGTH // 2) // HOP_LENGTH + 1
    return quiet / frames


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """WAV clips ingested for real: one kept by audio-basic, one failing each of its rules."""
    import soundfile as sf

    folder = tmp_path_factory.mktemp("clips") / "wavs"
    folder.mkdir()
    waves = {
        "tone.wav": _square_wave(2.0, 0.3),
        "short.wav": _square_wave(0.75, 0.3),
        "mostly_silent.wav": np.concatenate([np.zeros(24000, np.float32), _square_wave(0.5, 0.3)]),
        "quiet.wav": _square_wave(2.0, 0.002),
    }
    for name, wave in waves.items():
        sf.write(folder / name, wave, 16000, format="WAV", subtype="FLOAT")
    mmtools("ingest", folder, "-o", folder.parent / "ds", "-q")
    return folder.parent / "ds"


def test_duration_silence_and_loudness_ledger_hold_what_decided(clips, tmp_path):
    mmtools("filter", clips, "--preset", "audio-basic", "-o", tmp_path / "out", "-q")
    assert read_dataset(tmp_path / "out")[C.ID].to_pylist() == ["tone.wav"]
    silent_share = _silent_share(24000, 32000)  # 45 of 63 frames
    quiet_dbfs = 20 * np.log10(np.float32(0.002))
    assert ledger_by_id(tmp_path / "out") == {
        "short.wav": ("filter", "duration", 0.75, None),
        "mostly_silent.wav": ("filter", "silence", pytest.approx(silent_share), None),
        "quiet.wav": ("filter", "loudness", pytest.approx(quiet_dbfs), None),
    }


# -- dedup ----------------------------------------------------------------------------------


def _scene(seed: int) -> Image.Image:
    """A smooth image whose pHash survives a re-encode at low quality."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(field).resize((96, 96), Image.BICUBIC)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> tuple[Path, int]:
    """o1 with its exact copy c1, o2 with a JPEG q30 copy n2, and o3; the o2/n2 distance."""
    o1, o2, o3 = (encode(_scene(s), quality=95) for s in (1, 2, 3))
    n2 = encode(Image.open(io.BytesIO(o2)), quality=30)
    ids = ["o1", "o2", "c1", "o3", "n2"]
    blobs = [o1, o2, o1, o3, n2]
    table = pa.table({C.ID: ids, C.IMAGE: C.media_array(blobs, [None] * 5)})
    distance = imagehash.phash(Image.open(io.BytesIO(o2))) - imagehash.phash(
        Image.open(io.BytesIO(n2))
    )
    assert 0 < distance <= 10 and o2 != n2  # a near copy, not an exact one
    return write_shards(tmp_path_factory.mktemp("dups") / "in", table, 2), int(distance)


def test_dedup_ledger_names_the_kept_twin_and_the_distance(images_dir, tmp_path):
    src, distance = images_dir
    args = ["-m", "exact,phash", "--max-distance", "10", "--batch-size", "2", "-q"]
    mmtools("dedup", src, "-o", tmp_path / "out", *args)
    assert ledger_by_id(tmp_path / "out") == {
        "c1": ("dedup", "exact", None, "o1"),
        "n2": ("dedup", "phash", float(distance), "o2"),
    }
    assert rule_counts(tmp_path / "out") == manifest(tmp_path / "out")["dropped"]

    mmtools("dedup", src, "-o", tmp_path / "mark", *args, "--mark")
    marked = read_dataset(tmp_path / "mark")
    cols = [C.ID, C.IS_DUPLICATE, C.DUP_METHOD, C.DUP_KEPT_ID, C.DUP_VALUE]
    assert marked.select(cols).to_pylist() == [
        dict(zip(cols, r, strict=True))
        for r in [
            ("o1", False, None, None, None),
            ("o2", False, None, None, None),
            ("c1", True, "exact", "o1", None),
            ("o3", False, None, None, None),
            ("n2", True, "phash", "o2", float(distance)),
        ]
    ]
    assert read_dropped(str(tmp_path / "mark")) is None  # marking drops nothing


def _shingles(text: str) -> set[str]:
    words = text.split()
    return {f"{a} {b}" for a, b in itertools.pairwise(words)}


def test_minhash_and_semantic_ledger_hold_similarities(tmp_path):
    rng = np.random.default_rng(5)
    base = rng.standard_normal(32)
    vectors = [base, rng.standard_normal(32), base + 0.05 * rng.standard_normal(32)]
    vectors.append(rng.standard_normal(32))
    emb = np.array(vectors, np.float16)
    texts = [
        "a red circle on a blue square today",
        "a red circle on a blue square",
        "something else entirely in this one",
        "and a fourth caption unlike the others",
    ]
    table = pa.table(
        {
            C.ID: ["u1", "u2", "u3", "u4"],
            C.TEXT: texts,
            C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 32),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    args = ["-m", "minhash,semantic", "--clusters", "1", "--eps", "0.05", "-q"]
    mmtools("dedup", tmp_path / "in.parquet", "-o", tmp_path / "out", *args)
    found = ledger_by_id(tmp_path / "out")
    a, b = (_shingles(t) for t in texts[:2])
    e1, e3 = emb[0].astype(np.float64), emb[2].astype(np.float64)
    cosine = float(e1 @ e3 / np.linalg.norm(e1) / np.linalg.norm(e3))
    assert found == {
        "u2": ("dedup", "minhash", pytest.approx(len(a & b) / len(a | b)), "u1"),
        "u3": ("dedup", "semantic", pytest.approx(cosine, abs=1e-6), "u1"),
    }


# -- pipes, --no-ledger, resume -----------------------------------------------------------


def test_ledger_rows_travel_down_a_pipe_into_the_final_dataset(rows_dir, tmp_path):
    stream = mmtools("filter", rows_dir, "--where", "clip_score >= 0.3", "-q", "-o", "-").stdout
    out = tmp_path / "out"
    mmtools("dedup", "-m", "exact", "--exact-key", "text", "-o", out, "-q", input=stream)
    found = ledger_by_id(out)
    assert found == {
        "e": ("filter", "where", pytest.approx(0.1), None),
        "f": ("filter", "where", None, None),
        "g": ("filter", "where", None, None),
        "i": ("dedup", "exact", None, "a"),
    }
    upstream = manifest(out)["lineage"][0]["dropped"]
    assert upstream == {"where": 3} and manifest(out)["dropped"] == {"exact": 1}
    assert manifest(out)["summary"]["upstream_dropped"] == 3
    assert manifest(out)["ledger"]["rows"] == 4

    bare = ["-o", tmp_path / "bare", "-q", "--no-ledger"]
    mmtools("dedup", "-m", "exact", "--exact-key", "text", *bare, input=stream)
    assert not (tmp_path / "bare" / "_dropped").exists()
    assert manifest(tmp_path / "bare")["ledger"] == {"rows": 0, "shards": []}


@pytest.mark.parametrize("command", [["filter", "--where", "clip_score >= 0.3"], ["dedup"]])
def test_no_ledger_writes_no_dropped_dir_and_the_same_rows(rows_dir, tmp_path, command):
    mmtools(*command[:1], rows_dir, *command[1:], "-o", tmp_path / "on", "-q")
    mmtools(*command[:1], rows_dir, *command[1:], "-o", tmp_path / "off", "-q", "--no-ledger")
    assert (tmp_path / "on" / "_dropped").is_dir()
    assert not (tmp_path / "off" / "_dropped").exists()
    assert read_dataset(tmp_path / "on").equals(read_dataset(tmp_path / "off"))
    assert manifest(tmp_path / "off")["dropped"] == manifest(tmp_path / "on")["dropped"]


class _Crash(Exception):
    pass


class _CrashingSink(DatasetSink):
    """Dies, as a killed process would, at its `after`-th write."""

    after = 8  # of 12 batches: committed units before, uncommitted rows at the crash

    def write(self, *args, **kwargs):
        if self.after == 0:
            raise _Crash
        self.after -= 1
        super().write(*args, **kwargs)

    def abort(self):
        self._lock.release()  # the kernel drops a dead process's lock; nothing else


def test_a_resumed_run_ledgers_each_dropped_row_once(tmp_path):
    rng = np.random.default_rng(1)
    table = pa.table({C.ID: [f"r{i:03d}" for i in range(120)], "x": rng.uniform(0, 1, 120)})
    pq.write_table(table, tmp_path / "in.parquet")

    def run(sink_class, out):
        sink = sink_class(str(tmp_path / out), shard_rows=20)
        step = make_filter(FilterConfig(where="x >= 0.5"))
        source = Source([str(tmp_path / "in.parquet")])
        return engines.run("filter", source, [step], sink, batch_size=10, quiet=True)

    run(DatasetSink, "ref")
    with pytest.raises(_Crash):
        run(_CrashingSink, "out")
    assert (tmp_path / "out" / "_dropped").is_dir()  # a part was committed before the crash
    run(DatasetSink, "out")
    ref, got = read_dropped(str(tmp_path / "ref")), read_dropped(str(tmp_path / "out"))
    assert got.equals(ref) and got.num_rows == (table["x"].to_numpy() < 0.5).sum()
    assert sorted(p.name for p in (tmp_path / "out" / "_dropped").iterdir()) == sorted(
        n.split("/")[1] for n in manifest(tmp_path / "out")["ledger"]["shards"]
    )
