"""The model's own probability is calibrated on validation images (`cbir.models.calibration`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbir.models.calibration import ProbabilityCalibration, log_loss


def _weighted_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True probabilities, targets, and the raw scores of a model trained with pos_weight = 3: odds × 3."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.2, 1.5, n)
    p = 1 / (1 + np.exp(-z))
    y = (rng.random(n) < p).astype(int)
    raw = 1 / (1 + np.exp(-(z + np.log(3.0))))
    return p, y, raw


def test_class_weighted_scores_are_not_probabilities_until_calibrated(tmp_path: Path) -> None:
    _, y, raw = _weighted_scores(600, 0)
    fitted = ProbabilityCalibration.fit(raw, y, "f" * 16)
    assert fitted is not None
    assert raw.mean() > y.mean() + 0.08                      # the raw score overstates the target
    p = fitted.apply(raw)
    assert abs(p.mean() - y.mean()) < 0.03 and fitted.log_loss < fitted.raw_log_loss
    assert np.all(np.diff(fitted.apply(np.sort(raw))) >= 0)   # monotone: the ranking (AUC) is the same
    assert fitted.operating_point == y.mean()
    # on new images from the same model the calibrated probability beats the raw one
    truth, y2, raw2 = _weighted_scores(4000, 1)
    assert log_loss(fitted.apply(raw2), y2) < log_loss(raw2, y2) - 0.02
    assert abs(fitted.apply(raw2).mean() - truth.mean()) < 0.03
    fitted.save(tmp_path)
    assert ProbabilityCalibration.load(tmp_path, "f" * 16) == fitted
    assert ProbabilityCalibration.load(tmp_path, "0" * 16) is None     # fitted for other weights: stale
    assert ProbabilityCalibration.fit(raw[:10], y[:10], "f") is None  # too few
    assert ProbabilityCalibration.fit(raw, np.zeros_like(y), "f") is None  # one class
