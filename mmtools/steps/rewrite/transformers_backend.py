"""Captions from a local Hugging Face model: a causal LM for text, an image-text-to-text VLM
(LLaVA, Qwen2-VL, SmolVLM, ...) for captioning; batched, greedy by default."""

from __future__ import annotations

from dataclasses import dataclass

from mmtools.errors import UsageError, require_module
from mmtools.media import MediaError
from mmtools.models.device import resolve_device, torch_dtype
from mmtools.steps.rewrite.backends import InProcessBackend
from mmtools.steps.rewrite.prompts import Outcome, Request, chat_messages, open_image


@dataclass
class TransformersOptions:
    """Which model, where, and how to generate."""

    model: str = ""
    vision: bool = False
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 8
    max_tokens: int = 64
    temperature: float = 0.0
    max_image_side: int = 768


class TransformersBackend(InProcessBackend):
    """Generate with a local model; one `generate` call per `batch_size` rows."""

    def __init__(self, options: TransformersOptions):
        self.o = options

    def load(self) -> None:
        """Load the model and its tokenizer or processor."""
        transformers = require_module("transformers", "rewrite")
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        dtype = torch_dtype(self.o.precision)
        self.device = resolve_device(self.o.device)
        auto = AutoModelForImageTextToText if self.o.vision else AutoModelForCausalLM
        try:
            self.processor = self._processor()
            self.model = auto.from_pretrained(self.o.model, dtype=dtype)
        except (OSError, ValueError) as e:
            kind = "vision-language" if self.o.vision else "causal language"
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"cannot load the {kind} model {self.o.model!r}: {first}; pass a local "
                "directory (save_pretrained) with --model, or check the network"
            ) from None
        self.model.to(self.device).eval()
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"  # decoder-only models continue on the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def close(self) -> None:
        """Drop the model."""
        self.model = self.processor = None

    def _processor(self):
        from transformers import AutoProcessor, AutoTokenizer

        if self.o.vision:
            return AutoProcessor.from_pretrained(self.o.model)
        return AutoTokenizer.from_pretrained(self.o.model)

    def generate(self, requests: list[Request], on_done) -> list[Outcome]:
        """Caption `requests` in chunks of `batch_size`."""
        outcomes: list[Outcome] = [Outcome() for _ in requests]
        images: dict[int, object] = {}
        ready = []
        for i, req in enumerate(requests):
            if req.image is None:
                ready.append(i)
                continue
            try:
                images[i] = open_image(req.image, self.o.max_image_side)
                ready.append(i)
            except MediaError as e:
                outcomes[i] = Outcome(error=e.detail, reason=e.reason)
        for start in range(0, len(ready), self.o.batch_size):
            chunk = ready[start : start + self.o.batch_size]
            texts = self._run([requests[i] for i in chunk], [images.get(i) for i in chunk])
            for i, text in zip(chunk, texts, strict=True):
                on_done(i, text)
                outcomes[i] = Outcome(text=text)
        return outcomes

    def _prompt(self, req: Request) -> str:
        with_image = req.image is not None
        messages = chat_messages(req, {"type": "image"} if with_image else None)
        owner = self.processor
        if getattr(owner, "chat_template", None):
            return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # No chat template: plain text turns (and the processor's image token, if any).
        turns = [
            f"{m['role']}: {m['content'] if isinstance(m['content'], str) else req.prompt}"
            for m in messages
        ]
        image_token = getattr(owner, "image_token", "") if with_image else ""
        return image_token + "\n".join(turns) + "\nassistant:"

    def _run(self, reqs: list[Request], images: list) -> list[str]:
        import torch

        prompts = [self._prompt(r) for r in reqs]
        if self.o.vision:
            enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        else:
            enc = self.processor(
                prompts, return_tensors="pt", padding=True, add_special_tokens=False
            )
        enc = enc.to(self.device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        sample = self.o.temperature > 0
        kwargs = {"do_sample": sample, "max_new_tokens": self.o.max_tokens}
        if sample:
            kwargs["temperature"] = self.o.temperature
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        if not getattr(self.model.config, "is_encoder_decoder", False):
            out = out[:, enc["input_ids"].shape[1] :]
        return self.processor.batch_decode(out, skip_special_tokens=True)
