"""`--device`: auto, cpu or cuda → a torch device (shared by training and the query path)."""

from __future__ import annotations

import torch

from cbir.errors import CbirError


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
