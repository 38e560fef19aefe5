"""Which weights a training run keeps: a rule shared by the classifier and the detector loops.

`select="last"` keeps the last epoch of the fixed schedule; `select="best"` keeps the epoch with the best
validation score. With `ema` (the default from pretrained weights) the weights scored and saved are an
exponential moving average of the trained weights (BatchNorm statistics included), updated after every optimiser
step with a time constant of `ema_epochs` epochs. The default rule is the one measured to hold up on held-out
patients (docs/results.md, "Model selection").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cbir.models.checkpoint import save_checkpoint

if TYPE_CHECKING:
    from cbir.models.detection import CbirDetector
    from cbir.models.factory import CbirNet

SELECT_RULES = ("best", "last")

#: Called after every epoch's validation with (epoch, raw model, EMA model or None); used by `cbir study`.
EpochHook = Callable[[int, nn.Module, nn.Module | None], None]


class Keeper:
    """Tracks the weights to keep and writes them to the checkpoint directory when the rule says so."""

    def __init__(self, model: nn.Module, rule: str, ema: bool, ema_epochs: float, steps_per_epoch: int,
                 out: Path, keep_state: bool = False) -> None:
        if rule not in SELECT_RULES:
            raise ValueError(f"unknown selection rule {rule!r} (choose from {', '.join(SELECT_RULES)})")
        self.model, self.rule, self.out, self.keep_state = model, rule, out, keep_state
        self.average: AveragedModel | None = None
        if ema:
            decay = 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)
            self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.best_score = -math.inf
        self.best_epoch = 0
        self.fingerprint = ""
        #: With `keep_state`: a copy of the weights last saved (what `cbir.train.loop` averages across runs).
        self.state: dict[str, torch.Tensor] = {}

    @property
    def kept(self) -> nn.Module:
        """The weights that are scored on validation and saved: the EMA copy, or the trained model itself."""
        return self.average.module if self.average is not None else self.model

    @property
    def ema_model(self) -> nn.Module | None:
        return self.average.module if self.average is not None else None

    @torch.no_grad()
    def step(self) -> None:
        """After each optimiser step."""
        if self.average is not None:
            self.average.update_parameters(self.model)

    def consider(self, epoch: int, score: float) -> bool:
        """Record the epoch's validation score; save the kept weights if the rule picks this epoch."""
        chosen = self.rule == "last" or score > self.best_score
        if score > self.best_score:
            self.best_score = score
        if chosen:
            self.best_epoch = epoch
            self.fingerprint = save_checkpoint(cast("CbirNet | CbirDetector", self.kept), self.out)
            if self.keep_state:
                self.state = {k: v.detach().clone() for k, v in self.kept.state_dict().items()}
        return chosen
