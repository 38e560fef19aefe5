"""The appearance part of the retrieval embedding: a tiny image of the model input, centred on the training mean.

A classifier's globally pooled features keep what the image shows, not where: a 3 % crop or a 5° rotation of
the same radiograph moves them further than the distance to another patient, so a re-encoded copy often does
not find its original. A tiny image (`size` × `size` area averages of the model input, standardised, minus the
mean tiny image of the training set, weighted towards the centre, L2-normalised) keeps the layout and
identifies the image, and it is cheap. The retrieval embedding joins both unit vectors with weight `w`:

    e = [√(1 − w) · semantic, √w · appearance],   so   cos(e_q, e_x) = (1 − w) · cos_sem + w · cos_app.

`w` and `size` were chosen on validation patients only (docs/results.md, "Appearance").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbir.data.transforms import standardize


def tiny_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, H, W) model inputs → (B, size²): area-averaged to size × size, then standardised per image."""
    return standardize(F.adaptive_avg_pool2d(x.float(), size)).flatten(1)


def centre_window(size: int, sigma: float) -> torch.Tensor:
    """(size²,) Gaussian weights exp(−r² / 2σ²), r the distance from the centre in half-widths; all 1 for σ = 0.
    A crop or a rotation moves pixels in proportion to their distance from the centre, so the border counts
    less."""
    if sigma <= 0:
        return torch.ones(size * size)
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / (size / 2) - 1
    r2 = grid[:, None] ** 2 + grid[None, :] ** 2
    return torch.exp(-r2 / (2 * sigma ** 2)).flatten()


class Appearance(nn.Module):
    """Tiny image minus the training mean, weighted towards the centre, L2-normalised; `fit` sets the mean from
    training inputs."""

    mean: torch.Tensor  # a buffer

    def __init__(self, size: int, window: float = 0.0) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.zeros(size * size))
        self.sigma = window   # the centre weighting is made in `forward`: no tensor outside the state dict

    @property
    def dim(self) -> int:
        return self.size * self.size

    @torch.no_grad()
    def fit(self, images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor] = standardize,
            batch_size: int = 256) -> None:
        """Set the mean from (N, 1, H, W) unaugmented training images, made model inputs by `prepare`."""
        total = torch.zeros_like(self.mean)
        for start in range(0, len(images), batch_size):
            inputs = prepare(images[start:start + batch_size].float()).to(self.mean.device)
            total += tiny_image(inputs, self.size).sum(dim=0)
        self.mean.copy_(total / max(len(images), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return centred(tiny_image(x, self.size), self.mean, self.size, self.sigma)


def centred(tiny: torch.Tensor, mean: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(B, size²) tiny images → unit appearance vectors: minus `mean`, weighted towards the centre
    (`centre_window`), L2-normalised."""
    return F.normalize((tiny - mean) * centre_window(size, sigma).to(tiny.device), dim=1)


def appearance_part(embeddings: np.ndarray, size: int, weight: float) -> np.ndarray:
    """The unit appearance vectors (N, size²) inside joined retrieval embeddings (N, dim): the last size² entries
    of `join`'s output, divided by √w (renormalised, so stored float rounding does not matter)."""
    tail = np.asarray(embeddings, dtype=np.float32)[:, -size * size:] / math.sqrt(weight)
    return tail / np.maximum(np.linalg.norm(tail, axis=1, keepdims=True), 1e-12)


def join(semantic: torch.Tensor, appearance: torch.Tensor, weight: float) -> torch.Tensor:
    """The unit retrieval embedding [√(1 − w) · semantic, √w · appearance] of two unit vectors."""
    return torch.cat([math.sqrt(1.0 - weight) * semantic, math.sqrt(weight) * appearance], dim=1)
