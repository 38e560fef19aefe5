"""`--device`: auto, cpu or cuda → a torch device (shared by training and the query path), and how a model sits
on it: `place` (memory order) and `inference_batch` (images per forward pass without gradients)."""

from __future__ import annotations

import torch
from torch import nn

from cbir.errors import CbirError

#: Images per no-gradient forward pass on a CPU: small batches stay in cache. On this project's 2-core CPU an
#: EfficientNet-Lite0 at 224 px embeds about 90 images a second in batches of 16, against about 60 in batches of
#: 64 or 128 (`cbir bench`, "Memory order and batch").
CPU_INFERENCE_BATCH = 16
GPU_INFERENCE_BATCH = 128


def resolve_device(name: str) -> torch.device:
    """"auto" → cuda when available, else cpu; a named device must exist (one-line CbirError otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CbirError(f"unknown device {name!r} (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CbirError("--device cuda was asked for but no CUDA GPU is available")
    return device


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move `model` to `device`; on a CPU, its convolution weights in channels-last order: the same outputs (to
    float rounding) at about 1.8 times the images a second, training and embedding (`cbir bench`). On a GPU they
    stay contiguous (not measured there). Saved weights are written contiguous
    (`cbir.models.checkpoint.save_checkpoint`), so files and fingerprints do not depend on it."""
    device = torch.device(device)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


def inference_batch(device: torch.device | str) -> int:
    """How many images one no-gradient forward pass takes on `device`."""
    return GPU_INFERENCE_BATCH if torch.device(device).type == "cuda" else CPU_INFERENCE_BATCH
