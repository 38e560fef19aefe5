"""Fit the saved model's probability calibration (`cbir.models.calibration`) at the end of training: one forward
pass over the already-decoded validation images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbir.console import QUIET, Reporter
from cbir.models.calibration import CALIBRATION, ProbabilityCalibration
from cbir.models.checkpoint import load_checkpoint
from cbir.models.device import inference_batch
from cbir.train.classifier import ClassifierData


@torch.inference_mode()
def fit_calibration(out: Path, data: Any, device: torch.device | str = "cpu", reporter: Reporter = QUIET,
                    batch_size: int | None = None) -> ProbabilityCalibration | None:
    """Fit Platt scaling of the target's raw logit on `data`'s validation images, for the checkpoint saved in
    `out` (the kept weights), and write `out`/calibration.json. A stale file is removed first; detectors, and
    validation sets too small or of one class, get none (the raw score is shown, marked uncalibrated)."""
    (out / CALIBRATION).unlink(missing_ok=True)
    if not isinstance(data, ClassifierData) or len(data.x_val) == 0:
        return None
    return fit_on(out, data.x_val, data.y_val, device, reporter, batch_size)


@torch.inference_mode()
def fit_on(out: Path, x_val: torch.Tensor, y_val: np.ndarray, device: torch.device | str = "cpu",
           reporter: Reporter = QUIET, batch_size: int | None = None) -> ProbabilityCalibration | None:
    """`fit_calibration` on decoded validation images `x_val` and their targets `y_val` (one column per label)."""
    loaded = load_checkpoint(out, device)
    column = loaded.config.target_index
    batch_size = batch_size or inference_batch(device)
    raw = []
    for start in range(0, len(x_val), batch_size):
        output, _ = loaded.task.embed(loaded.model, loaded.config, x_val[start:start + batch_size])
        raw.append(loaded.model.probabilities(output.logits)[:, column].float().cpu().numpy())
    y = np.asarray(y_val)[:, column if np.asarray(y_val).shape[1] > column else 0]
    fitted = ProbabilityCalibration.fit(np.concatenate(raw), (y > 0.5).astype(np.int64), loaded.fingerprint)
    if fitted is None:
        reporter.warn("the model's probability is not calibrated: the validation split is too small or has one "
                      "class only; its raw score is shown, at 0.5")
        return None
    fitted.save(out)
    reporter.log(f"probability calibration: Platt a = {fitted.a:.3f}, b = {fitted.b:.3f} on {fitted.n_val} validation "
                 f"images (log-loss {fitted.raw_log_loss:.3f} raw → {fitted.log_loss:.3f}); says the target from "
                 f"p ≥ {fitted.operating_point:.3f}, the validation prevalence")
    return fitted
