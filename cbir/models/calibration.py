"""The model's own probability, calibrated: what "P(Pneumonia)" means wherever cbir shows it.

Training uses class-weighted BCE (pos_weight = negatives / positives), which multiplies the model's odds of the
target by about that ratio (about 3 on RSNA): its raw sigmoid is a score, not a probability. At the end of
training, Platt scaling on the validation images maps the raw logit z to

    p = σ(a · z + b),

fitted by the validation log-loss (`platt`), and written to the checkpoint as calibration.json (with the raw and
calibrated validation log-loss, and the fingerprint of the weights it was fitted for). p is then calibrated to
the validation prevalence π, and the model says "target" when p ≥ π (`operating_point`): for a calibrated
probability that is the decision that maximises balanced accuracy, the same rule as the vote's
(`cbir.search.vote`; docs/metrics.md). Checkpoints without the file (older ones, detectors) show the raw score
at 0.5, and say that it is uncalibrated.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CALIBRATION = "calibration.json"
EPS = 1e-4
#: Fewer validation images, or one class only: no calibration is fitted.
MIN_IMAGES = 20


def logit(r: np.ndarray) -> np.ndarray:
    r = np.clip(np.asarray(r, dtype=np.float64), EPS, 1 - EPS)
    return np.log(r / (1 - r))


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


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


@dataclass(frozen=True)
class ProbabilityCalibration:
    """Platt scaling of the target's raw logit, fitted on the validation images of one set of weights."""

    a: float
    b: float
    prevalence: float        # the validation images' share of the target: what p is calibrated to
    n_val: int
    raw_log_loss: float      # validation log-loss of the raw sigmoid
    log_loss: float          # and of the calibrated probability
    fingerprint: str         # the weights it was fitted for (`cbir.models.checkpoint.fingerprint_of`)
    method: str = "Platt scaling of the raw logit on the validation images"

    @property
    def operating_point(self) -> float:
        """The calibrated probability from which the model says "target": the prevalence it is calibrated to."""
        return self.prevalence

    def apply(self, raw: np.ndarray | float) -> np.ndarray:
        """Calibrated probabilities of raw sigmoid outputs."""
        return 1.0 / (1.0 + np.exp(-(self.a * logit(np.asarray(raw)) + self.b)))

    @classmethod
    def fit(cls, raw: np.ndarray, y: np.ndarray, fingerprint: str) -> ProbabilityCalibration | None:
        """From the validation images' raw target probabilities and targets; None with too few images or one
        class only."""
        raw, y = np.asarray(raw, dtype=np.float64), np.asarray(y, dtype=np.int64)
        if y.size < MIN_IMAGES or y.min() == y.max():
            return None
        a, b = platt(logit(raw), y)
        fitted = cls(a, b, float(y.mean()), int(y.size), round(log_loss(raw, y), 6), 0.0, fingerprint)
        return cls(**{**asdict(fitted), "log_loss": round(log_loss(fitted.apply(raw), y), 6)})

    def save(self, folder: Path) -> None:
        path = Path(folder) / CALIBRATION
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(self), indent=2) + "\n")
        partial.replace(path)

    @classmethod
    def load(cls, folder: Path, fingerprint: str) -> ProbabilityCalibration | None:
        """The checkpoint's calibration; None without one, or when it was fitted for other weights (stale)."""
        path = Path(folder) / CALIBRATION
        if not path.is_file():
            return None
        try:
            body = json.loads(path.read_text())
            found = cls(**body)
        except (json.JSONDecodeError, TypeError, ValueError):
            return None
        if found.fingerprint != fingerprint or not all(math.isfinite(v) for v in (found.a, found.b)):
            return None
        return found
