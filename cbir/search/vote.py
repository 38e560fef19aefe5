"""The neighbours' vote: similarity-weighted, corrected for the archive's class frequencies, and calibrated.

For a query with neighbours i = 1..k (cosine similarity s_i, binary target y_i) in an archive whose positive
share is π:

    w_i = exp((s_i − s_1) / τ)                       similarity weight (s_1: the nearest neighbour)
    v_c = Σ_{i: y_i = c} w_i / π_c                   π_1 = π, π_0 = 1 − π
    r   = v_1 / (v_0 + v_1)                          the prior-corrected weighted share of the target
    p   = σ(a · logit(r) + b)                        Platt scaling: the calibrated probability

The vote's label is the target when r ≥ ½: each class's votes are weighed against how common the class is, so
a majority class no longer wins by being common. τ, a and b are fitted on the collection's validation images
queried against its training images (never on test images): τ from `TEMPERATURES` by the validation log-loss
of p, then a and b by logistic regression. Without a calibration, τ = ∞ (equal weights), a = 1, b = 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

TEMPERATURES = (0.01, 0.02, 0.05, 0.1, 0.2, math.inf)
EPS = 1e-4


@dataclass(frozen=True)
class VoteCalibration:
    temperature: float = math.inf
    a: float = 1.0
    b: float = 0.0
    prior: float | None = None          # the archive's positive share at calibration time
    n_validation: int = 0
    log_loss: float | None = None       # validation log-loss of the calibrated probability

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["temperature"] = None if math.isinf(self.temperature) else self.temperature
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any] | None) -> VoteCalibration:
        if not body:
            return cls()
        known = {k: body[k] for k in ("a", "b", "prior", "n_validation", "log_loss") if k in body}
        temperature = body.get("temperature")
        return cls(temperature=math.inf if temperature is None else float(temperature), **known)


def weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """(Q, k) similarity weights; padded neighbours (NaN scores) weigh 0."""
    scores = np.asarray(scores, dtype=np.float64)
    present = np.isfinite(scores)
    if math.isinf(temperature):
        return present.astype(np.float64)
    top = np.nanmax(np.where(present, scores, -np.inf), axis=1, keepdims=True)
    return np.where(present, np.exp((np.where(present, scores, 0.0) - top) / temperature), 0.0)


def corrected_share(scores: np.ndarray, targets: np.ndarray, prior: float | None,
                    temperature: float) -> np.ndarray:
    """r per query: the prior-corrected, similarity-weighted share of target neighbours (½ with none)."""
    w = weights(scores, temperature)
    positive = np.asarray(targets) == 1
    pi = prior if prior is not None and 0.0 < prior < 1.0 else 0.5
    v1 = (w * positive).sum(axis=1) / pi
    v0 = (w * ~positive).sum(axis=1) / (1.0 - pi)
    total = v0 + v1
    return np.where(total > 0, v1 / np.where(total > 0, total, 1.0), 0.5)


def logit(r: np.ndarray) -> np.ndarray:
    r = np.clip(np.asarray(r, dtype=np.float64), EPS, 1 - EPS)
    return np.log(r / (1 - r))


def calibrated(r: np.ndarray, calibration: VoteCalibration) -> np.ndarray:
    z = calibration.a * logit(r) + calibration.b
    return 1.0 / (1.0 + np.exp(-z))


def platt(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 100) -> tuple[float, float]:
    """(a, b) of σ(a·x + b) by damped Newton steps on the mean log-loss plus a small ridge on a (which keeps
    separable data finite); each step is halved until the loss goes down, so it cannot diverge."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    design = np.stack([x, np.ones_like(x)], axis=1)
    ridge = np.array([l2, 0.0])

    def loss(theta: np.ndarray) -> float:
        z = design @ theta
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * float(ridge @ theta ** 2))

    theta = np.array([1.0, 0.0])
    current = loss(theta)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        grad = design.T @ (p - y) / len(y) + ridge * theta
        hess = (design * (p * (1 - p))[:, None]).T @ design / len(y) + np.diag(ridge + 1e-9)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6 and loss(theta - scale * step) > current:
            scale /= 2
        if scale <= 1e-6:
            break
        theta = theta - scale * step
        previous, current = current, loss(theta)
        if previous - current < 1e-12:
            break
    return float(theta[0]), float(theta[1])


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit(scores: np.ndarray, targets: np.ndarray, y: np.ndarray, prior: float) -> VoteCalibration:
    """τ, a, b from validation queries: their neighbours' (Q, k) scores and targets, and their own targets."""
    y = np.asarray(y)
    if y.size == 0 or y.min() == y.max():
        return VoteCalibration(prior=prior, n_validation=int(y.size))
    best: VoteCalibration | None = None
    for temperature in TEMPERATURES:
        r = corrected_share(scores, targets, prior, temperature)
        a, b = platt(logit(r), y)
        candidate = VoteCalibration(temperature, a, b, prior, int(y.size))
        loss = log_loss(calibrated(r, candidate), y)
        if best is None or loss < (best.log_loss or math.inf) - 1e-9:
            best = VoteCalibration(temperature, a, b, prior, int(y.size), round(loss, 6))
    assert best is not None
    return best


def decide(scores: np.ndarray, targets: np.ndarray, calibration: VoteCalibration,
           prior: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label 0/1, calibrated probability, r) per query; `prior` defaults to the calibration's."""
    r = corrected_share(scores, targets, calibration.prior if prior is None else prior, calibration.temperature)
    return (r >= 0.5).astype(np.int64), calibrated(r, calibration), r
