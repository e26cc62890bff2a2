"""Caption cleaning, prompt files, few-shot examples, Retry-After and the per-row cache."""

from __future__ import annotations

import email.utils
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmtools.errors import UsageError
from mmtools.steps.rewrite.cache import CaptionCache, cache_key
from mmtools.steps.rewrite.clean import clean_caption
from mmtools.steps.rewrite.openai_backend import retry_after_seconds
from mmtools.steps.rewrite.prompts import (
    PROMPT_DIR,
    Request,
    chat_messages,
    example_turns,
    load_examples,
    load_prompt,
    placeholders,
    render,
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ('Caption: "A dog on a beach."', "A dog on a beach."),
        ("Sure! Here is a rewritten caption: 'a red car'\n\nI kept the colour.", "a red car"),
        ("<think>The user wants...</think>\n**Caption:** A cat", "A cat"),
        ("Here's the caption for the image: a bird on a wire", "a bird on a wire"),
        ("“A quiet street at night”", "A quiet street at night"),
        ("Description of a well-known painting", "Description of a well-known painting"),
        ("Image description - two kids   playing\nfootball", "two kids playing football"),
        ('""', ""),
        ("  \n ", ""),
        (None, ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_clean_caption_cuts_at_a_word_or_sentence_boundary():
    assert clean_caption("one two three four five six", max_chars=15) == "one two three"
    long = "A dog runs on the beach. It is sunny and the waves are high today."
    assert clean_caption(long, max_chars=40) == "A dog runs on the beach."
    assert clean_caption(long, max_chars=0) == long


@given(st.text(max_size=400), st.integers(min_value=1, max_value=200))
def test_clean_caption_is_one_trimmed_line_within_the_limit(raw, limit):
    out = clean_caption(raw, max_chars=limit)
    assert len(out) <= limit
    assert out == out.strip() and "\n" not in out


def test_shipped_prompts_use_the_placeholders_their_modes_need():
    assert placeholders(load_prompt("rewrite")) == ["text"]
    assert placeholders(load_prompt("caption")) == []
    assert placeholders(load_prompt("caption_hint")) == ["text"]
    assert placeholders(load_prompt("fuse")) == ["text", "description"]
    with pytest.raises(UsageError, match="caption_hint"):
        load_prompt("nope")


def test_render_fills_columns_and_keeps_escaped_braces():
    template = "Rewrite {text} ({width}x{height}) as {{json}}"
    assert placeholders(template) == ["text", "width", "height"]
    assert render(template, {"text": "a cat", "width": "4", "height": "3"}) == (
        "Rewrite a cat (4x3) as {json}"
    )


def test_examples_files_become_chat_turns(tmp_path):
    examples = load_examples(str(PROMPT_DIR / "rewrite_examples.txt"))
    assert len(examples) == 4 and examples[0]["text"] == "white cat sleeping on a red sofa"
    jsonl = tmp_path / "ex.jsonl"
    jsonl.write_text('{"text": "a", "description": "b", "output": "a and b"}\n')
    turns = example_turns("Alt: {text} / {description}", load_examples(str(jsonl)))
    assert turns == [("Alt: a / b", "a and b")]
    req = Request("id", "Alt: x / y", turns)
    assert [m["role"] for m in chat_messages(req)] == ["user", "assistant", "user"]
    image = chat_messages(req, {"type": "image"})[-1]["content"]
    assert image == [{"type": "image"}, {"type": "text", "text": "Alt: x / y"}]
    bad = tmp_path / "bad.txt"
    bad.write_text("no arrow here\n")
    with pytest.raises(UsageError, match=r"bad.txt:1: expected 'alt-text => caption'"):
        load_examples(str(bad))


def test_retry_after_in_seconds_or_as_an_http_date():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("100000") == 300.0  # capped
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    date = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 17 <= retry_after_seconds(date) <= 20


def test_cache_keeps_rows_across_connections(tmp_path):
    path = str(tmp_path / "c" / "rewrite.sqlite")
    key = cache_key(backend="openai", model="m", prompt="a cat")
    assert key != cache_key(backend="openai", model="m2", prompt="a cat")
    cache = CaptionCache(path)
    cache.put(key, "A cat.")
    cache.close()
    again = CaptionCache(path)
    assert again.get_many([key, "missing"]) == {key: "A cat."}
    assert len(again) == 1
    many = [cache_key(i=i) for i in range(1200)]  # more than one SQL query's worth
    for k in many:
        again.put(k, "x")
    assert len(again.get_many(many)) == 1200
