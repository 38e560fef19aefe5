"""The training data and validation of a `CbirDetector` (task detection) for `cbir.train.loop`: it trains on the
train split's boxes (negatives included) and keeps the weights the selection rule picks (`cbir.train.selection`;
validation AUC for "best").

The image-level score is the detector's highest box score; validation AUC compares it with the binary
target, and the RSNA box mAP (`cbir.metrics_detection.box_map`, in original image pixels) is logged beside
it and breaks AUC ties. Each epoch also picks, on validation, the box score threshold with the best mAP;
the saved checkpoint records it as `box_threshold`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image

from cbir.console import Reporter
from cbir.data.records import Records
from cbir.data.transforms import Geometry, standardize
from cbir.errors import BadInputError, DatasetError
from cbir.io.image import sniff
from cbir.metrics import roc_auc
from cbir.metrics_detection import box_map
from cbir.models.detection import (
    CbirDetector,
    DetectorConfig,
    boxes_to_input,
    boxes_to_original,
    filter_detections,
    letterbox_geometry,
)
from cbir.models.device import inference_batch
from cbir.models.registry import Batch, Task
from cbir.train.preload import preload
from cbir.train.settings import TrainResult, TrainSettings, Validation

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


class DetectorData:
    """The decoded train and validation images of a detector run with their boxes; the images whose boxes are
    missing are left out of training (`use`)."""

    result_class = DetectionTrainResult

    def __init__(self, tr: Split, va: Split, use: np.ndarray, device: torch.device) -> None:
        self.tr, self.va, self.use, self.device = tr, va, use, device
        self.n_train, self.n_val, self.failures = len(use), len(va.y), tr.failures + va.failures
        self.by_auc = len(np.unique(va.y)) == 2
        self.no_auc_warning = ("the validation split has only one class: AUC is undefined, so the checkpoint is "
                               "chosen by validation box mAP")
        self.unscored = {"best_val_auc": math.nan, "best_val_map": math.nan, "box_threshold": math.nan}

    @classmethod
    def check(cls, records: Records, train: Records) -> None:
        if not any(len(b) for b in train.meta["boxes"]):
            raise DatasetError(f"{records.root}: no boxes in the train split (the detection task needs boxes)")

    @classmethod
    def prepare(cls, records: Records, train: Records, val: Records, config: DetectorConfig, task: Task,
                settings: TrainSettings, reporter: Reporter, device: torch.device) -> DetectorData:
        tr = prepare_split(train, config.image_size, settings, reporter, "train")
        va = prepare_split(val, config.image_size, settings, reporter, "val")
        unboxed = np.flatnonzero((tr.y == 1) & np.array([len(b) == 0 for b in tr.boxes]))
        if len(unboxed):
            reporter.warn(f"{len(unboxed)} positive training images have no box: left out of detection training")
        return cls(tr, va, np.setdiff1d(np.arange(len(tr.y)), unboxed), device)

    def fit(self, model: CbirDetector) -> None:
        """Nothing depends on the training images alone."""

    def order(self, generator: torch.Generator) -> torch.Tensor:
        return torch.from_numpy(self.use)[torch.randperm(len(self.use), generator=generator)]

    def batch(self, idx: torch.Tensor) -> Batch:
        return Batch(self.tr.x[idx].float(), self.device, boxes=[self.tr.boxes[i] for i in idx.tolist()])

    def calibrate(self, model: CbirDetector) -> None:
        """Nothing to calibrate before scoring."""

    def validate(self, model: CbirDetector) -> Validation:
        """Image-score AUC and box mAP; the box threshold with the best mAP becomes the model's `box_threshold`."""
        probs, detections = predict(model, self.va.x, self.device)
        val_auc = roc_auc(self.va.y, probs)
        threshold, val_map = choose_box_threshold(detections, self.va.geometries, self.va.original)
        model.config.box_threshold = float(threshold)
        safe_map = 0.0 if math.isnan(val_map) else val_map
        return Validation(
            row={"val_auc": None if math.isnan(val_auc) else val_auc,
                 "val_map": None if math.isnan(val_map) else val_map, "box_threshold": threshold},
            extra={}, score=val_auc + 1e-6 * safe_map if self.by_auc else safe_map,
            best={"best_val_auc": val_auc, "best_val_map": val_map, "box_threshold": threshold},
            log=f"val AUC {'n/a' if math.isnan(val_auc) else f'{val_auc:.4f}'}  "
                f"val mAP {'n/a' if math.isnan(val_map) else f'{val_map:.4f}'} @ {threshold:.2f}")


@torch.no_grad()
def predict(model: CbirDetector, x: torch.Tensor, device: torch.device, batch_size: int | None = None
            ) -> tuple[np.ndarray, list[dict[str, torch.Tensor]]]:
    """Image scores (sigmoid of the image logit) and every detection above the model's `score_thresh`."""
    model.eval()
    batch_size = batch_size or inference_batch(device)
    probs: list[np.ndarray] = []
    detections: list[dict[str, torch.Tensor]] = []
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
