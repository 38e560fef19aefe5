"""Train a CbirNet (task binary, hash or multilabel) on a `Records` dataset; keep the weights that the
selection rule picks (`cbir.train.selection`)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cbir.console import QUIET, Reporter
from cbir.data.loading import iterate_batches
from cbir.data.records import Records
from cbir.data.transforms import AUGMENTATIONS, model_input
from cbir.errors import DatasetError
from cbir.metrics import per_class_auc, roc_auc
from cbir.models import CbirNet, ModelConfig, ModelOutput, create_model
from cbir.models.checkpoint import write_split
from cbir.models.device import resolve_device
from cbir.train.losses import hash_loss, positive_weights, supervised_contrastive_loss
from cbir.train.selection import EpochHook, Keeper

#: Largest BCE pos_weight for a rare class (multilabel).
MAX_POS_WEIGHT = 50.0


@dataclass
class TrainSettings:
    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    pretrained: bool = False
    weights: str | None = None
    #: "last": the last epoch of the schedule; "best": the epoch with the best validation score. "last" is the
    #: default: on real RSNA it checked as well as "best" on held-out validation patients, and its validation
    #: estimate was not optimistic (docs/results.md, "Model selection").
    select: str = "last"
    #: Keep an exponential moving average of the weights (time constant `ema_epochs`) and use it instead
    #: (measured level with the plain weights, so off by default).
    ema: bool = False
    ema_epochs: float = 1.0
    #: "basic" (`cbir.data.transforms.augment`) or "strong" (`augment_strong`: also window, resolution, blur,
    #: noise and JPEG re-encoding).
    augment: str = "basic"
    #: "none" or "supcon": a supervised contrastive loss on the embedding beside the classification loss
    #: (`cbir.train.losses.supervised_contrastive_loss`), weighted by `metric_weight`.
    metric_loss: str = "none"
    metric_weight: float = 1.0
    metric_temperature: float = 0.1
    #: Draw every batch with equally many images of each class (the minority repeated), instead of a shuffle.
    balanced: bool = False

    def validate(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)}, not {self.augment!r}")
        if self.metric_loss not in ("none", "supcon"):
            raise ValueError(f"metric_loss must be 'none' or 'supcon', not {self.metric_loss!r}")


@dataclass
class TrainResult:
    out: Path
    fingerprint: str
    best_epoch: int
    best_val_auc: float
    history: list[dict] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def preload(records: Records, size: int, settings: TrainSettings, reporter: Reporter,
            label: str) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Decode every image once into memory (float16), so epochs cost only the forward/backward pass."""
    images, keep, failures = [], [], []
    paths = records.meta["path"].tolist()
    with reporter.task(f"decode {label}", len(paths)) as bar:
        for batch in iterate_batches(paths, size, batch_size=64, workers=settings.workers):
            if batch.items:
                images.append(batch.pixels.half())
                keep.extend(item.index for item in batch.items)
            failures.extend(f"{f.path}: {f.reason}" for f in batch.failures)
            bar.advance(len(batch.items) + len(batch.failures))
    for line in failures:
        reporter.warn(line)
    if not keep:
        raise DatasetError(f"{records.root}: no readable images in the {label} split")
    return torch.cat(images), np.asarray(keep), failures


def targets_of(records: Records, task: str) -> np.ndarray:
    """Training targets: `records.y` as (N, 1) for binary and hash, the multi-hot `records.labels` (N, C) for
    multilabel (with the RSNA layout that is the single Pneumonia column)."""
    if task == "multilabel":
        return records.labels.astype(np.float32)
    return records.y.astype(np.float32)[:, None]


def _check_train_targets(records: Records, y: np.ndarray, task: str) -> None:
    positives = y.sum(axis=0)
    if task == "multilabel":
        if not ((positives > 0) & (positives < len(y))).any():
            raise DatasetError(f"{records.root}: no label has both classes in the train split")
    elif positives[0] == 0 or positives[0] == len(y):
        raise DatasetError(f"{records.root}: the train split has only one class of {records.target!r}")


def validation_scores(y_val: np.ndarray, prob: np.ndarray, config: ModelConfig) -> dict:
    """The selection AUC: ROC-AUC of the target (binary, hash), or the mean per-class AUC over the classes
    that have both values in validation (multilabel, which also reports each class's AUC; None = undefined)."""
    if config.task != "multilabel":
        return {"auc": roc_auc(y_val[:, 0], prob[:, 0])}
    aucs = per_class_auc(y_val, prob)
    defined = [a for a in aucs if not math.isnan(a)]
    return {"auc": float(np.mean(defined)) if defined else math.nan,
            "per_class": {name: None if math.isnan(a) else a for name, a in zip(config.label_names, aucs, strict=True)},
            "target": aucs[config.target_index]}


def train_model(records: Records, config: ModelConfig, settings: TrainSettings, out: Path,
                reporter: Reporter = QUIET, epoch_hook: EpochHook | None = None) -> TrainResult:
    """Fit `config` on the train split, keep the weights `settings.select`/`settings.ema` pick (validation AUC
    for "best"), and write the checkpoint, with the split it was trained on, to `out`.

    binary: class-weighted BCE on the target. hash: the same BCE plus the pairwise-likelihood,
    quantisation and bit-balance losses of `cbir.train.losses`, weighted by the config's `hash_*` fields.
    multilabel: BCE over every label with per-class pos_weight (neg/pos, at most 50; 1 for a class without
    positives), selected by the mean per-class validation AUC.
    """
    started = time.perf_counter()
    config.validate()
    settings.validate()
    records.require_labels("training")
    torch.manual_seed(settings.seed)
    device = resolve_device(settings.device)
    train, val = records.split("train"), records.split("val")
    if len(train) == 0:
        raise DatasetError(f"{records.root}: the train split is empty")
    if len(val) == 0:
        val = train.subset(np.arange(len(train)) % 10 == 0)
        reporter.warn("no validation split: using every 10th training image for model selection")
    x_train, keep_train, fail_train = preload(train, config.image_size, settings, reporter, "train")
    x_val, keep_val, fail_val = preload(val, config.image_size, settings, reporter, "val")
    y_train_np = targets_of(train, config.task)[keep_train]
    _check_train_targets(records, y_train_np, config.task)
    y_train = torch.from_numpy(y_train_np)
    patients = torch.from_numpy(np.unique(train.meta["patient"].astype(str).to_numpy()[keep_train],
                                          return_inverse=True)[1].astype(np.int64))
    y_val = targets_of(val, config.task)[keep_val]
    clip = MAX_POS_WEIGHT if config.task == "multilabel" else None
    # balanced batches already weigh the classes equally: class-weighting the loss too would count twice
    pos_weight = (torch.ones(y_train.shape[1]) if settings.balanced else positive_weights(y_train, clip)).to(device)

    model = create_model(config, pretrained=settings.pretrained,
                         weights=Path(settings.weights) if settings.weights else None).to(device)
    if model.appearance is not None:  # its mean depends on the training images only, not on the weights
        model.appearance.fit(x_train, lambda batch: model_input(batch, config.intensity))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(y_train) / settings.batch_size)
    schedule = cosine_with_warmup(optimizer, steps_per_epoch * settings.epochs, warmup=steps_per_epoch)
    generator = torch.Generator().manual_seed(settings.seed)

    write_split(out, records.split_record())
    log_path = out / "metrics.jsonl"
    log_path.write_text("")
    by_auc = bool(((y_val.min(axis=0) == 0) & (y_val.max(axis=0) == 1)).any()) if len(y_val) else False
    if not by_auc and settings.select == "best":
        what = "no label with both classes" if config.task == "multilabel" else f"one class of {records.target!r}"
        reporter.warn(f"the validation split has only {what}: AUC is undefined, so the checkpoint is chosen by "
                      "validation loss")
    keeper = Keeper(model, settings.select, settings.ema, settings.ema_epochs, steps_per_epoch, out)
    kept_auc, history = math.nan, []
    # epochs 0: only "epoch 0", the untrained network, scored and saved as it is (a baseline)
    for epoch in range(0 if settings.epochs == 0 else 1, settings.epochs + 1):
        t0 = time.perf_counter()
        train_loss = math.nan if epoch == 0 else _train_epoch(
            model, x_train, y_train, optimizer, schedule, pos_weight, settings, generator, device, reporter, epoch,
            keeper.step, patients)
        scored = keeper.kept
        if scored.hash_head is not None:
            calibrate_hash_centre(scored, x_train, device)
        if epoch_hook is not None:
            epoch_hook(epoch, model, keeper.ema_model)
        val_prob, val_loss, val_codes = _predict(scored, x_val, torch.from_numpy(y_val), pos_weight, device)
        scores = validation_scores(y_val, val_prob, config)
        val_auc = scores["auc"]
        row = {"epoch": epoch, "train_loss": None if math.isnan(train_loss) else train_loss, "val_loss": val_loss,
               "val_auc": None if math.isnan(val_auc) else val_auc, "lr": optimizer.param_groups[0]["lr"],
               "seconds": round(time.perf_counter() - t0, 2)}
        if "per_class" in scores:
            row["val_auc_per_class"] = scores["per_class"]
            row["val_target_auc"] = None if math.isnan(scores["target"]) else scores["target"]
        if config.task == "hash":
            row["val_bit_ones"] = _bit_ones(val_codes)
        history.append(row)
        with log_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        score = val_auc - 1e-9 * val_loss if by_auc else -val_loss  # loss breaks AUC ties
        kept = keeper.consider(epoch, score)
        if kept:
            kept_auc = val_auc
        reporter.log(f"epoch {epoch}/{settings.epochs}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                     f"val AUC {'n/a' if math.isnan(val_auc) else f'{val_auc:.4f}'}"
                     f"{'  (kept)' if kept and settings.select == 'best' else ''}")
    result = TrainResult(out=out, fingerprint=keeper.fingerprint, best_epoch=keeper.best_epoch, best_val_auc=kept_auc,
                         history=history, n_train=len(keep_train), n_val=len(keep_val),
                         failures=fail_train + fail_val, seconds=round(time.perf_counter() - started, 2))
    summary = {k: v for k, v in asdict(result).items() if k != "out"} | {
        "best_val_auc": None if math.isnan(result.best_val_auc) else result.best_val_auc,
        "dataset": records.dataset, "layout": records.layout, "root": str(records.root), "task": config.task,
        "settings": asdict(settings), "device": str(device)}
    (out / "train.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return result


@torch.no_grad()
def calibrate_hash_centre(model: CbirNet, x: torch.Tensor, device: torch.device, batch_size: int = 128) -> None:
    """Set the hash layer's BatchNorm statistics to the exact mean and variance of its pre-activations on `x`
    (the unaugmented training images, eval-mode backbone), so each code bit's threshold is the training mean.

    A running average over a few short epochs still remembers the untrained network, and the codes of the
    saved model then come out nearly constant.
    """
    model.eval()
    linear, norm = model.hash_head
    intensity = model.config.intensity
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


def _batch_loss(model: CbirNet, out: ModelOutput, target: torch.Tensor, pos_weight: torch.Tensor,
                settings: TrainSettings | None = None, patients: torch.Tensor | None = None) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(out.logits, target, pos_weight=pos_weight)
    if settings is not None and settings.metric_loss == "supcon" and patients is not None:
        loss = loss + settings.metric_weight * supervised_contrastive_loss(
            out.semantic, label_groups(target), patients, settings.metric_temperature)
    if out.hash is None:
        return loss
    c = model.config
    return loss + hash_loss(out.hash, target, c.hash_pair_weight, c.hash_quant_weight, c.hash_balance_weight)


def label_groups(target: torch.Tensor) -> torch.Tensor:
    """(B,) one integer per distinct row of 0/1 targets (B, C): images with the same labels share it."""
    weights = 2 ** torch.arange(target.shape[1], device=target.device, dtype=torch.float64)
    return (target.double() @ weights).long()


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


def _train_epoch(model: CbirNet, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, pos_weight: torch.Tensor,
                 settings: TrainSettings, generator: torch.Generator, device: torch.device,
                 reporter: Reporter, epoch: int, after_step: Callable[[], None] | None = None,
                 patients: torch.Tensor | None = None) -> float:
    model.train()
    order = batch_order(y, settings.balanced, generator)
    augment = AUGMENTATIONS[settings.augment]
    total, seen = 0.0, 0
    with reporter.task(f"epoch {epoch}", len(order)) as bar:
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            if len(idx) < 2:
                continue  # batch norm needs two samples
            batch = model_input(augment(x[idx].float(), generator), model.config.intensity).to(device)
            loss = _batch_loss(model, model(batch), y[idx].to(device), pos_weight, settings,
                               None if patients is None else patients[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if after_step is not None:
                after_step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.advance(len(idx))
    return total / max(seen, 1)


@torch.no_grad()
def _predict(model: CbirNet, x: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor,
             device: torch.device, batch_size: int = 128) -> tuple[np.ndarray, float, np.ndarray]:
    """Validation probabilities (N, outputs), the mean BCE (the classification part only) and the codes."""
    model.eval()
    probs, codes, loss = [], [], 0.0
    for start in range(0, len(x), batch_size):
        out = model(model_input(x[start:start + batch_size].float(), model.config.intensity).to(device))
        target = y[start:start + batch_size].to(device)
        loss += float(F.binary_cross_entropy_with_logits(out.logits, target, pos_weight=pos_weight,
                                                         reduction="sum")) / target.shape[1]
        probs.append(torch.sigmoid(out.logits).cpu().numpy())
        codes.append(out.code.cpu().numpy())
    return np.concatenate(probs), loss / max(len(x), 1), np.concatenate(codes)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total: int, warmup: int
                        ) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
