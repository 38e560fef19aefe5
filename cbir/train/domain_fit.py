"""Fit the saved model's domain model (`cbir.models.domain`) at the end of training: one forward pass over the
already-decoded training and validation images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbir.console import QUIET, Reporter
from cbir.models.checkpoint import LoadedModel, domain_features_of, load_checkpoint
from cbir.models.device import inference_batch
from cbir.models.domain import DOMAIN, QUANTILE, DomainModel
from cbir.train.classifier import ClassifierData


@torch.inference_mode()
def domain_features(loaded: LoadedModel, pixels: torch.Tensor, batch_size: int | None = None) -> np.ndarray | None:
    """(N, p) the domain model's features (`ModelOutput.domain`) of (N, 1, S, S) pixels in [0, 1], prepared exactly
    as `task.embed` prepares a query; None for a model without them (a detector)."""
    chunks = []
    batch_size = batch_size or inference_batch(next(loaded.model.parameters()).device)
    for start in range(0, len(pixels), batch_size):
        out, _ = loaded.task.embed(loaded.model, loaded.config, pixels[start:start + batch_size])
        if out.domain is None:
            return None
        chunks.append(out.domain.float().cpu().numpy())
    return np.concatenate(chunks) if chunks else None


def fit_domain(out: Path, data: Any, device: torch.device | str = "cpu", reporter: Reporter = QUIET,
               quantile: float = QUANTILE) -> DomainModel | None:
    """Fit the domain model of the checkpoint saved in `out` on `data`'s training images, its threshold on the
    validation images, and write `out`/domain.safetensors. A stale file is removed first; tasks without
    `ClassifierData` (detectors) get none."""
    (out / DOMAIN).unlink(missing_ok=True)
    if not isinstance(data, ClassifierData):
        return None
    loaded = load_checkpoint(out, device)   # the kept weights, as saved (not the last epoch's under --select best)
    train = domain_features(loaded, data.x_train)
    val = domain_features(loaded, data.x_val)
    if train is None or val is None or len(train) < 2 or len(val) == 0:
        return None
    domain = DomainModel.fit(train, val, quantile, fingerprint=loaded.fingerprint,
                             features=domain_features_of(loaded.model))
    domain.save(out)
    reporter.log(f"domain model: threshold {domain.threshold:.3f}, the conformal rank for the {100 * quantile:g} % "
                 f"quantile of {domain.n_val} validation images")
    return domain
