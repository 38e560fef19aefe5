"""Train a `CbirDetector` on a `Records` dataset with boxes; keep the weights the selection rule picks
(`cbir.train.selection`; validation AUC for "best").

The image-level score is the detector's highest box score; validation AUC compares it with the binary
target, and the RSNA box mAP (`cbir.metrics_detection.box_map`, in original image pixels) is logged beside
it and breaks AUC ties. Each epoch also picks, on validation, the box score threshold with the best mAP;
the saved checkpoint records it as `box_threshold`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image

from cbir.console import QUIET, Reporter
from cbir.data.records import Records
from cbir.data.transforms import Geometry, standardize
from cbir.errors import BadInputError, CbirError, DatasetError
from cbir.io.image import sniff
from cbir.metrics import roc_auc
from cbir.metrics_detection import box_map
from cbir.models.checkpoint import write_split
from cbir.models.detection import (
    CbirDetector,
    DetectorConfig,
    boxes_to_input,
    boxes_to_original,
    create_detector,
    filter_detections,
    letterbox_geometry,
)
from cbir.models.device import resolve_device
from cbir.train.loop import TrainResult, TrainSettings, cosine_with_warmup, preload
from cbir.train.selection import EpochHook, Keeper

#: Box score thresholds tried on validation for the reported boxes.
BOX_THRESHOLDS = np.round(np.arange(0.1, 0.91, 0.05), 2)


@dataclass
class DetectionTrainResult(TrainResult):
    best_val_map: float = math.nan
    box_threshold: float = math.nan


@dataclass
class Split:
    x: torch.Tensor                 # (N, 1, S, S) float16 letterboxed, in [0, 1]
    y: np.ndarray                   # (N,) 0/1 targets
    geometries: list[Geometry]
    boxes: list[torch.Tensor]       # xyxy in input pixels, per image
    original: list[np.ndarray]      # [x, y, w, h] in original pixels, per image
    failures: list[str]


def original_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file from its header only (DICOM Rows/Columns, or Pillow's size)."""
    try:
        if sniff(path) == "dicom":
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
            return int(ds.Rows), int(ds.Columns)
        with Image.open(path) as img:
            return int(img.height), int(img.width)
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise BadInputError(path, f"cannot read the image size ({type(exc).__name__})") from None


def prepare_split(records: Records, size: int, settings: TrainSettings, reporter: Reporter, label: str) -> Split:
    """Decode a split once: letterboxed pixels, targets, geometries and boxes (input and original pixels)."""
    x, keep, failures = preload(records, size, settings, reporter, label)
    paths = records.meta["path"].to_numpy()[keep]
    geometries = [letterbox_geometry(*original_shape(p), size) for p in paths]
    original = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in records.meta["boxes"].to_numpy()[keep]]
    boxes = [torch.from_numpy(boxes_to_input(b, g)) for b, g in zip(original, geometries, strict=True)]
    return Split(x, records.y[keep], geometries, boxes, original, failures)


def train_detector(records: Records, config: DetectorConfig, settings: TrainSettings, out: Path,
                   reporter: Reporter = QUIET, epoch_hook: EpochHook | None = None) -> DetectionTrainResult:
    """Fit a detector on the train split's boxes (negatives included), keep the weights the selection rule
    picks, and write them with the split to `out`."""
    started = time.perf_counter()
    if settings.pretrained or settings.weights:
        raise CbirError("the detection task trains from scratch: --pretrained and --weights are not supported yet")
    records.require_labels("training")
    torch.manual_seed(settings.seed)
    device = resolve_device(settings.device)
    train, val = records.split("train"), records.split("val")
    if len(train) == 0:
        raise DatasetError(f"{records.root}: the train split is empty")
    if not any(len(b) for b in train.meta["boxes"]):
        raise DatasetError(f"{records.root}: no boxes in the train split (the detection task needs boxes)")
    if len(val) == 0:
        val = train.subset(np.arange(len(train)) % 10 == 0)
        reporter.warn("no validation split: using every 10th training image for model selection")
    tr = prepare_split(train, config.image_size, settings, reporter, "train")
    va = prepare_split(val, config.image_size, settings, reporter, "val")
    unboxed = np.flatnonzero((tr.y == 1) & np.array([len(b) == 0 for b in tr.boxes]))
    if len(unboxed):
        reporter.warn(f"{len(unboxed)} positive training images have no box: left out of detection training")
    use = np.setdiff1d(np.arange(len(tr.y)), unboxed)

    model = create_detector(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(use) / settings.batch_size)
    schedule = cosine_with_warmup(optimizer, steps_per_epoch * settings.epochs, warmup=steps_per_epoch)
    generator = torch.Generator().manual_seed(settings.seed)

    write_split(out, records.split_record())
    log_path = out / "metrics.jsonl"
    log_path.write_text("")
    by_auc = len(np.unique(va.y)) == 2
    if not by_auc and settings.select == "best":
        reporter.warn("the validation split has only one class: AUC is undefined, so the checkpoint is chosen "
                      "by validation box mAP")
    keeper = Keeper(model, settings.select, settings.ema, settings.ema_epochs, steps_per_epoch, out)
    best = {"auc": math.nan, "map": math.nan, "threshold": math.nan}
    history = []
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        losses = train_epoch(model, tr, use, optimizer, schedule, settings.batch_size, generator, device,
                             reporter, epoch, keeper.step)
        scored = keeper.kept
        if epoch_hook is not None:
            epoch_hook(epoch, model, keeper.ema_model)
        probs, detections = predict(scored, va.x, device)
        val_auc = roc_auc(va.y, probs)
        threshold, val_map = choose_box_threshold(detections, va.geometries, va.original)
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in losses.items()},
               "val_auc": None if math.isnan(val_auc) else val_auc,
               "val_map": None if math.isnan(val_map) else val_map, "box_threshold": threshold,
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        with log_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        safe_map = 0.0 if math.isnan(val_map) else val_map
        score = val_auc + 1e-6 * safe_map if by_auc else safe_map
        scored.config.box_threshold = float(threshold)
        kept = keeper.consider(epoch, score)
        if kept:
            best = {"auc": val_auc, "map": val_map, "threshold": threshold}
        reporter.log(f"epoch {epoch}/{settings.epochs}: train loss {losses['loss']:.4f}  "
                     f"val AUC {'n/a' if math.isnan(val_auc) else f'{val_auc:.4f}'}  "
                     f"val mAP {'n/a' if math.isnan(val_map) else f'{val_map:.4f}'} @ {threshold:.2f}"
                     f"{'  (kept)' if kept and settings.select == 'best' else ''}")
    result = DetectionTrainResult(
        out=out, fingerprint=keeper.fingerprint, best_epoch=keeper.best_epoch, best_val_auc=best["auc"],
        history=history,
        n_train=len(use), n_val=len(va.y), failures=tr.failures + va.failures,
        seconds=round(time.perf_counter() - started, 2), best_val_map=best["map"], box_threshold=best["threshold"])
    summary = {k: v for k, v in asdict(result).items() if k != "out"} | {
        "task": config.task,
        "best_val_auc": None if math.isnan(result.best_val_auc) else result.best_val_auc,
        "best_val_map": None if math.isnan(result.best_val_map) else result.best_val_map,
        "dataset": records.dataset, "layout": records.layout, "root": str(records.root),
        "settings": asdict(settings), "device": str(device)}
    (out / "train.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return result


def train_epoch(model: CbirDetector, data: Split, use: np.ndarray, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler | None, batch_size: int,
                generator: torch.Generator, device: torch.device, reporter: Reporter = QUIET,
                epoch: int = 1, after_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over `use` (indices into `data`); returns the mean of each FCOS loss and of their sum."""
    model.train()
    order = torch.from_numpy(use)[torch.randperm(len(use), generator=generator)]
    totals: dict[str, float] = {}
    seen = 0
    with reporter.task(f"epoch {epoch}", len(use)) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue  # batch norm needs two samples
            x, boxes = augment_with_boxes(data.x[idx].float(), [data.boxes[i] for i in idx.tolist()], generator)
            targets = [{"boxes": b.to(device)} for b in boxes]
            parts = model.loss(standardize(x).to(device), targets)
            loss = sum(parts.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            if after_step is not None:
                after_step()
            for key, value in {**parts, "loss": loss}.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) * len(idx)
            seen += len(idx)
            bar.advance(len(idx))
    return {k: v / max(seen, 1) for k, v in totals.items()}


def augment_with_boxes(x: torch.Tensor, boxes: list[torch.Tensor], generator: torch.Generator
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random horizontal flip (boxes follow) and gamma/contrast jitter of a (B, 1, S, S) batch in [0, 1]."""
    n, size = x.shape[0], x.shape[-1]
    rand = torch.rand(n, 3, generator=generator)
    flip = rand[:, 0] < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    out = []
    for b, f in zip(boxes, flip.tolist(), strict=True):
        out.append(torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], dim=1) if f and len(b) else b)
    gamma = torch.exp((rand[:, 1] * 2 - 1) * 0.25).view(-1, 1, 1, 1)
    x = x.clamp(0, 1) ** gamma
    contrast = (1 + (rand[:, 2] * 2 - 1) * 0.15).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean).clamp(0, 1), out


@torch.no_grad()
def predict(model: CbirDetector, x: torch.Tensor, device: torch.device, batch_size: int = 64
            ) -> tuple[np.ndarray, list[dict[str, torch.Tensor]]]:
    """Image scores (sigmoid of the image logit) and every detection above the model's `score_thresh`."""
    model.eval()
    probs, detections = [], []
    for start in range(0, len(x), batch_size):
        output, dets = model.detect_all(standardize(x[start:start + batch_size].float()).to(device))
        probs.append(torch.sigmoid(output.logits[:, 0]).cpu().numpy())
        detections.extend({k: v.cpu() for k, v in d.items()} for d in dets)
    return np.concatenate(probs), detections


def choose_box_threshold(detections: list[dict[str, torch.Tensor]], geometries: list[Geometry],
                         gt_original: list[np.ndarray], thresholds: np.ndarray = BOX_THRESHOLDS
                         ) -> tuple[float, float]:
    """(threshold, mAP): the box score threshold with the best RSNA mAP, boxes compared in original pixels."""
    best = (float(thresholds[0]), math.nan)
    for t in thresholds:
        kept = [filter_detections(d, float(t)) for d in detections]
        pred = [boxes_to_original(d["boxes"].numpy(), g) for d, g in zip(kept, geometries, strict=True)]
        value = box_map(pred, [d["scores"].numpy() for d in kept], gt_original)
        if not math.isnan(value) and (math.isnan(best[1]) or value > best[1]):
            best = (float(t), value)
    return best
