"""The training loop of every task: fit a model (`cbir.models.tasks`) on a `Records` dataset, score it on
validation after each epoch and keep the weights that the selection rule picks (`cbir.train.selection`).

The task decides the data (`cbir.train.classifier.ClassifierData`, `cbir.train.detection.DetectorData`: decoded
images, targets, validation), the model and its training step; the loop owns the rest: epochs, optimiser,
schedule, model selection, metrics.jsonl, train.json and the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from cbir.console import QUIET, Reporter
from cbir.data.records import Records
from cbir.errors import CbirError, DatasetError
from cbir.models.checkpoint import save_checkpoint, write_split
from cbir.models.device import place, resolve_device
from cbir.models.registry import Batch, Task, get_task
from cbir.train.calibration_fit import fit_calibration
from cbir.train.classifier import ClassifierData
from cbir.train.detection import DetectorData
from cbir.train.domain_fit import fit_domain
from cbir.train.preload import preload
from cbir.train.selection import EpochHook, Keeper
from cbir.train.settings import EMA_WITH_ENCODER, TrainResult, TrainSettings, Validation
from cbir.train.transfer import from_scratch, hold_frozen, optimiser_groups, set_trainable, trained_groups

if TYPE_CHECKING:
    from cbir.models.detection import CbirDetector
    from cbir.models.factory import CbirNet

#: Validation scores closer than this are a tie (`Validation.score` breaks AUC ties by 1e-9 × the loss).
TIE = 1e-6
#: Run n of `settings.average_runs` draws its batches from seed `settings.seed + RUN_SEED_STRIDE × n`.
RUN_SEED_STRIDE = 1000

__all__ = ["TrainResult", "TrainSettings", "average_states", "cosine_with_warmup", "preload", "train_epoch",
           "train_model"]


class TaskData(Protocol):
    """What the loop needs of a task's training data (see `ClassifierData`)."""

    result_class: type[TrainResult]
    n_train: int
    n_val: int
    failures: list[str]
    by_auc: bool
    no_auc_warning: str
    unscored: dict[str, float]

    def fit(self, model: nn.Module) -> None: ...
    def order(self, generator: torch.Generator) -> torch.Tensor: ...
    def batch(self, idx: torch.Tensor) -> Batch: ...
    def calibrate(self, model: nn.Module) -> None: ...
    def validate(self, model: nn.Module) -> Validation: ...


def task_data(task: Task) -> Any:
    """The training-data class of `task`: a detector's boxes, or a classifier's targets."""
    return DetectorData if task.boxes else ClassifierData


def train_model(records: Records, config: Any, settings: TrainSettings, out: Path,
                reporter: Reporter = QUIET, epoch_hook: EpochHook | None = None) -> TrainResult:
    """Fit `config` (a `ModelConfig` or `DetectorConfig`) on the train split, keep the weights
    `settings.select`/`settings.ema` pick (validation AUC for "best"), and write the checkpoint, with the split it
    was trained on, to `out`. `settings.epochs` 0 scores and saves the untrained network (a baseline)."""
    started = time.perf_counter()
    task = get_task(config.task)
    config.validate()
    settings.validate()
    settings.check_task(task)
    records.require_labels("training")
    torch.manual_seed(settings.seed)
    device = resolve_device(settings.device)
    train, val = records.split("train"), records.split("val")
    if len(train) == 0:
        raise DatasetError(f"{records.root}: the train split is empty")
    kind = task_data(task)
    kind.check(records, train)
    if len(val) == 0:
        val = train.subset(np.arange(len(train)) % 10 == 0)
        reporter.warn("no validation split: using every 10th training image for model selection")
    data: TaskData = kind.prepare(records, train, val, config, task, settings, reporter, device)

    model = place(task.create(config, pretrained=settings.pretrained,
                              weights=Path(settings.weights) if settings.weights else None), device)
    initialised = _init_from(model, task, config, settings, reporter) or _packaged_init(model, config, settings,
                                                                                        reporter)
    requested = settings
    encoder = getattr(config, "encoder", None)
    fine_tuned = bool(initialised or settings.pretrained or settings.weights)
    if not (fine_tuned or encoder):
        settings = from_scratch(settings, reporter)
    if settings.ema is None:   # the measured recipes: EMA weights when fine-tuning pretrained weights, else plain
        settings = replace(settings, ema=fine_tuned and not encoder)
    elif settings.ema and encoder:
        raise CbirError(EMA_WITH_ENCODER)
    data.fit(model)
    write_split(out, records.split_record())
    log_path = out / "metrics.jsonl"
    log_path.write_text("")
    if not data.by_auc and settings.select == "best":
        reporter.warn(data.no_auc_warning)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()} if settings.average_runs > 1 else None
    runs: list[Run] = []
    for number in range(settings.average_runs):
        if start is not None and number:
            model.load_state_dict(start)   # every run starts from the same weights, heads included
        runs.append(_fit_run(model, task, data, settings, number, out, log_path, reporter, epoch_hook))
    kept = runs[0] if len(runs) == 1 else _average_runs(model, data, runs, out, log_path, reporter)
    history = [row for run in runs for row in run.history] + (kept.history if len(runs) > 1 else [])
    result = data.result_class(out=out, fingerprint=kept.fingerprint, best_epoch=kept.best_epoch,
                               history=history, n_train=data.n_train, n_val=data.n_val, failures=data.failures,
                               seconds=round(time.perf_counter() - started, 2), **kept.best)
    summary = {k: v for k, v in asdict(result).items() if k != "out"} | {
        **{k: _finite(v) for k, v in kept.best.items() if k.startswith("best_")},
        "dataset": records.dataset, "dataset_id": records.dataset_id, "layout": records.layout,
        "root": str(records.root), "task": config.task,
        "settings": asdict(requested), "device": str(device), **({"init": initialised} if initialised else {}),
        **({"effective_settings": asdict(settings)} if settings != requested else {})}
    fit_domain(out, data, device, reporter)   # domain.safetensors: the query's out-of-domain warning
    fit_calibration(out, data, device, reporter)   # calibration.json: what the shown probability means
    (out / "train.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return result


@dataclass
class Run:
    """One training run's outcome: the weights it kept, their validation and its metrics.jsonl rows."""

    fingerprint: str
    best_epoch: int
    best: dict[str, float]
    history: list[dict[str, Any]]
    state: dict[str, torch.Tensor]
    #: The kept weights' validation score (`Validation.score`: higher is better).
    score: float


def _fit_run(model: nn.Module, task: Task, data: TaskData, settings: TrainSettings, number: int, out: Path,
             log_path: Path, reporter: Reporter, epoch_hook: EpochHook | None) -> Run:
    """One run of the epoch schedule from `model`'s current weights; run `number` draws its batches (order and
    augmentation) from seed `settings.seed + 1000 × number`. Its kept weights are written to `out`."""
    groups = optimiser_groups(model, settings.lr, settings.layer_decay, settings.unfreeze)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(data.n_train / settings.batch_size)
    probe = settings.probe_epochs   # LP-FT: the heads alone first, on frozen features (`cbir.train.transfer`)
    schedule = cosine_with_warmup(optimizer, steps_per_epoch * (probe or settings.epochs), warmup=steps_per_epoch)
    generator = torch.Generator().manual_seed(settings.seed + RUN_SEED_STRIDE * number)
    keeper = Keeper(model, settings.select, bool(settings.ema), settings.ema_epochs, steps_per_epoch, out,
                    keep_state=settings.average_runs > 1)
    tag = {"run": number + 1} if settings.average_runs > 1 else {}
    prefix = f"run {number + 1}/{settings.average_runs}, " if tag else ""
    best, history, score = dict(data.unscored), [], -math.inf
    # epochs 0: only "epoch 0", the untrained network, scored and saved as it is (a baseline)
    for epoch in range(0 if settings.epochs == 0 else 1, settings.epochs + 1):
        t0 = time.perf_counter()
        if probe and epoch == probe + 1:   # the probe is over: the last `unfreeze` groups join, schedule afresh
            schedule = cosine_with_warmup(optimizer, steps_per_epoch * (settings.epochs - probe),
                                          warmup=steps_per_epoch)
        phase = replace(settings, unfreeze=trained_groups(settings, epoch))
        set_trainable(model, phase.unfreeze)
        losses = {"loss": math.nan} if epoch == 0 else train_epoch(
            model, task, data, optimizer, schedule, phase, generator, reporter, epoch, keeper.step)
        scored = keeper.kept
        data.calibrate(scored)
        if epoch_hook is not None:
            epoch_hook(epoch, model, keeper.ema_model)
        scores = data.validate(scored)
        row = {**tag, "epoch": epoch, **{f"train_{k}": _finite(v) for k, v in losses.items()}, **scores.row,
               "lr": optimizer.param_groups[-1]["lr"], "seconds": round(time.perf_counter() - t0, 2), **scores.extra}
        history.append(row)
        _append(log_path, row)
        kept = keeper.consider(epoch, scores.score)
        if kept:
            best, score = scores.best, scores.score
        reporter.log(f"{prefix}epoch {epoch}/{settings.epochs}: train loss {losses['loss']:.4f}  {scores.log}"
                     f"{'  (kept)' if kept and settings.select == 'best' else ''}")
    return Run(keeper.fingerprint, keeper.best_epoch, best, history, keeper.state, score)


def _average_runs(model: nn.Module, data: TaskData, runs: list[Run], out: Path, log_path: Path,
                  reporter: Reporter) -> Run:
    """Load the mean of the runs' kept weights into `model` (`average_states`), score it on validation and write
    it to `out`: one model, at one model's inference cost. Where the mean validates below every run, the runs did
    not share a basin (a small or hard training set): the run that validates best is kept instead, and a warning
    says so (the guard of greedy soups, Wortsman et al. 2022, reduced to its extreme case)."""
    t0 = time.perf_counter()
    model.load_state_dict(average_states([run.state for run in runs]))
    data.calibrate(model)
    scores = data.validate(model)
    epoch = max(run.best_epoch for run in runs)
    row = {"run": "average", "epoch": epoch, **scores.row, "seconds": round(time.perf_counter() - t0, 2),
           **scores.extra}
    _append(log_path, row)
    reporter.log(f"the average of {len(runs)} runs' weights: {scores.log}")
    rows = [row]
    if all(scores.score < run.score - TIE for run in runs):   # a tie (the loss tie-breaker aside) keeps the mean
        number, best = max(enumerate(runs, 1), key=lambda item: item[1].score)
        model.load_state_dict(best.state)
        data.calibrate(model)
        scores = data.validate(model)
        rows.append({"run": "kept", "from_run": number, "epoch": best.best_epoch, **scores.row, **scores.extra})
        _append(log_path, rows[-1])
        reporter.warn(f"the average of {len(runs)} runs' weights validates below every run (the runs may not share "
                      f"a basin: a small or hard training set): run {number}, the best on validation, is kept")
        epoch = best.best_epoch
    fingerprint = save_checkpoint(cast("CbirNet | CbirDetector", model), out)
    return Run(fingerprint, epoch, scores.best, rows, {}, scores.score)


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors across `states` (same keys and shapes); integer tensors
    (BatchNorm's step counters) are taken from the first."""
    return {key: torch.stack([s[key].float() for s in states]).mean(0).to(first.dtype)
            if first.is_floating_point() else first.clone() for key, first in states[0].items()}


def _append(log_path: Path, row: dict[str, Any]) -> None:
    with log_path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def _init_from(model: nn.Module, task: Task, config: Any, settings: TrainSettings, reporter: Reporter
               ) -> dict[str, Any] | None:
    """`settings.init`: load a `cbir pretrain` run's backbone into `model`; what train.json records of it."""
    if not settings.init:
        return None
    if task.boxes:
        raise CbirError("--init: the detector trains from scratch; --init is for binary, hash and multilabel")
    if settings.pretrained or settings.weights:
        raise CbirError("--init replaces --pretrained/--weights: give one of them")
    from cbir.train.pretrain import init_backbone
    record = init_backbone(model, Path(settings.init), config.backbone)
    reporter.log(f"backbone initialised from {settings.init} ({record['method']}, sha256 {record['sha256'][:16]})")
    return record


def _packaged_init(model: nn.Module, config: Any, settings: TrainSettings, reporter: Reporter
                   ) -> dict[str, Any] | None:
    """With no weight option: the packaged ImageNet weights that fit the backbone (`cbir.models.packaged`), if
    any; what train.json records of them. A detector and a frozen encoder keep their own weights."""
    if (settings.random_init or settings.pretrained or settings.weights or settings.init
            or getattr(config, "encoder", None) is not None or get_task(config.task).boxes):
        return None
    from cbir.models.packaged import load_packaged, packaged_for
    source = packaged_for(config.backbone)
    if source is None:
        reporter.log(f"note: no packaged weights fit {config.backbone}: random init (--pretrained downloads timm's, "
                     "--weights FILE loads a local file)")
        return None
    backbone: Any = model.backbone
    record = load_packaged(backbone, source)
    reporter.log(f"backbone initialised from packaged ImageNet weights: {source.package} {record['version']} "
                 f"(sha256 {source.sha256[:16]}, {source.licence})")
    return record


def train_epoch(model: nn.Module, task: Task, data: TaskData, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler | None, settings: TrainSettings,
                generator: torch.Generator, reporter: Reporter = QUIET, epoch: int = 1,
                after_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over `data.order(generator)` in batches of `settings.batch_size` with the task's training step;
    returns the mean of each loss part and of their sum ("loss")."""
    model.train()
    hold_frozen(model, settings.unfreeze, settings.freeze_bn)
    order = data.order(generator)
    totals: dict[str, float] = {}
    seen = 0
    with reporter.task(f"epoch {epoch}", len(order)) as bar:
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            if len(idx) < 2:
                continue  # batch norm needs two samples
            parts = task.step(model, data.batch(idx), generator, settings)
            loss = parts["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if task.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip_grad)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            if after_step is not None:
                after_step()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) * len(idx)
            seen += len(idx)
            bar.advance(len(idx))
    totals.setdefault("loss", 0.0)  # no batch of two
    return {k: v / max(seen, 1) for k, v in totals.items()}


def _finite(value: Any) -> Any:
    """None for a NaN (JSON has no NaN), the value otherwise."""
    return None if isinstance(value, float) and math.isnan(value) else value


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total: int, warmup: int
                        ) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
