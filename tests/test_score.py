"""`mmtools score`: cosines of one model's embeddings, on the fly or from `embed`; refusals."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, mmtools, read_dataset, reject_reasons, tiny_clip
from test_embed import audio_table, matrix, media_table, tiny_clap, vectors_by_id

from mmtools import columns as C
from mmtools.errors import DataContractError
from mmtools.steps.embed import ClipEmbed, EmbedConfig
from mmtools.steps.score.step import Score, ScoreConfig, score_steps

TINY = ("--pretrained", "none")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("score")


@pytest.fixture(scope="module")
def clip_a(root):
    return tiny_clip(root, "tiny-clip-a", layers=2)


@pytest.fixture(scope="module")
def clip_b(root):
    return tiny_clip(root, "tiny-clip-b", layers=1)


@pytest.fixture(scope="module")
def images(root):
    """16 captioned images in two Parquet files."""
    table = media_table([image_bytes(i) for i in range(16)], [f"photo {i}" for i in range(16)])
    (root / "in").mkdir()
    pq.write_table(table.slice(0, 9), root / "in" / "a.parquet")
    pq.write_table(table.slice(9), root / "in" / "b.parquet")
    return root / "in"


@pytest.fixture(scope="module")
def piped(root, images, clip_a):
    """mmtools embed IN -o - | mmtools score -o OUT."""
    stream = mmtools(
        "embed", images, "--model", clip_a, *TINY, "--batch-size", 5, "-q", "-o", "-"
    ).stdout
    mmtools("score", "-o", root / "piped", "-q", input=stream)
    return read_dataset(root / "piped")


@pytest.fixture(scope="module")
def direct(root, images, clip_a):
    """mmtools score IN (embeddings made on the fly)."""
    mmtools("score", images, "--model", clip_a, *TINY, "-o", root / "direct", "-q")
    return read_dataset(root / "direct")


def test_on_the_fly_equals_embed_then_score(piped, direct):
    assert piped.column(C.ID).to_pylist() == direct.column(C.ID).to_pylist()
    for column in (C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING):
        assert np.array_equal(matrix(piped, column), matrix(direct, column))
    assert np.allclose(matrix_score(piped), matrix_score(direct), atol=1e-6)
    assert C.column_info(direct.schema) == C.column_info(piped.schema)


def matrix_score(table: pa.Table, column: str = C.CLIP_SCORE) -> np.ndarray:
    return table.column(column).to_numpy()


def test_clip_score_is_the_raw_cosine_with_the_model_recorded(piped, clip_a):
    image, text = matrix(piped, C.IMAGE_EMBEDDING), matrix(piped, C.TEXT_EMBEDDING)
    cosine = (
        np.sum(image * text, axis=1) / np.linalg.norm(image, axis=1) / np.linalg.norm(text, axis=1)
    )
    assert piped.schema.field(C.CLIP_SCORE).type == pa.float32()
    assert np.allclose(matrix_score(piped), cosine, atol=1e-5)
    assert np.all(np.abs(matrix_score(piped)) <= 1)
    info = C.column_info(piped.schema)[C.CLIP_SCORE]
    assert info["model"] == str(clip_a) and info["pretrained"] == "none"
    assert info["of"] == [C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING]


@pytest.fixture(scope="module")
def image_only(root, images, clip_a):
    """A Parquet file holding image embeddings (and their metadata) but no text embeddings."""
    step = ClipEmbed(
        EmbedConfig(
            modalities=["image"], model=str(clip_a), pretrained="none", device="cpu", workers=2
        )
    )
    source = pq.read_table(images)
    schema = step.output_schema(source.schema)
    step.setup()
    batches = [r.batch for r in step.run(source.to_batches())]
    pq.write_table(pa.Table.from_batches(batches).cast(schema), root / "image_only.parquet")
    return root / "image_only.parquet"


def test_missing_embeddings_use_the_model_already_recorded(image_only, clip_a):
    steps = score_steps(
        pq.read_schema(image_only), None, EmbedConfig(model=None, audio_model=None, device="cpu")
    )
    assert [type(s) for s in steps] == [ClipEmbed, Score]
    embed = steps[0].config
    assert (embed.modalities, embed.model, embed.pretrained) == (["text"], str(clip_a), "none")


def test_refuses_to_compare_embeddings_of_different_models(root, image_only, clip_a, clip_b):
    proc = mmtools("score", image_only, "--model", clip_b, *TINY, "-o", root / "mixed", check=False)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1
    assert lines[0].startswith("mmtools score: error: image_embedding was made by ")
    assert str(clip_a) in lines[0] and str(clip_b) in lines[0]
    assert not (root / "mixed").exists()


def _vectors(rows: list) -> pa.Array:
    return pa.array(rows, C.embedding_type(3, "float32"))


def test_null_nan_and_zero_embeddings_become_rejects():
    image = _vectors([[1, 0, 0], None, [np.nan, 0, 0], [0, 0, 0], [0.6, 0.8, 0], [1, 1, 0]])
    text = _vectors([[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], None])
    batch = pa.record_batch(
        [pa.array(list("abcdef")), image, text], names=[C.ID, C.IMAGE_EMBEDDING, C.TEXT_EMBEDDING]
    )
    step = Score(ScoreConfig(media="image"))
    assert step.output_schema(batch.schema).field(C.CLIP_SCORE).type == pa.float32()
    result = step.process(batch)
    result.check(6, step.name)
    assert result.batch.column(C.ID).to_pylist() == ["a", "e"]
    assert np.allclose(result.batch.column(C.CLIP_SCORE).to_numpy(), [1.0, 0.8])
    reasons = dict(
        zip(
            result.rejects.column(C.ID).to_pylist(),
            result.rejects.column(C.REJECT_REASON).to_pylist(),
            strict=True,
        )
    )
    assert reasons == {
        "b": "no_embedding",
        "c": "bad_embedding",
        "d": "bad_embedding",
        "f": "no_embedding",
    }


def test_refuses_embeddings_of_different_sizes():
    schema = pa.schema(
        [
            (C.ID, pa.string()),
            (C.IMAGE_EMBEDDING, C.embedding_type(512)),
            (C.TEXT_EMBEDDING, C.embedding_type(768)),
        ]
    )
    with pytest.raises(DataContractError, match="512 dimensions but text_embedding has 768"):
        Score(ScoreConfig(media="image")).output_schema(schema)


def test_audio_text_score_on_the_fly(root):
    clap = tiny_clap(root / "clap")
    pq.write_table(audio_table(), root / "audio.parquet")
    mmtools("score", root / "audio.parquet", "--audio-model", clap, "-o", root / "audio", "-q")
    table = read_dataset(root / "audio")
    audio, text = vectors_by_id(table, C.AUDIO_EMBEDDING), vectors_by_id(table, C.TEXT_EMBEDDING)
    scores = dict(
        zip(table.column(C.ID).to_pylist(), matrix_score(table, C.AUDIO_TEXT_SCORE), strict=True)
    )
    for key, value in scores.items():
        cosine = audio[key] @ text[key] / np.linalg.norm(audio[key]) / np.linalg.norm(text[key])
        assert value == pytest.approx(cosine, abs=1e-3)
    assert reject_reasons(root / "audio") == {"r006": "not_audio", "r007": "zero_byte"}
    assert C.column_info(table.schema)[C.AUDIO_TEXT_SCORE]["model"] == str(clap)


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a matched pair outscores a shuffled one (ties count half)."""
    diff = positive[:, None] - negative[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def _has_shapes_model() -> bool:
    import importlib.util

    return importlib.util.find_spec("mmtools.models.shapes") is not None


@pytest.mark.skipif(not _has_shapes_model(), reason="mmtools.models.shapes is not in this checkout")
def test_shipped_model_scores_matched_pairs_above_shuffled(tmp_path):
    from mmtools.demo import synth

    samples = list(synth.generate(60, seed=777))
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i, sample in enumerate(samples):
        sample.image.save(folder / f"m{i:03d}.png")
        (folder / f"m{i:03d}.txt").write_text(sample.caption)
        sample.image.save(folder / f"s{i:03d}.png")
        (folder / f"s{i:03d}.txt").write_text(samples[(i + 7) % len(samples)].caption)
    stream = mmtools("ingest", folder, "-q", "-o", "-").stdout
    mmtools("score", "--model", "mmtools-shapes", "-o", tmp_path / "scored", "-q", input=stream)
    table = read_dataset(tmp_path / "scored")
    scores = dict(zip(table.column(C.ID).to_pylist(), matrix_score(table), strict=True))
    matched = np.array([v for k, v in scores.items() if k.startswith("m")])
    shuffled = np.array([v for k, v in scores.items() if k.startswith("s")])
    assert len(matched) == len(shuffled) == 60
    assert _auc(matched, shuffled) >= 0.9
    info = C.column_info(table.schema)[C.CLIP_SCORE]
    assert (info["model"], info["pretrained"]) == ("mmtools-shapes", "bundled")
