"""Self-supervised pretraining of a backbone (`cbir pretrain`): the projector head and the two losses.

SimCLR's NT-Xent (Chen et al. 2020) and VICReg (Bardes et al. 2022), both on (B, D) projections of two views.
The projector exists only during pretraining; what is kept is the backbone (`cbir.train.pretrain`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from cbir.models.factory import ModelConfig, _create_backbone


def create_backbone(name: str) -> nn.Module:
    """A randomly initialised timm backbone exactly as a `CbirNet` builds it (in_chans=1, no classifier)."""
    return _create_backbone(ModelConfig(backbone=name), pretrained=False, weights=None)


def projector(features: int, method: str, hidden: int = 512, out: int = 128) -> nn.Module:
    """SimCLR: Linear-BN-ReLU-Linear to `out`. VICReg: three layers of `hidden` (its expander: the variance and
    covariance terms need a wide output)."""
    if method == "vicreg":
        return nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, hidden))
    return nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2,
            groups: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent: each of the 2B views must pick its partner view among the other 2B − 1 by cosine / temperature.

    `groups` (B,): a patient per row; views of two rows with the same patient are not counted as negatives
    (they are left out of the softmax), as a patient's other images are not a different case.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    index = torch.arange(2 * n, device=z.device)
    partner = (index + n) % (2 * n)
    excluded = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    if groups is not None:
        g = torch.cat([groups, groups]).to(z.device)
        excluded = excluded | (g[:, None] == g[None, :])
        excluded[index, partner] = False
    logits = logits.masked_fill(excluded, float("-inf"))
    return F.cross_entropy(logits, partner)


def vicreg(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
           cov_weight: float = 1.0, groups: torch.Tensor | None = None) -> torch.Tensor:
    """VICReg: invariance (MSE between the views) + variance (hinge on each dimension's std, ≥ 1) + covariance
    (off-diagonal covariance²), with the paper's weights. `groups` is unused (VICReg has no negatives)."""
    invariance = F.mse_loss(z1, z2)
    variance = covariance = z1.new_zeros(())
    dim = z1.shape[1]
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + 1e-4)
        variance = variance + F.relu(1 - std).mean() / 2
        cov = (z.T @ z) / max(z.shape[0] - 1, 1)
        off = cov - torch.diag(torch.diag(cov))
        covariance = covariance + off.pow(2).sum() / dim
    return sim_weight * invariance + var_weight * variance + cov_weight * covariance


#: name → loss(z1, z2, groups=...) of the two views' projections.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {"simclr": nt_xent, "vicreg": vicreg}
METHODS = tuple(LOSSES)


class SSLModel(nn.Module):
    """Backbone → pooled features → projector; `loss(x1, x2)` is the method's loss on two batches of views."""

    def __init__(self, backbone: str, method: str, temperature: float = 0.2) -> None:
        super().__init__()
        self.method, self.temperature = method, temperature
        self.backbone = create_backbone(backbone)
        self.projector = projector(cast(int, self.backbone.num_features), method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def loss(self, x1: torch.Tensor, x2: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        z = self(torch.cat([x1, x2]))
        z1, z2 = z[:len(x1)], z[len(x1):]
        if self.method == "simclr":
            return nt_xent(z1, z2, self.temperature, groups)
        return vicreg(z1, z2, groups=groups)
