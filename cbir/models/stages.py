"""Mid-level features for the out-of-domain warning (`cbir.models.domain`): the global average of the backbone's
last `STAGES` feature stages (timm's `feature_info`, from `forward_intermediates` in the same forward pass), each
L2-normalised, joined.

Chosen on RSNA fold 1 (docs/results.md, "Out-of-domain warning"): at the same in-domain rate these stages flag
about two thirds of paediatric films against an adult archive, where the pooled features before the embedding
head flag about a fifth; the head's features learn the task and lose what else differs. A backbone without
`forward_intermediates` and `feature_info` (a frozen encoder) gives its unit pooled features instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: How many of the deepest feature stages are averaged.
STAGES = 2


def stage_names(backbone: nn.Module, stages: int = STAGES) -> list[str]:
    """The module names of `backbone`'s last `stages` feature stages; [] for a backbone without timm's
    `feature_info` and `forward_intermediates`."""
    info: Any = getattr(backbone, "feature_info", None)
    if not callable(getattr(backbone, "forward_intermediates", None)) or not isinstance(info, list) \
            or len(info) < stages:
        return []
    names = [str(entry.get("module", "")) for entry in info[-stages:] if isinstance(entry, dict)]
    return names if len(names) == stages and all(names) else []


def describe(names: list[str]) -> str:
    """What the features are, as stored with a domain model: "stages:NAME,NAME" or "pooled"."""
    return "stages:" + ",".join(names) if names else "pooled"


def _average(stage: torch.Tensor) -> torch.Tensor:
    """A stage's global average: (B, C, H, W) over H, W; (B, N, C) tokens over N."""
    return stage.float().mean(dim=(2, 3)) if stage.ndim == 4 else stage.float().mean(dim=1)


def features_and_stages(backbone: Any, x: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backbone's unpooled feature map (exactly `forward_features`) and, for a backbone with `names`, the
    joined unit averages of those stages, from one forward pass; None without them."""
    if not names:
        return backbone.forward_features(x), None
    final, stages = backbone.forward_intermediates(x, indices=len(names))
    return final, torch.cat([F.normalize(_average(stage), dim=1) for stage in stages], dim=1)
