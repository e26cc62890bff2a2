"""Train `mmtools-shapes` on freshly generated `mmtools.demo.synth` pairs and evaluate it.

The shipped weights are built in two stages: plain scenes first, then the randomised
`synth.TRAIN` domain (image sides, shape radii, textures, noise, phrasings), starting from
the first stage's weights:

    python -m mmtools.demo.train --domain plain --steps 600 --seed 0 --out /tmp/stage1
    python -m mmtools.demo.train --init /tmp/stage1/mmtools-shapes.safetensors --steps 150 --seed 1

A training record (`mmtools-shapes.train.json`) beside the weights lists every generator seed
used, so demos and tests draw their data elsewhere.

Progress goes to stderr; the held-out metrics go to stdout as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmtools.demo import synth
from mmtools.models import shapes as shapes_model

log = logging.getLogger("mmtools.demo.train")

BATCH_SIZE = 128
LR = 1e-3
WEIGHT_DECAY = 0.1
WARMUP_STEPS = 50
EVAL_PAIRS = 1000
EVAL_SEED_OFFSET = 1_000_000  # held-out pairs come from a stream training never draws from
VARIANT_SEED_OFFSET = 3_000_000  # and pairs of the held-out generator variant from another
DOMAINS = {"plain": synth.PLAIN, "train": synth.TRAIN}


def main(argv: list[str] | None = None) -> None:
    """Train, save the fp16 weights, reload them and report held-out metrics."""
    parser = argparse.ArgumentParser(prog="python -m mmtools.demo.train")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps")
    parser.add_argument("--out", type=Path, default=shapes_model.weights_path().parent)
    parser.add_argument("--seed", type=int, default=1, help="seeds the data and the init")
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="train", help="scenes")
    parser.add_argument("--init", type=Path, help="start from these weights (safetensors)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)

    import torch

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    model, preprocess, tokenizer = build()
    init = {}
    if args.init:
        load(model, args.init)
        record = args.init.with_name(shapes_model.record_path().name)
        init = json.loads(record.read_text()) if record.exists() else {"weights": str(args.init)}
    domain = DOMAINS[args.domain]
    start = time.monotonic()
    train(model, batches(preprocess, tokenizer, args.steps, args.seed, domain), args.steps)
    log.info("trained %d steps in %.0f s", args.steps, time.monotonic() - start)

    path = args.out / shapes_model.weights_path().name
    save(model, path)
    load(model, path)  # evaluate exactly what was written, fp16 rounding included
    metrics = evaluate(
        model, preprocess, tokenizer, EVAL_PAIRS, args.seed + EVAL_SEED_OFFSET, domain
    )
    variant = evaluate(
        model, preprocess, tokenizer, EVAL_PAIRS, args.seed + VARIANT_SEED_OFFSET, synth.HELD_OUT
    )
    metrics["variant_auc_matched_vs_shuffled"] = variant["auc_matched_vs_shuffled"]
    for name, value in metrics.items():
        log.info("%-32s %.4f", name, value)
    record = training_record(args.steps, args.seed, args.domain, metrics, init)
    (args.out / shapes_model.record_path().name).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"steps": args.steps, "seed": args.seed, **metrics}))


def training_record(
    steps: int, seed: int, domain: str, metrics: dict[str, float], init: dict[str, Any]
) -> dict[str, Any]:
    """What the weights were trained and evaluated on, so that no demo or test draws its
    "unseen" data from the same generator stream."""
    eval_seed, variant_seed = seed + EVAL_SEED_OFFSET, seed + VARIANT_SEED_OFFSET
    gen = "mmtools.demo.synth.generate"
    return {
        "model": shapes_model.MODEL_NAME,
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "train": {"generator": gen, "domain": domain, "seed": seed, "pairs": steps * BATCH_SIZE},
        "eval": {"generator": gen, "domain": domain, "seed": eval_seed, "pairs": EVAL_PAIRS},
        "variant": {
            "generator": gen,
            "domain": "HELD_OUT",
            "seed": variant_seed,
            "pairs": EVAL_PAIRS,
        },
        "init": init,
        "seeds": sorted({seed, eval_seed, variant_seed, *init.get("seeds", [])}),
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
    }


def build() -> tuple[Any, Any, Any]:
    """A randomly initialised `mmtools-shapes`: (model, eval preprocess, tokenizer)."""
    import open_clip

    shapes_model.register()
    model, _, preprocess = open_clip.create_model_and_transforms(
        shapes_model.MODEL_NAME, load_weights=False
    )
    return model, preprocess, open_clip.get_tokenizer(shapes_model.MODEL_NAME)


def batches(
    preprocess: Any, tokenizer: Any, steps: int, seed: int, domain: Any
) -> Iterator[tuple[Any, Any]]:
    """Yield `steps` (images, tokens) batches drawn from one seeded synth stream."""
    import torch

    stream = synth.generate(steps * BATCH_SIZE, seed, domain=domain)
    for _ in range(steps):
        samples = [next(stream) for _ in range(BATCH_SIZE)]
        images = torch.stack([preprocess(s.image) for s in samples])
        yield images, tokenizer([s.caption for s in samples])


def train(model: Any, data: Iterator[tuple[Any, Any]], steps: int) -> None:
    """AdamW on the symmetric InfoNCE loss, linear warm-up then cosine decay."""
    import torch
    from open_clip.loss import ClipLoss

    # As in open_clip: no weight decay on gains, biases, embeddings' scale and logit_scale.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0}],
        lr=LR,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _lr_factor(step, steps))
    loss_fn = ClipLoss()
    model.train()
    start = time.monotonic()
    for step, (images, tokens) in enumerate(data, 1):
        image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0 or step == steps:
            elapsed = time.monotonic() - start
            log.info("step %4d/%d  loss %.4f  %.0f s", step, steps, loss.item(), elapsed)
    model.eval()


def _lr_factor(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return 0.5 * (1 + math.cos(math.pi * progress))


def save(model: Any, path: Path) -> None:
    """Write the weights as fp16 safetensors, via a temporary file and a rename."""
    from safetensors.torch import save_file

    state = {
        k: (v.half() if v.is_floating_point() else v).detach().contiguous()
        for k, v in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"model": shapes_model.MODEL_NAME})
    tmp.replace(path)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)


def load(model: Any, path: Path) -> None:
    """Load weights written by `save` into `model`, back in its own dtype."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))


def embed(model: Any, preprocess: Any, tokenizer: Any, samples: list[Any]) -> tuple[Any, Any]:
    """L2-normalised image and text embeddings of `samples`, as numpy arrays."""
    import torch

    with torch.no_grad():
        images = torch.stack([preprocess(s.image) for s in samples])
        image_emb = model.encode_image(images, normalize=True)
        text_emb = model.encode_text(tokenizer([s.caption for s in samples]), normalize=True)
    return image_emb.numpy(), text_emb.numpy()


def evaluate(
    model: Any, preprocess: Any, tokenizer: Any, n: int, seed: int, domain: Any = None
) -> dict[str, float]:
    """Held-out ROC AUC (matched vs shuffled captions) and zero-shot recall@1 both ways, on
    pairs of the training domain (or of `domain`) from a seed training never used."""
    import numpy as np

    samples = list(synth.generate(n, seed, domain=domain or synth.TRAIN))
    image_emb, text_emb = embed(model, preprocess, tokenizer, samples)
    sims = image_emb @ text_emb.T
    matched = np.diag(sims)
    # Samples are i.i.d., so the next sample's caption is a random mismatched one.
    shuffled = sims[np.arange(n), np.roll(np.arange(n), -1)]
    keys = [_scene_key(s.attrs) for s in samples]
    scene = np.array([keys.index(k) for k in keys])  # one id per distinct scene description
    i2t, t2i = sims.argmax(axis=1), sims.argmax(axis=0)
    return {
        "auc_matched_vs_shuffled": roc_auc(matched, shuffled),
        "best_threshold": best_threshold(matched, shuffled),
        "recall@1_image_to_text": float(np.mean(i2t == np.arange(n))),
        "recall@1_text_to_image": float(np.mean(t2i == np.arange(n))),
        # Distinct scenes share captions, so also count a hit on an identical scene description.
        "recall@1_i2t_same_scene": float(np.mean(scene[i2t] == scene)),
        "recall@1_t2i_same_scene": float(np.mean(scene[t2i] == scene)),
    }


def _scene_key(attrs: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(attrs[k] for k in ("count", "size", "colour", "shape", "background", "position"))


def roc_auc(positive: Any, negative: Any) -> float:
    """ROC AUC of `positive` over `negative` scores by the Mann–Whitney U rank formula."""
    import numpy as np

    scores = np.concatenate([positive, negative])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # ties share their mean rank
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def best_threshold(positive: Any, negative: Any) -> float:
    """The score cut that best separates `positive` from `negative` (max TPR − FPR)."""
    import numpy as np

    cuts = np.sort(np.concatenate([positive, negative]))
    tpr = 1 - np.searchsorted(np.sort(positive), cuts, side="left") / len(positive)
    fpr = 1 - np.searchsorted(np.sort(negative), cuts, side="left") / len(negative)
    return float(cuts[np.argmax(tpr - fpr)])


if __name__ == "__main__":
    main()
