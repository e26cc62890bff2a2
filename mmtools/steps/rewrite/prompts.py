"""Prompt files with `{column}` placeholders, few-shot examples, and the request a backend gets."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mmtools.errors import UsageError

MODES = ("rewrite", "caption", "fuse")
DESCRIPTION = "description"  # the placeholder for --description-column in fuse mode
# The prompts shipped in the repository, found by name (`--prompt caption_hint`).
PROMPT_DIR = Path(__file__).resolve().parent / "prompt_files"  # linked as recipes/prompts
_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class Request:
    """One row to caption: the rendered prompt, few-shot turns, and the raw inputs."""

    row_id: str
    prompt: str
    examples: list[tuple[str, str]] = field(default_factory=list)
    text: str | None = None
    description: str | None = None
    image: bytes | None = None  # encoded image bytes in caption mode, decoded by the backend
    image_key: str = ""  # hash of the image bytes, for the cache


@dataclass
class Outcome:
    """What a backend made of one request: a caption, or the last error after retries."""

    text: str | None = None
    error: str = ""
    connection: bool = False  # failed because the backend could not be reached
    reason: str = "generation_failed"


def open_image(data: bytes, max_side: int = 0):
    """Decode image bytes to an upright RGB PIL image no larger than `max_side`."""
    from mmtools.media import decode_image

    image = decode_image(data)
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    return image


def load_prompt(spec: str) -> str:
    """Prompt text from a file path, or by name from the prompts shipped in recipes/prompts."""
    path = Path(spec)
    if not path.is_file():
        path = PROMPT_DIR / f"{spec}.txt"
    if not path.is_file():
        names = sorted(p.stem for p in PROMPT_DIR.glob("*.txt")) if PROMPT_DIR.is_dir() else []
        raise UsageError(
            f"prompt {spec!r} is neither a file nor a shipped prompt"
            + (f" ({', '.join(names)})" if names else "")
            + "; pass --prompt FILE"
        )
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise UsageError(f"prompt file {path} is empty")
    return text


def placeholders(template: str) -> list[str]:
    """Names used as `{name}` in `template`, in order of first use."""
    names = [m.group(1) for m in _FIELD.finditer(template) if m.group(1)]
    return list(dict.fromkeys(names))


def render(template: str, values: dict[str, str]) -> str:
    """Fill `{name}` placeholders; `{{` and `}}` are literal braces."""

    def sub(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]
        return values.get(m.group(1), "")

    return _FIELD.sub(sub, template)


def load_examples(path: str | None) -> list[dict[str, str]]:
    """Few-shot examples: `input => output` lines, or JSONL objects with an "output" key.

    A JSONL object's other keys fill the prompt's placeholders (e.g. "text", "description").
    """
    if not path:
        return []
    if not os.path.isfile(path):
        raise UsageError(f"examples file {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            examples.append(_example(line, path, n))
    return examples


def _example(line: str, path: str, n: int) -> dict[str, str]:
    if line.startswith("{"):
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(ex, dict) or not isinstance(ex.get("output"), str):
            raise UsageError(f'{path}:{n}: a JSON example needs an "output" string')
        return {k: str(v) for k, v in ex.items()}
    if "=>" not in line:
        raise UsageError(f"{path}:{n}: expected 'alt-text => caption' or a JSON object")
    text, output = (s.strip() for s in line.split("=>", 1))
    return {"text": text, "output": output}


def example_turns(template: str, examples: list[dict[str, str]]) -> list[tuple[str, str]]:
    """Examples as (user, assistant) chat turns rendered with the prompt."""
    return [(render(template, ex), ex["output"]) for ex in examples]


def chat_messages(req: Request, image_part: dict | None = None) -> list[dict]:
    """The request as chat messages: few-shot turns, then the prompt (with the image first)."""
    messages = []
    for user, assistant in req.examples:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if image_part is None:
        messages.append({"role": "user", "content": req.prompt})
    else:
        content = [image_part, {"type": "text", "text": req.prompt}]
        messages.append({"role": "user", "content": content})
    return messages
