"""`mmtools rewrite --backend transformers` with tiny random-init models built from configs.

Random weights say nothing sensible: these tests check the plumbing (columns filled, greedy
decoding deterministic, batches of prompts of different lengths) and the OpenAI backend
against a server that answers with a real (tiny) model.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, mmtools, read_dataset
from llm_server import LLMServer

from mmtools import columns as C

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained offline on a few captions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        [
            "a photo of a cat on a mat",
            "a dog in the park at sunset",
            "rewrite this caption",
            "describe the image",
        ],
        trainer,
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT
    return fast


def llama_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny causal LM and a tiny LLaVA, saved with save_pretrained."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    LlamaForCausalLM(llama_config(len(tok))).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=llama_config(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    LlavaForConditionalGeneration(config).save_pretrained(root / "vlm")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=8,
        chat_template=CHAT,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(root / "vlm")
    return root


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """12 rows with alt-texts of different lengths and images."""
    path = tmp_path_factory.mktemp("rows") / "in.parquet"
    texts = [("a cat " * (1 + i % 5)).strip() for i in range(12)]
    images = [image_bytes(i, size=(40 + 8 * i, 32)) for i in range(12)]
    pq.write_table(
        pa.table(
            {
                C.ID: [f"r{i:02d}" for i in range(12)],
                C.TEXT: texts,
                C.IMAGE: C.media_array(images, [None] * 12),
            }
        ),
        path,
    )
    return path


def generate(out, rows, model, *args) -> pa.Table:
    mmtools(
        "rewrite",
        rows,
        "--backend",
        "transformers",
        "--model",
        model,
        "--max-tokens",
        8,
        "--device",
        "cpu",
        "-o",
        out,
        "-q",
        *args,
        env=THREADS,
    )
    return read_dataset(out)


def accounted(out, table: pa.Table) -> None:
    """Every row is out with a non-empty caption, or rejected as an empty caption."""
    rejects = list((out / "_rejects").glob("*.parquet"))
    rejected = pq.read_table(rejects[0]) if rejects else None
    assert table.num_rows + (rejected.num_rows if rejected else 0) == 12
    if rejected:
        assert set(rejected[C.REJECT_REASON].to_pylist()) == {"empty_caption"}
    assert all(s.strip() for s in table[C.TEXT_SYNTHETIC].to_pylist())


def in_process(rows, model, **options) -> list[str]:
    """Captions from the same step run in this process, one batch of all rows."""
    import torch

    from mmtools.steps.rewrite.step import Rewrite, RewriteConfig

    torch.set_num_threads(1)
    step = Rewrite(
        RewriteConfig(
            backend="transformers", model=str(model), device="cpu", max_tokens=8, **options
        )
    )
    step.setup()
    try:
        result = step.process(pq.read_table(rows).to_batches()[0])
    finally:
        step.close()
    return result.batch[C.TEXT_SYNTHETIC].to_pylist()


def test_local_llm_rewrites_deterministically_whatever_the_batching(tmp_path, models, rows):
    t = generate(tmp_path / "out", rows, models / "llm", "--gen-batch-size", 5)
    accounted(tmp_path / "out", t)
    assert t.num_rows >= 6
    assert set(t[C.CAPTION_SOURCE].to_pylist()) == {f"rewrite:transformers:{models / 'llm'}"}
    # Greedy decoding with left padding: one prompt at a time gives the same captions as
    # padded batches of five prompts of different lengths.
    assert in_process(rows, models / "llm", gen_batch_size=1) == t[C.TEXT_SYNTHETIC].to_pylist()


def test_local_vlm_captions_images(tmp_path, models, rows):
    t = generate(tmp_path / "out", rows, models / "vlm", "--mode", "caption", "--gen-batch-size", 4)
    accounted(tmp_path / "out", t)
    assert t.num_rows >= 6
    assert set(t[C.CAPTION_SOURCE].to_pylist()) == {f"caption:transformers:{models / 'vlm'}"}


def test_model_that_cannot_load_is_one_clear_error(tmp_path, rows):
    from mmtools.errors import UsageError

    with pytest.raises(UsageError, match="cannot load the causal language model") as e:
        in_process(rows, tmp_path / "nope")
    assert "pass a local directory" in str(e.value) and "\n" not in str(e.value)


def test_openai_backend_against_a_server_running_a_tiny_model(tmp_path, models, rows):
    with LLMServer(model_dir=str(models / "llm")) as server:
        mmtools(
            "rewrite",
            rows,
            "--base-url",
            server.url,
            "--model",
            "tiny-llama",
            "--concurrency",
            4,
            "-o",
            tmp_path / "out",
            "-q",
        )
        assert server.requests == 12
    t = read_dataset(tmp_path / "out")
    accounted(tmp_path / "out", t)
    assert set(t[C.CAPTION_SOURCE].to_pylist()) == {"rewrite:openai:tiny-llama"}
