"""The neighbours' vote: similarity-weighted, corrected for the archive's class frequencies, and calibrated.

For a query with neighbours i = 1..k (cosine similarity s_i, binary target y_i) in an archive whose positive
share is π:

    w_i = exp((s_i − s_1) / τ)                       similarity weight (s_1: the nearest neighbour)
    v_c = Σ_{i: y_i = c} w_i / π_c                   π_1 = π, π_0 = 1 − π
    r   = v_1 / (v_0 + v_1)                          the prior-corrected weighted share of the target
    p   = σ(a · logit(r) + b)                        Platt scaling: the calibrated probability

τ, a and b are fitted on the collection's validation images queried against its training images (never on test
images): τ from `TEMPERATURES` by the validation log-loss of p, then a and b by logistic regression. Without a
calibration, τ = ∞ (equal weights), a = 1, b = 0, and p = r.

The vote's label follows p (`VoteCalibration.operating_point`): the target when p ≥ σ(b), the calibrated
probability of an even prior-corrected share. The prior correction makes r ≥ ½ the neighbours' balanced-accuracy
decision; Platt scaling is monotone (a > 0), so p ≥ σ(b) is that decision read on the calibrated probability, and
the label and the probability never disagree (docs/metrics.md, "The vote"). Reading p at the prevalence π instead
is the same decision only when a ≈ 1 and b ≈ logit(π); the fitted slopes are far flatter (a = 0.18–0.29 on the
five RSNA folds of docs/results.md: logit(r) is extreme where k neighbours all agree), and p ≥ π then said the
target for a single positive neighbour of ten (vote sensitivity 92 %, specificity 47 %).

`effective_neighbours` says how many neighbours the weights amount to, (Σw)² / Σw²: 1 when the nearest one carries
all the weight; below `NEAREST_CASE` the output calls the vote what it is, a nearest-case label.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cbir.models.calibration import log_loss, logit, platt

TEMPERATURES = (0.01, 0.02, 0.05, 0.1, 0.2, math.inf)
#: Below this many effective neighbours (`effective_neighbours`) the vote is called a nearest-case label.
NEAREST_CASE = 2.0


@dataclass(frozen=True)
class VoteCalibration:
    temperature: float = math.inf
    a: float = 1.0
    b: float = 0.0
    prior: float | None = None          # the archive's positive share at calibration time
    n_validation: int = 0
    log_loss: float | None = None       # validation log-loss of the calibrated probability

    @property
    def fitted(self) -> bool:
        """Whether a and b were fitted (validation images of both classes): p is calibrated to `prior`."""
        return self.log_loss is not None and self.prior is not None and 0.0 < self.prior < 1.0

    @property
    def operating_point(self) -> float:
        """The probability at and above which the vote says the target: σ(b), what the calibration makes of an
        even prior-corrected share (r = ½); 0.5 uncalibrated (p = r), or for a slope a ≤ 0."""
        if self.fitted and self.a > 0:
            return 1.0 / (1.0 + math.exp(-self.b))
        return 0.5

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


def calibrated(r: np.ndarray, calibration: VoteCalibration) -> np.ndarray:
    z = calibration.a * logit(r) + calibration.b
    return 1.0 / (1.0 + np.exp(-z))


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
    """(label 0/1, calibrated probability, r) per query; `prior` (of r) defaults to the calibration's. The label
    is the probability read at the calibration's operating point."""
    r = corrected_share(scores, targets, calibration.prior if prior is None else prior, calibration.temperature)
    p = calibrated(r, calibration)
    return (p >= calibration.operating_point).astype(np.int64), p, r


def effective_neighbours(w: np.ndarray) -> np.ndarray:
    """(Σw)² / Σw² per row of (Q, k) weights: how many equally weighted neighbours the vote amounts to (0 with
    none)."""
    w = np.asarray(w, dtype=np.float64)
    total, squares = w.sum(axis=-1), (w ** 2).sum(axis=-1)
    return np.where(squares > 0, total ** 2 / np.where(squares > 0, squares, 1.0), 0.0)
