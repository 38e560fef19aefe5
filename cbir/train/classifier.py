"""The training data and validation of a `CbirNet` (tasks binary, hash and multilabel) for `cbir.train.loop`.

binary: class-weighted BCE on the target. hash: the same BCE plus the pairwise-likelihood, quantisation and
bit-balance losses of `cbir.models.losses`, weighted by the config's `hash_*` fields. multilabel: BCE over every
label with per-class pos_weight (neg/pos, at most 50; 1 for a class without positives), selected by the mean
per-class validation AUC.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cbir.console import Reporter
from cbir.data.records import Records
from cbir.data.transforms import model_input
from cbir.errors import DatasetError
from cbir.metrics import per_class_auc, roc_auc
from cbir.models import CbirNet, ModelConfig, decode_size
from cbir.models.device import inference_batch
from cbir.models.losses import label_groups, positive_weights
from cbir.models.registry import Batch, Task, get_task
from cbir.train.preload import preload
from cbir.train.settings import TrainResult, TrainSettings, Validation

#: Largest BCE pos_weight for a rare class (multilabel).
MAX_POS_WEIGHT = 50.0


class ClassifierData:
    """The decoded train and validation images of a CbirNet run, their targets and the loss weights."""

    result_class = TrainResult

    def __init__(self, records: Records, train: Records, val: Records, config: ModelConfig, task: Task,
                 settings: TrainSettings, reporter: Reporter, device: torch.device) -> None:
        self.config, self.task, self.device = config, task, device
        reduce_to = decode_size(config)
        self.x_train, keep_train, fail_train = preload(train, config.image_size, settings, reporter, "train", reduce_to)
        self.x_val, keep_val, fail_val = preload(val, config.image_size, settings, reporter, "val", reduce_to)
        y_train = task.targets(train)[keep_train]
        _check_train_targets(records, y_train, task)
        self.y_train = torch.from_numpy(y_train)
        self.patients = torch.from_numpy(np.unique(train.meta["patient"].astype(str).to_numpy()[keep_train],
                                                   return_inverse=True)[1].astype(np.int64))
        self.y_val = task.targets(val)[keep_val]
        clip = MAX_POS_WEIGHT if task.per_label else None
        # balanced batches already weigh the classes equally: class-weighting the loss too would count twice
        self.pos_weight = (torch.ones(self.y_train.shape[1]) if settings.balanced
                           else positive_weights(self.y_train, clip)).to(device)
        self.balanced = settings.balanced
        self.n_train, self.n_val, self.failures = len(keep_train), len(keep_val), fail_train + fail_val
        y_val = self.y_val
        self.by_auc = bool(((y_val.min(axis=0) == 0) & (y_val.max(axis=0) == 1)).any()) if len(y_val) else False
        what = "no label with both classes" if task.per_label else f"one class of {records.target!r}"
        self.no_auc_warning = (f"the validation split has only {what}: AUC is undefined, so the checkpoint is "
                               "chosen by validation loss")
        self.unscored = {"best_val_auc": math.nan}

    @classmethod
    def check(cls, records: Records, train: Records) -> None:
        """Nothing to check before the validation split is chosen (the targets are checked once decoded)."""

    @classmethod
    def prepare(cls, records: Records, train: Records, val: Records, config: ModelConfig, task: Task,
                settings: TrainSettings, reporter: Reporter, device: torch.device) -> ClassifierData:
        return cls(records, train, val, config, task, settings, reporter, device)

    def fit(self, model: CbirNet) -> None:
        """Fit what depends on the training images only: the appearance part's mean."""
        if model.appearance is not None:
            model.appearance.fit(self.x_train, lambda batch: model_input(batch, self.config.intensity))

    def order(self, generator: torch.Generator) -> torch.Tensor:
        return batch_order(self.y_train, self.balanced, generator)

    def batch(self, idx: torch.Tensor) -> Batch:
        return Batch(self.x_train[idx].float(), self.device, target=self.y_train[idx], pos_weight=self.pos_weight,
                     patients=self.patients[idx])

    def calibrate(self, model: CbirNet) -> None:
        """Before scoring: the hash layer's centre on the training images."""
        if model.hash_head is not None:
            calibrate_hash_centre(model, self.x_train, self.device)

    def validate(self, model: CbirNet) -> Validation:
        val_prob, val_loss, val_codes = _predict(model, self.x_val, torch.from_numpy(self.y_val), self.pos_weight,
                                                 self.device)
        scores = validation_scores(self.y_val, val_prob, self.config)
        val_auc = scores["auc"]
        extra = {}
        if "per_class" in scores:
            extra["val_auc_per_class"] = scores["per_class"]
            extra["val_target_auc"] = None if math.isnan(scores["target"]) else scores["target"]
        if model.hash_head is not None:
            extra["val_bit_ones"] = _bit_ones(val_codes)
        return Validation(
            row={"val_loss": val_loss, "val_auc": None if math.isnan(val_auc) else val_auc}, extra=extra,
            score=val_auc - 1e-9 * val_loss if self.by_auc else -val_loss,  # loss breaks AUC ties
            best={"best_val_auc": val_auc},
            log=f"val loss {val_loss:.4f}  val AUC {'n/a' if math.isnan(val_auc) else f'{val_auc:.4f}'}")


def _check_train_targets(records: Records, y: np.ndarray, task: Task) -> None:
    positives = y.sum(axis=0)
    if task.per_label:
        if not ((positives > 0) & (positives < len(y))).any():
            raise DatasetError(f"{records.root}: no label has both classes in the train split")
    elif positives[0] == 0 or positives[0] == len(y):
        raise DatasetError(f"{records.root}: the train split has only one class of {records.target!r}")


def validation_scores(y_val: np.ndarray, prob: np.ndarray, config: ModelConfig) -> dict:
    """The selection AUC: ROC-AUC of the target (binary, hash), or the mean per-class AUC over the classes
    that have both values in validation (multilabel, which also reports each class's AUC; None = undefined)."""
    if not get_task(config.task).per_label:
        return {"auc": roc_auc(y_val[:, 0], prob[:, 0])}
    aucs = per_class_auc(y_val, prob)
    defined = [a for a in aucs if not math.isnan(a)]
    return {"auc": float(np.mean(defined)) if defined else math.nan,
            "per_class": {name: None if math.isnan(a) else a for name, a in zip(config.label_names, aucs, strict=True)},
            "target": aucs[config.target_index]}


@torch.no_grad()
def calibrate_hash_centre(model: CbirNet, x: torch.Tensor, device: torch.device, batch_size: int | None = None
                          ) -> None:
    """Set the hash layer's BatchNorm statistics to the exact mean and variance of its pre-activations on `x`
    (the unaugmented training images, eval-mode backbone), so each code bit's threshold is the training mean.

    A running average over a few short epochs still remembers the untrained network, and the codes of the
    saved model then come out nearly constant.
    """
    model.eval()
    assert model.hash_head is not None  # a hash model's
    norm: Any  # the BatchNorm1d, whose running statistics are tensors
    linear, norm = model.hash_head
    intensity = model.config.intensity
    batch_size = batch_size or inference_batch(device)
    outputs = [linear(model.projection(model.forward_features(model_input(x[i:i + batch_size].float(), intensity)
                                                              .to(device))))
               for i in range(0, len(x), batch_size)]
    values = torch.cat(outputs)
    norm.running_mean.copy_(values.mean(dim=0))
    norm.running_var.copy_(values.var(dim=0) if len(values) > 1 else torch.ones_like(norm.running_var))


def _bit_ones(codes: np.ndarray) -> dict[str, float]:
    """How often the bits are 1 on the validation images: the least and most often set bit, and the mean."""
    ones = codes.mean(axis=0)
    return {"min": float(ones.min()), "mean": float(ones.mean()), "max": float(ones.max())}


def batch_order(y: torch.Tensor, balanced: bool, generator: torch.Generator) -> torch.Tensor:
    """One epoch's image order: a shuffle, or (`balanced`) as many images of each label group as the largest
    one has, drawn without replacement while they last, interleaved at random."""
    if not balanced:
        return torch.randperm(len(y), generator=generator)
    groups = label_groups(y)
    members = [torch.nonzero(groups == g).flatten() for g in torch.unique(groups)]
    size = max(len(m) for m in members)
    drawn = []
    for m in members:
        repeats = math.ceil(size / len(m))
        drawn.append(torch.cat([m[torch.randperm(len(m), generator=generator)] for _ in range(repeats)])[:size])
    order = torch.cat(drawn)
    return order[torch.randperm(len(order), generator=generator)]


@torch.no_grad()
def _predict(model: CbirNet, x: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor,
             device: torch.device, batch_size: int | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """Validation probabilities (N, outputs), the mean BCE (the classification part only) and the codes."""
    model.eval()
    batch_size = batch_size or inference_batch(device)
    probs, codes, loss = [], [], 0.0
    for start in range(0, len(x), batch_size):
        out = model(model_input(x[start:start + batch_size].float(), model.config.intensity).to(device))
        target = y[start:start + batch_size].to(device)
        loss += float(F.binary_cross_entropy_with_logits(out.logits, target, pos_weight=pos_weight,
                                                         reduction="sum")) / target.shape[1]
        probs.append(torch.sigmoid(out.logits).cpu().numpy())
        codes.append(out.code.cpu().numpy())
    return np.concatenate(probs), loss / max(len(x), 1), np.concatenate(codes)
