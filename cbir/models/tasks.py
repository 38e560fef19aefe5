"""The four tasks, registered in `cbir.models.registry`: binary, hash and multilabel train a `CbirNet`
(`cbir.models.factory`), detection a `CbirDetector` (`cbir.models.detection`, imported only when one is built or
trained, since it loads torchvision's detection models).

    from cbir.models.tasks import TASKS, get_task, register_task
    get_task("hash").hash_layer   # True
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from cbir.data.transforms import AUGMENTATIONS, augment_with_boxes, model_input, standardize
from cbir.errors import CbirError
from cbir.models.detector_config import DETECTION_TASK, DetectorConfig
from cbir.models.factory import CbirNet, ModelConfig, ModelOutput, create_model
from cbir.models.losses import classification_loss
from cbir.models.registry import TASKS, Batch, Task, get_task, register_task

if TYPE_CHECKING:
    from cbir.data.records import Records
    from cbir.models.detection import CbirDetector

__all__ = ["TASKS", "Batch", "Task", "get_task", "register_task"]


# -- a CbirNet: binary, hash, multilabel ------------------------------------------------------------------


def target_column(records: Records) -> np.ndarray:
    """(N, 1): the binary target `records.y` (binary and hash)."""
    return records.y.astype(np.float32)[:, None]


def label_columns(records: Records) -> np.ndarray:
    """(N, C): the multi-hot `records.labels` (multilabel; with the RSNA layout the single Pneumonia column)."""
    return records.labels.astype(np.float32)


def classification_step(model: CbirNet, batch: Batch, generator: torch.Generator, settings: Any
                        ) -> dict[str, torch.Tensor]:
    """Augment (`settings.augment`), prepare the intensities, forward, `classification_loss`."""
    x = model_input(AUGMENTATIONS[settings.augment](batch.x, generator), model.config.intensity).to(batch.device)
    patients = None if batch.patients is None else batch.patients.to(batch.device)
    assert batch.target is not None and batch.pos_weight is not None
    return {"loss": classification_loss(model, model(x), batch.target.to(batch.device), batch.pos_weight, settings,
                                        patients)}


def classification_embed(model: CbirNet, config: ModelConfig, pixels: torch.Tensor) -> tuple[ModelOutput, None]:
    """The outputs on `config.intensity`-prepared inputs."""
    device = next(model.parameters()).device
    return model(model_input(pixels.float(), config.intensity).to(device)), None


# -- a CbirDetector: detection -------------------------------------------------------------------------------


def create_detector(config: DetectorConfig, pretrained: bool = False, weights: Path | None = None) -> nn.Module:
    """A randomly initialised `CbirDetector`: the detector trains from scratch."""
    if pretrained or weights:
        raise CbirError("the detection task trains from scratch: --pretrained and --weights are not supported yet")
    from cbir.models.detection import create_detector as create  # torchvision's detection models

    return create(config)


def image_target(records: Records) -> np.ndarray:
    """(N,): the image-level target `records.y`; the boxes are `records.meta["boxes"]`."""
    return records.y


def detection_loss(model: CbirDetector, x: torch.Tensor, targets: list[dict[str, torch.Tensor]]
                   ) -> dict[str, torch.Tensor]:
    """The detector's own losses (classification, bbox_regression, bbox_ctrness) for xyxy input-pixel boxes."""
    return model.loss(x, targets)


def detection_step(model: CbirDetector, batch: Batch, generator: torch.Generator, settings: Any
                   ) -> dict[str, torch.Tensor]:
    """Flip and jitter (boxes follow), standardise, `detection_loss`; "loss" is the sum of its parts."""
    assert batch.boxes is not None
    x, boxes = augment_with_boxes(batch.x, batch.boxes, generator)
    parts = detection_loss(model, standardize(x).to(batch.device), [{"boxes": b.to(batch.device)} for b in boxes])
    return {**parts, "loss": cast(torch.Tensor, sum(parts.values()))}  # a tensor: there are parts


def detection_embed(model: CbirDetector, config: DetectorConfig, pixels: torch.Tensor
                    ) -> tuple[ModelOutput, list[dict[str, torch.Tensor]]]:
    """The outputs and every detection above `score_thresh`, from one pass on standardised inputs."""
    device = next(model.parameters()).device
    return model.detect_all(standardize(pixels.float()).to(device))


_CLASSIFIER: dict[str, Any] = {"config_class": ModelConfig, "create": create_model, "loss": classification_loss,
                               "step": classification_step, "embed": classification_embed}
register_task(Task("binary", targets=target_column, **_CLASSIFIER))
register_task(Task("hash", targets=target_column, hash_layer=True, **_CLASSIFIER))
register_task(Task("multilabel", targets=label_columns, per_label=True, **_CLASSIFIER))
register_task(Task(DETECTION_TASK, DetectorConfig, create_detector, image_target, detection_loss, detection_step,
                   detection_embed, boxes=True, clip_grad=10.0))
