"""How much of a pretrained backbone trains, and how fast: frozen groups, layer-wise learning rates, frozen
BatchNorm.

The backbone's parameters fall into timm's coarse groups (`model.group_matcher(coarse=True)`: the stem, each stage,
the last convolutions), in input-to-output order, so the same settings mean the same thing for any timm model.

- `TrainSettings.unfreeze` = N trains the last N groups of the backbone (and the heads); the others keep their
  weights and run in inference mode. -1 trains all; 0 trains the heads alone (a frozen backbone).
- `TrainSettings.layer_decay` = d gives group g of G the learning rate lr·d^(G−g) (the heads get lr): the
  stem changes least. 1 is one rate for all.
- `TrainSettings.freeze_bn` keeps every BatchNorm of the backbone at its pretrained statistics.
- `TrainSettings.probe_epochs` = P trains the heads alone for the first P epochs (a linear probe on frozen
  features), then the last `unfreeze` groups join ("LP-FT", Kumar et al. 2022: a random head's first gradients
  distort the pretrained features, which costs most on other distributions).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from cbir.console import Reporter
    from cbir.train.settings import TrainSettings

#: What the transfer settings are for a backbone that starts from random weights: every layer trains at one rate.
ALL_LAYERS: dict[str, Any] = {"unfreeze": -1, "layer_decay": 1.0, "freeze_bn": False, "probe_epochs": 0}


def from_scratch(settings: TrainSettings, reporter: Reporter) -> TrainSettings:
    """`settings` for a randomly initialised backbone: nothing is worth freezing, so every layer trains at one
    rate, and one run is trained: runs from random weights part ways, and their mean is no model (a note says so
    when the settings said otherwise)."""
    changed = {k: v for k, v in ALL_LAYERS.items() if getattr(settings, k) != v}
    if changed:
        reporter.log("note: the backbone starts from random weights, so every layer trains at one rate "
                     f"({', '.join(f'{k} {v}' for k, v in changed.items())})")
    if settings.average_runs > 1:
        reporter.log(f"note: the backbone starts from random weights, so one run is trained, not "
                     f"{settings.average_runs} averaged (their weights would not share a basin)")
    return replace(settings, **ALL_LAYERS, average_runs=1)


def _is_timm(backbone: Any) -> bool:
    """A timm classification model (it has a coarse group matcher), as `CbirNet.backbone` is unless frozen."""
    return isinstance(backbone, nn.Module) and callable(getattr(backbone, "group_matcher", None))


def backbone_groups(backbone: nn.Module) -> list[list[str]]:
    """The backbone's parameter names in timm's coarse groups, input side first."""
    from timm.models._manipulate import group_parameters

    matcher: Any = backbone.group_matcher
    groups = group_parameters(backbone, matcher(coarse=True))
    return [list(groups[key]) for key in sorted(groups)]


def _module_groups(backbone: nn.Module) -> list[list[str]]:
    from timm.models._manipulate import group_modules

    matcher: Any = backbone.group_matcher
    groups = group_modules(backbone, matcher(coarse=True))
    return [list(groups[key]) for key in sorted(groups)]


def frozen_count(n_groups: int, unfreeze: int) -> int:
    """How many of the first groups stay frozen when the last `unfreeze` train (-1: none frozen)."""
    return 0 if unfreeze < 0 else max(0, n_groups - unfreeze)


def optimiser_groups(model: nn.Module, lr: float, layer_decay: float, unfreeze: int) -> list[dict[str, Any]]:
    """AdamW parameter groups: frozen groups' parameters stop requiring gradients; the trained backbone groups
    get `lr · layer_decay^(G − g)`, everything outside the backbone (the heads) `lr`."""
    backbone: Any = getattr(model, "backbone", None)
    if not _is_timm(backbone):  # a frozen encoder, a detector's feature body: every trainable parameter at lr
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    groups = backbone_groups(backbone)
    named = dict(backbone.named_parameters())
    frozen = set_trainable(model, unfreeze)
    out: list[dict[str, Any]] = []
    for g, names in enumerate(groups):
        params = [named[n] for n in names]
        if g >= frozen and params:
            out.append({"params": params, "lr": lr * layer_decay ** (len(groups) - g)})
    in_backbone = {id(p) for p in backbone.parameters()}
    heads = [p for p in model.parameters() if id(p) not in in_backbone and p.requires_grad]
    return out + [{"params": heads, "lr": lr}]


def set_trainable(model: nn.Module, unfreeze: int) -> int:
    """Let the backbone's last `unfreeze` groups (-1: all) require gradients and stop the others; returns how many
    groups are frozen. A backbone that is not a timm model is left as it is (0)."""
    backbone: Any = getattr(model, "backbone", None)
    if not _is_timm(backbone):
        return 0
    groups = backbone_groups(backbone)
    named = dict(backbone.named_parameters())
    frozen = frozen_count(len(groups), unfreeze)
    for g, names in enumerate(groups):
        for name in names:
            named[name].requires_grad_(g >= frozen)
    return frozen


def trained_groups(settings: TrainSettings, epoch: int) -> int:
    """How many of the backbone's last groups train in `epoch` (1-based): none during the probe
    (`probe_epochs`), `unfreeze` after it."""
    return 0 if epoch <= settings.probe_epochs else settings.unfreeze


def hold_frozen(model: nn.Module, unfreeze: int, freeze_bn: bool) -> None:
    """After `model.train()`: frozen groups (and, with `freeze_bn`, every BatchNorm of the backbone) back in
    inference mode, so their statistics stay the pretrained ones and dropout is off there."""
    backbone: Any = getattr(model, "backbone", None)
    if not _is_timm(backbone):
        return
    if unfreeze >= 0:
        modules = dict(backbone.named_modules())
        groups = _module_groups(backbone)
        for names in groups[:frozen_count(len(groups), unfreeze)]:
            for name in names:
                modules[name].eval()
    if freeze_bn:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
