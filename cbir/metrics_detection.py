"""Box metrics: IoU (torchvision.ops) and the RSNA Pneumonia Detection Challenge mean average precision.

Boxes are [x, y, w, h] (the `Records.meta["boxes"]` convention) unless `xyxy=True`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import box_convert
from torchvision.ops import box_iou as _torchvision_box_iou

__all__ = ["RSNA_THRESHOLDS", "box_iou", "box_map", "image_precision"]

#: IoU thresholds of the RSNA challenge: 0.40, 0.45, …, 0.75.
RSNA_THRESHOLDS = np.round(np.arange(0.4, 0.76, 0.05), 2)


def _as_xyxy(boxes: np.ndarray | Sequence, xyxy: bool) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(b).all():
        raise ValueError("boxes contain NaN or infinite values")
    return b.copy() if xyxy else box_convert(torch.from_numpy(b), "xywh", "xyxy").numpy()


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (len(a) × len(b)) of xyxy boxes (torchvision's, in float64); empty or inverted boxes have
    IoU 0, where torchvision gives NaN or a meaningless value."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iou = _torchvision_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    proper_a = (a[:, 2] > a[:, 0]) & (a[:, 3] > a[:, 1])
    proper_b = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return np.where(proper_a[:, None] & proper_b[None, :], np.nan_to_num(iou), 0.0)


def image_precision(pred_boxes: np.ndarray, pred_scores: np.ndarray | None, gt_boxes: np.ndarray,
                    thresholds: Sequence[float] | np.ndarray = RSNA_THRESHOLDS, xyxy: bool = False) -> float:
    """One image's RSNA score: the mean over IoU thresholds t of TP / (TP + FP + FN).

    Predictions are taken by descending score; each is a hit when its IoU with a still unmatched ground-truth
    box is greater than t (it takes the unmatched box it overlaps most). Returns NaN for an image with
    neither ground truth nor predictions (the challenge skips it) and 0 for predictions on an image without
    ground truth.
    """
    pred = _as_xyxy(pred_boxes, xyxy)
    gt = _as_xyxy(gt_boxes, xyxy)
    if pred_scores is not None:
        scores = np.asarray(pred_scores, dtype=np.float64).ravel()
        if scores.shape != (len(pred),):
            raise ValueError(f"{scores.size} scores for {len(pred)} predicted boxes")
        pred = pred[np.argsort(-scores, kind="stable")]
    if len(gt) == 0:
        return float("nan") if len(pred) == 0 else 0.0
    if len(pred) == 0:
        return 0.0
    iou = box_iou(pred, gt)
    values = []
    for t in thresholds:
        matched = np.zeros(len(gt), dtype=bool)
        tp = 0
        for row in iou:
            candidates = np.where(~matched & (row > t), row, -1.0)
            j = int(np.argmax(candidates))
            if candidates[j] > t:
                matched[j] = True
                tp += 1
        fp, fn = len(pred) - tp, len(gt) - tp
        values.append(tp / (tp + fp + fn))
    return float(np.mean(values))


def box_map(pred_boxes: Sequence[np.ndarray], pred_scores: Sequence[np.ndarray] | None,
            gt_boxes: Sequence[np.ndarray], thresholds: Sequence[float] | np.ndarray = RSNA_THRESHOLDS,
            xyxy: bool = False) -> float:
    """The RSNA challenge metric over images: the mean of `image_precision` over the images that count
    (NaN when none does). `pred_scores` may be None when each image's boxes are already best first."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} images of predictions for {len(gt_boxes)} of ground truth")
    if pred_scores is not None and len(pred_scores) != len(pred_boxes):
        raise ValueError(f"{len(pred_scores)} images of scores for {len(pred_boxes)} of boxes")
    values = [image_precision(p, None if pred_scores is None else s, g, thresholds, xyxy)
              for p, s, g in zip(pred_boxes, pred_scores if pred_scores is not None else [None] * len(pred_boxes),
                                 gt_boxes, strict=True)]
    counted = [v for v in values if not np.isnan(v)]
    return float(np.mean(counted)) if counted else float("nan")
