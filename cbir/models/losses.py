"""Training losses: the classification loss of a CbirNet (`classification_loss`), the hash task's losses (DPSH /
HashNet style), a supervised contrastive loss and per-class positive weights for BCE.

`h` is the tanh-relaxed hash layer, a (B, K) tensor in (-1, 1); its sign is the binary code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cbir.models.factory import CbirNet, ModelOutput


class MetricLossSettings(Protocol):
    """The training settings the classification loss reads (`cbir.train.settings.TrainSettings` has them)."""

    metric_loss: str
    metric_weight: float
    metric_temperature: float


def default_alpha(bits: int) -> float:
    """α = 8 / K, so θ = (α/2)·hᵢ·hⱼ lies in [-4, 4] for any K.

    Identical codes then give a similarity probability σ(4) ≈ 0.98, opposite codes σ(-4) ≈ 0.02 and codes
    that differ in half their bits σ(0) = 0.5: the logistic neither saturates (vanishing gradients, as with
    α = 1 at K = 64, where θ reaches ±32) nor stays flat.
    """
    return 8.0 / bits


def pairwise_likelihood_loss(h: torch.Tensor, similar: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the pairwise similarities, log(1 + exp θᵢⱼ) − sᵢⱼ·θᵢⱼ, over pairs i ≠ j.

    `similar` is (B, B) bool (sᵢⱼ). Similar and dissimilar pairs each carry half of the weight (HashNet's
    weighting), so a batch with few positives is not dominated by negative–negative pairs; when a batch
    holds only one kind of pair, the plain mean over pairs is used.
    """
    n = h.shape[0]
    if n < 2:
        return h.sum() * 0.0
    theta = 0.5 * (alpha if alpha is not None else default_alpha(h.shape[1])) * (h @ h.T)
    s = similar.to(h.dtype)
    nll = F.softplus(theta) - s * theta
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=h.device)
    sim = similar & off_diagonal
    dis = ~similar & off_diagonal
    n_sim, n_dis = int(sim.sum()), int(dis.sum())
    if n_sim == 0 or n_dis == 0:
        return nll[off_diagonal].mean()
    return 0.5 * nll[sim].mean() + 0.5 * nll[dis].mean()


def quantization_loss(h: torch.Tensor) -> torch.Tensor:
    """mean((|h| − 1)²): pushes the relaxed outputs towards ±1, so the sign loses little."""
    return ((h.abs() - 1.0) ** 2).mean()


def bit_balance_loss(h: torch.Tensor) -> torch.Tensor:
    """Mean over bits of (mean over the batch of h)²: each bit should be +1 for about half the images."""
    return (h.mean(dim=0) ** 2).mean()


def hash_loss(h: torch.Tensor, y: torch.Tensor, pair_weight: float, quant_weight: float,
              balance_weight: float) -> torch.Tensor:
    """Weighted sum of the three hash losses for binary labels `y` (B,) or (B, 1); sᵢⱼ = (yᵢ = yⱼ)."""
    labels = y.reshape(-1)
    similar = labels[:, None] == labels[None, :]
    return (pair_weight * pairwise_likelihood_loss(h, similar) + quant_weight * quantization_loss(h)
            + balance_weight * bit_balance_loss(h))


def positive_weights(targets: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """Per-column BCE `pos_weight` = negatives / positives, clipped at `clip`; 1 for a column without positives.

    `targets` is (N, C) of 0/1.
    """
    positives = targets.sum(dim=0)
    negatives = targets.shape[0] - positives
    weights = torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives))
    return weights.clamp(max=clip) if clip is not None else weights


def supervised_contrastive_loss(embedding: torch.Tensor, labels: torch.Tensor, patients: torch.Tensor,
                                temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) on L2-normalised embeddings (B, D).

    Positives of an anchor are the other images with its label and every other image of its patient; negatives
    are images of other patients with another label. Two images of one patient are never negatives. Anchors
    without a positive in the batch are left out; a batch without any gives 0.
    """
    n = embedding.shape[0]
    if n < 2:
        return embedding.sum() * 0.0
    labels, patients = labels.reshape(-1), patients.reshape(-1)
    same_patient = patients[:, None] == patients[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=embedding.device)
    positive = ((labels[:, None] == labels[None, :]) | same_patient) & ~eye
    logits = embedding @ embedding.T / temperature
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    has = positive.any(dim=1)
    if not bool(has.any()):
        return embedding.sum() * 0.0
    mean_positive = (log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1).clamp(min=1))
    return -mean_positive[has].mean()


def label_groups(target: torch.Tensor) -> torch.Tensor:
    """(B,) one integer per distinct row of 0/1 targets (B, C): images with the same labels share it."""
    weights = 2 ** torch.arange(target.shape[1], device=target.device, dtype=torch.float64)
    return (target.double() @ weights).long()


def classification_loss(model: CbirNet, out: ModelOutput, target: torch.Tensor, pos_weight: torch.Tensor,
                        settings: MetricLossSettings | None = None, patients: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Class-weighted BCE on the logits, plus (`settings.metric_loss` "supcon") the supervised contrastive loss
    on the semantic embedding, plus (a hash layer) the hash losses weighted by the config's `hash_*` fields."""
    loss = F.binary_cross_entropy_with_logits(out.logits, target, pos_weight=pos_weight)
    if settings is not None and settings.metric_loss == "supcon" and patients is not None:
        assert out.semantic is not None  # a CbirNet's outputs always have it
        loss = loss + settings.metric_weight * supervised_contrastive_loss(
            out.semantic, label_groups(target), patients, settings.metric_temperature)
    if out.hash is None:
        return loss
    c = model.config
    return loss + hash_loss(out.hash, target, c.hash_pair_weight, c.hash_quant_weight, c.hash_balance_weight)
