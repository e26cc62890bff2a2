"""Device and precision choice for every model mmtools runs (open_clip, CLAP, captioners),
and the CPUs a process may use."""

from __future__ import annotations

import contextlib
import os

from mmtools.errors import UsageError

PRECISIONS = ("fp32", "fp16", "bf16")


def cpus() -> int:
    """The CPUs this process may run on (its affinity, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def resolve_device(spec: str = "auto"):
    """A torch device from auto, cpu, cuda, cuda:N or mps."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but no CUDA device is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps, but MPS is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {spec!r}")
    return device


def check_precision(precision: str, device) -> None:
    """Refuse precisions the device cannot run."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 is not supported on CPU; use bf16 or fp32")


def autocast(device, precision: str):
    """Mixed precision for the forward pass: bf16 on CPU, fp16/bf16 on GPU."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def torch_dtype(precision: str):
    """The torch dtype that holds weights at `precision` (fp32, fp16 or bf16)."""
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
