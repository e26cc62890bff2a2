"""Output cleaning: turn what a model said into one caption line, or an empty string."""

from __future__ import annotations

import re

# "Caption:", "Rewritten caption -", "Sure! Here is a rewritten caption:" and the like.
_PREFIX = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly|of course)[!,.]?\s*)?"
    r"(?:(?:here(?:'s| is)|this is)\s+(?:an?|the|my|your)?\s*)?"
    r"(?:(?:new|improved|rewritten|revised|synthetic|fused|merged|short|detailed|final|image)\s+)*"
    r"(?:caption|description|rewrite|answer|output|text)(?:\s+[\w']+){0,4}?\s*(?::|\s[-–—]\s)\s*",
    re.IGNORECASE,
)
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.IGNORECASE | re.DOTALL)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "`": "`", "„": "“"}
_SPACE = re.compile(r"\s+")


def _unquote(text: str) -> str:
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _first_paragraph(text: str) -> str:
    for part in re.split(r"\n\s*\n", text):
        if part.strip():
            return part.strip()
    return ""


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    # Prefer to end on a sentence, then on a word, so a caption never ends mid-word.
    stop = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
    if stop >= max_chars // 2:
        return cut[: stop + 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else cut).rstrip(" ,;:-")


def clean_caption(text: str | None, max_chars: int = 300) -> str:
    """Strip reasoning, chatter prefixes, quotes, markdown and extra lines; cap the length."""
    if not text:
        return ""
    text = _THINK.sub("", text).strip()
    text = _first_paragraph(text.replace("**", "").replace("__", ""))
    for _ in range(3):  # prefixes and quotes nest: 'Caption: "Here is ..."'
        before = text
        text = _unquote(_PREFIX.sub("", text, count=1).strip())
        if text == before:
            break
    text = _SPACE.sub(" ", text).strip()
    if text.startswith(("- ", "* ")):
        text = text[2:]
    return _truncate(text, max_chars) if max_chars > 0 else text
