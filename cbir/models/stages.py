"""Mid-level features for the out-of-domain warning (`cbir.models.domain`): the global average of the backbone's
last `STAGES` feature stages (timm's `feature_info`), each L2-normalised, joined.

Chosen on RSNA fold 1 (docs/results.md, "Out-of-domain warning"): at the same in-domain rate these stages flag
most paediatric films against an adult archive, where the pooled features of the fine-tuned head flag about
a fifth; the head's features learn the task and forget what else differs. A backbone without `feature_info`
(a frozen encoder) gives its pooled features instead.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: How many of the deepest feature stages are tapped.
STAGES = 2


def stage_names(backbone: nn.Module, stages: int = STAGES) -> list[str]:
    """The module names of `backbone`'s last `stages` feature stages; [] without timm's `feature_info`."""
    info: Any = getattr(backbone, "feature_info", None)
    if not isinstance(info, list) or len(info) < stages:
        return []
    names = [str(entry.get("module", "")) for entry in info[-stages:] if isinstance(entry, dict)]
    modules = dict(backbone.named_modules())
    return names if len(names) == stages and all(name in modules for name in names) else []


def _average(output: Any) -> torch.Tensor | None:
    """The global average of a stage's output: (B, C, H, W) over H, W; (B, N, C) tokens over N."""
    if isinstance(output, (tuple, list)):
        output = output[0] if output else None
    if not isinstance(output, torch.Tensor):
        return None
    if output.ndim == 4:
        return output.float().mean(dim=(2, 3))
    if output.ndim == 3:
        return output.float().mean(dim=1)
    return None


class StageTap:
    """Forward hooks that keep the averages of the named stages of the last forward pass in eval mode (nothing in
    training mode), per thread (concurrent queries on one model do not mix)."""

    def __init__(self, backbone: nn.Module, names: list[str]) -> None:
        self.names = list(names)
        self._local = threading.local()
        modules = dict(backbone.named_modules())
        for name in self.names:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            store = getattr(self._local, "store", None)
            if store is None:
                store = self._local.store = {}
            store[name] = None if module.training else _average(output)
        return keep

    def features(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """(B, p) the joined unit stage averages of this thread's last forward pass, or the unit `pooled` features
        for a backbone without stages; None when a tapped stage did not run in eval mode (training)."""
        if not self.names:
            return F.normalize(pooled.float(), dim=1)
        store = getattr(self._local, "store", None) or {}
        self._local.store = {}
        parts = [store.get(name) for name in self.names]
        if any(part is None or len(part) != len(pooled) for part in parts):
            return None
        return torch.cat([F.normalize(part, dim=1) for part in parts if part is not None], dim=1)

    @property
    def describe(self) -> str:
        """What the features are, as stored with a domain model: "stages:NAME,NAME" or "pooled"."""
        return "stages:" + ",".join(self.names) if self.names else "pooled"
