"""The hash-task losses and the per-class BCE weights, on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from cbir.models.losses import (
    bit_balance_loss,
    default_alpha,
    hash_loss,
    pairwise_likelihood_loss,
    positive_weights,
    quantization_loss,
)


def test_pairwise_loss_is_log2_for_zero_codes() -> None:
    h = torch.zeros(4, 16)
    similar = torch.tensor([0, 0, 1, 1])[:, None] == torch.tensor([0, 0, 1, 1])[None, :]
    assert pairwise_likelihood_loss(h, similar).item() == pytest.approx(math.log(2))


def test_pairwise_loss_prefers_codes_that_follow_the_labels() -> None:
    y = torch.tensor([0, 0, 1, 1, 1])
    similar = y[:, None] == y[None, :]
    sign = (2 * y - 1).float()[:, None]
    good, bad = sign.repeat(1, 32), torch.ones(5, 32)
    assert pairwise_likelihood_loss(good, similar) < 0.05 < pairwise_likelihood_loss(bad, similar)


def test_pairwise_loss_gives_similar_and_dissimilar_pairs_half_each() -> None:
    torch.manual_seed(0)
    h = torch.tanh(torch.randn(6, 8))
    y = torch.tensor([1, 0, 0, 0, 0, 0])  # one positive: 20 similar ordered pairs, 10 dissimilar
    similar = y[:, None] == y[None, :]
    theta = 0.5 * default_alpha(8) * h @ h.T
    nll = torch.nn.functional.softplus(theta) - similar.float() * theta
    off = ~torch.eye(6, dtype=torch.bool)
    expected = 0.5 * nll[similar & off].mean() + 0.5 * nll[~similar & off].mean()
    assert pairwise_likelihood_loss(h, similar).item() == pytest.approx(expected.item())
    all_similar = torch.ones(6, 6, dtype=torch.bool)
    plain = (torch.nn.functional.softplus(theta) - theta)[off].mean()
    assert pairwise_likelihood_loss(h, all_similar).item() == pytest.approx(plain.item())


def test_alpha_keeps_theta_order_one() -> None:
    for bits in (16, 64, 256):
        h = torch.ones(2, bits)
        assert 0.5 * default_alpha(bits) * float(h[0] @ h[1]) == pytest.approx(4.0)


def test_quantization_and_balance_losses() -> None:
    assert quantization_loss(torch.tensor([[1.0, -1.0]])).item() == 0.0
    assert quantization_loss(torch.zeros(3, 4)).item() == 1.0
    assert bit_balance_loss(torch.ones(4, 8)).item() == 1.0
    assert bit_balance_loss(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])).item() == 0.0


def test_hash_loss_is_the_weighted_sum_and_has_gradients() -> None:
    torch.manual_seed(1)
    raw = torch.randn(8, 16, requires_grad=True)
    h, y = torch.tanh(raw), torch.tensor([0, 1, 0, 1, 1, 0, 0, 0]).float()
    similar = y[:, None] == y[None, :]
    total = hash_loss(h, y[:, None], 1.0, 0.5, 2.0)
    expected = pairwise_likelihood_loss(h, similar) + 0.5 * quantization_loss(h) + 2.0 * bit_balance_loss(h)
    assert total.item() == pytest.approx(expected.item())
    total.backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all()


def test_positive_weights_per_class_clipped_and_absent() -> None:
    targets = torch.zeros(101, 3)
    targets[:1, 0] = 1      # 1 positive: 100 → clipped to 50
    targets[:50, 1] = 1     # 50 positives, 51 negatives
    weights = positive_weights(targets, clip=50.0)
    assert weights.tolist() == pytest.approx([50.0, 51 / 50, 1.0])  # class 2 has no positive: weight 1
    assert positive_weights(targets)[0].item() == pytest.approx(100.0)
