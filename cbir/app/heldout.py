"""Stage-1 figures that need the model itself rather than the index: per-finding AUC of a multilabel model
and box mAP of a detector, both on a held-out split of their own training data."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from cbir.console import QUIET, Reporter
from cbir.data.records import Records
from cbir.embed import embed_batches
from cbir.errors import DatasetError
from cbir.metrics import per_class_auc, roc_auc
from cbir.metrics_detection import box_map
from cbir.models import LoadedModel


def multilabel_auc(records: Records, loaded: LoadedModel, batch_size: int = 32, workers: int = 2
                   ) -> dict[str, Any]:
    """Per-label ROC-AUC (None where a label has one class) and their mean over `records`' images."""
    names = list(loaded.config.label_names)
    columns = [records.label_names.index(n) if n in records.label_names else -1 for n in names]
    truth, scores = [], []
    for embedded, _ in embed_batches(loaded, records.meta["path"].tolist(), batch_size, workers):
        for item in embedded:
            row = records.labels[item.index]
            truth.append([row[c] if c >= 0 else 0 for c in columns])
            scores.append(item.probabilities)
    if not truth:
        raise DatasetError(f"{records.root}: no readable images to score")
    aucs = per_class_auc(np.asarray(truth, dtype=np.int64), np.asarray(scores))
    defined = [a for a in aucs if not math.isnan(a)]
    return {"per_class_auc": {n: None if math.isnan(a) else a for n, a in zip(names, aucs, strict=True)},
            "mean_auc": float(np.mean(defined)) if defined else None, "n_images": len(truth)}


def detection_scores(records: Records, loaded: LoadedModel, batch_size: int = 32, workers: int = 2,
                     reporter: Reporter = QUIET) -> dict[str, Any]:
    """Box mAP (the RSNA metric, IoU 0.40–0.75, boxes compared in original pixels) at the checkpoint's box
    threshold, and the image-score ROC-AUC, over `records`' images."""
    from cbir.models.detection import CbirDetector, DetectorConfig, boxes_to_original, filter_detections
    from cbir.train.detection import predict, prepare_split
    from cbir.train.loop import TrainSettings

    split = prepare_split(records, loaded.config.image_size, TrainSettings(batch_size=batch_size, workers=workers),
                          reporter, "held-out")
    assert isinstance(loaded.model, CbirDetector) and isinstance(loaded.config, DetectorConfig)  # task.boxes
    device = next(loaded.model.parameters()).device
    probs, detections = predict(loaded.model, split.x, torch.device(device), batch_size)
    threshold = float(loaded.config.box_threshold)
    kept = [filter_detections(d, threshold) for d in detections]
    pred = [boxes_to_original(d["boxes"].numpy(), g) for d, g in zip(kept, split.geometries, strict=True)]
    value = box_map(pred, [d["scores"].numpy() for d in kept], split.original)
    auc = roc_auc(split.y, probs)
    return {"box_map": None if math.isnan(value) else value, "box_threshold": threshold,
            "roc_auc": None if math.isnan(auc) else auc, "n_images": len(split.y),
            "n_with_boxes": int(sum(len(b) > 0 for b in split.original))}
