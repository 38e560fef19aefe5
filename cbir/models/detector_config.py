"""`DetectorConfig`: the config of a `CbirDetector` (`cbir.models.detection`), without its torchvision imports, so
that reading a checkpoint's config.json stays light."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cbir.errors import CbirError
from cbir.models.registry import get_task

DETECTION_TASK = "detection"
DETECTORS = ("fcos", "retinanet")
#: How the FPN maps become the embedding: global max, mean, or generalised mean (p = 3) per channel.
POOLINGS = ("max", "avg", "gem")
#: Probabilities are clamped to [EPS, 1 - EPS] before taking the logit, so logits stay finite.
EPS = 1e-6


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector; saved as the checkpoint's config.json.

    The first fields are those of `ModelConfig` (same names, same meaning), so code that reads a checkpoint's
    config for retrieval (image size, embedding size, bits, label names) works on both.
    """

    backbone: str = "resnet18"
    task: str = DETECTION_TASK
    image_size: int = 224
    bits: int = 64
    label_names: list[str] = field(default_factory=lambda: ["Pneumonia"])
    target: str = "Pneumonia"
    drop_rate: float = 0.0
    code_seed: int = 0
    detector: str = "fcos"
    box_class: str = "opacity"
    levels: list[int] = field(default_factory=lambda: [2, 3, 4])
    fpn_channels: int = 64
    head_convs: int = 2
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 20
    #: boxes scoring below this are dropped from reported detections (chosen on validation box mAP).
    box_threshold: float = 0.3
    pooling: str = "max"

    @property
    def embed_dim(self) -> int:
        """The embedding size: one max-pooled value per FPN channel and level."""
        return len(self.levels) * self.fpn_channels

    @property
    def vector_dim(self) -> int:
        """Length of the retrieval embedding (a detector has no appearance part)."""
        return self.embed_dim

    @property
    def num_outputs(self) -> int:
        return 1

    @property
    def target_index(self) -> int:
        """Column of the target's logit: the one image-score logit."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self) | {"embed_dim": self.embed_dim}
        if data["pooling"] == "max":
            del data["pooling"]  # the default: configs (and fingerprints) written before the field stay the same
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def validate(self) -> None:
        """Raise `CbirError` (one line) for a task other than a detector's, an unknown detector or pooling, or an
        FPN width that GroupNorm cannot split."""
        if get_task(self.task).config_class is not DetectorConfig:
            raise CbirError(f"a detector needs task {DETECTION_TASK!r}, not {self.task!r}")
        if self.detector not in DETECTORS:
            raise CbirError(f"unknown detector {self.detector!r} (choose from {', '.join(DETECTORS)})")
        groups = 16 if self.detector == "fcos" else 32
        if self.fpn_channels % groups:
            raise CbirError(f"fpn_channels must be a multiple of {groups} (GroupNorm), got {self.fpn_channels}")
        if self.pooling not in POOLINGS:
            raise CbirError(f"unknown pooling {self.pooling!r} (choose from {', '.join(POOLINGS)})")
