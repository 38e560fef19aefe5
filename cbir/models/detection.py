"""`CbirDetector`: an FCOS box detector on a timm backbone (in_chans=1) with a feature pyramid.

Why FCOS. The detector has to train from random initialisation on a CPU at 64–256 px. FCOS is anchor-free
(one point per feature-map location, no anchor shapes or anchor/box IoU matching to tune for the small
input), its focal classification loss copes with images that have no box at all (RSNA negatives), and its
GroupNorm head does not depend on batch statistics, so it behaves the same at batch sizes of 8–32.
Checked on real RSNA validation folds (`cbir study detector`, docs/results.md; the test folds never loaded):
FCOS reached twice RetinaNet's box mAP, so it stays the default; `detector="retinanet"` (3 scales × 3 ratios
per level, GroupNorm head) is kept for that comparison. Faster R-CNN was not measured: its two stages cost
more per step on a CPU and give few useful proposals early in training from scratch.

Pieces: ``timm.create_model(backbone, features_only=True, in_chans=1)`` gives the maps at strides 8, 16 and
32 (`levels`); torchvision's `FeaturePyramidNetwork` turns them into `fpn_channels`-wide P3–P5; torchvision's
`FCOS` head (`head_convs` convolutions per branch) predicts one class ("opacity"), boxes and centre-ness.
The torchvision transform is set to the model size (`min_size = max_size = image_size`, so it never
resizes) and to mean 0 / std 1 on one channel: inputs are letterboxed (`cbir.data.transforms.letterbox`)
and per-image standardised (`standardize`) grey tensors, exactly like `CbirNet`'s.

For retrieval the detector mirrors `CbirNet`: `embed(x)` (= `forward(x)`) returns a `ModelOutput` whose
`embedding` is the pooled backbone features (each FPN map, P3–P5, globally max-pooled, concatenated and
L2-normalised: `embed_dim` = levels × `fpn_channels`, no learned projection), whose `code` is the sign of a
fixed seeded random projection of it (LSH, `bits` bits), and whose `logits` are the logit of the image score:
the highest box score over every candidate location, before the score threshold and NMS (so it is the score
of the best box `detect` returns whenever it returns one, and stays a continuous ranking score, without ties
at 0, when it returns none).

Boxes: `detect(x)` gives xyxy boxes in model-input pixels; `detect_original(x, geometries)` gives
[x, y, w, h] boxes in each original image's pixels (the `Records.meta["boxes"]` convention), mapped back
through the letterbox `Geometry`. A checkpoint is the usual directory (config.json with
``"task": "detection"``, model.safetensors, fingerprint), written by `cbir.models.checkpoint.save_checkpoint`
and read back by `cbir.models.checkpoint.load_detector`.

Why max pooling of the FPN maps. An opacity is local, so "is there an opacity-like response anywhere" is what
the embedding should keep, just as the image score is a maximum over locations. `pooling="avg"` and `"gem"`
(p = 3) are the alternatives; on real RSNA validation folds neither beat max pooling by more than the noise in
kNN balanced accuracy (`cbir study pooling`), so max stays the default.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, box_convert

from cbir.data.transforms import Geometry
from cbir.errors import CbirError
from cbir.models.detector_config import DETECTION_TASK, DETECTORS, EPS, POOLINGS, DetectorConfig
from cbir.models.factory import ModelOutput

__all__ = ["DETECTION_TASK", "DETECTORS", "EPS", "POOLINGS", "CbirDetector", "DetectorConfig", "create_detector"]

class _Backbone(nn.Module):
    """timm feature maps → FPN maps (an OrderedDict, as torchvision detectors expect)."""

    body: Any  # a timm features_only model, whose class depends on the backbone; each has `feature_info`

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        if config.backbone not in timm.list_models() and not timm.is_model(config.backbone):
            raise CbirError(f"unknown timm backbone {config.backbone!r} (see `timm.list_models()`)")
        try:
            self.body = timm.create_model(config.backbone, pretrained=False, features_only=True, in_chans=1,
                                          out_indices=tuple(config.levels))
        except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
            raise CbirError(f"{config.backbone}: no feature maps at levels {config.levels} ({exc})") from None
        self.channels = list(self.body.feature_info.channels())
        self.strides = [int(s) for s in self.body.feature_info.reduction()]
        self.fpn = FeaturePyramidNetwork(self.channels, config.fpn_channels)
        self.out_channels = config.fpn_channels

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))

    def pyramid(self, features: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((f"p{i}", f) for i, f in enumerate(features)))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.pyramid(self.features(x))


class CbirDetector(nn.Module):
    """FCOS on a timm backbone + FPN, with `CbirNet`'s retrieval outputs (see the module docstring)."""

    code_projection: torch.Tensor  # a buffer

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        backbone = _Backbone(config)
        common = dict(num_classes=1, min_size=config.image_size, max_size=config.image_size, image_mean=[0.0],
                      image_std=[1.0], score_thresh=config.score_thresh, nms_thresh=config.nms_thresh,
                      detections_per_img=config.detections_per_img)
        if config.detector == "fcos":
            self.anchors_per_location = 1
            anchors = AnchorGenerator(tuple((s,) for s in backbone.strides), ((1.0,),) * len(backbone.strides))
            self.detector = FCOS(backbone, anchor_generator=anchors,
                                 head=_fcos_head(config.fpn_channels, config.head_convs), **common)
        else:
            # RetinaNet: 3 scales × 3 aspect ratios per level, base size 4 × stride (as torchvision's defaults)
            self.anchors_per_location = 9
            sizes = tuple(tuple(4 * s * 2 ** (i / 3) for i in range(3)) for s in backbone.strides)
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(backbone.strides))
            self.detector = RetinaNet(backbone, anchor_generator=anchors,
                                      head=_retinanet_head(config.fpn_channels, self.anchors_per_location), **common)
        generator = torch.Generator().manual_seed(config.code_seed)
        self.register_buffer("code_projection", torch.randn(config.embed_dim, config.bits, generator=generator))

    @property
    def backbone(self) -> _Backbone:
        return self.detector.backbone

    # -- the shared pass ---------------------------------------------------------------------------------

    def _run(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None
             ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor] | list[dict[str, torch.Tensor]], torch.Tensor]:
        """One backbone pass: (FPN maps, losses when `targets` else detections, image-score logits)."""
        images = list(x)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, targets = self.detector.transform(images, targets)
        raw = self.backbone.features(image_list.tensors)
        pyramid = list(self.backbone.pyramid(raw).values())
        head = self.detector.head(pyramid)
        anchors = self.detector.anchor_generator(image_list, pyramid)
        per_level = [p.shape[2] * p.shape[3] * self.anchors_per_location for p in pyramid]
        fcos = self.config.detector == "fcos"
        scores = (torch.sqrt(torch.sigmoid(head["cls_logits"]) * torch.sigmoid(head["bbox_ctrness"])) if fcos
                  else torch.sigmoid(head["cls_logits"]))
        best = scores.flatten(1).max(dim=1).values.clamp(EPS, 1 - EPS)
        logits = torch.logit(best).view(-1, 1)
        if targets is not None:
            losses = (self.detector.compute_loss(targets, head, anchors, per_level) if fcos
                      else self.detector.compute_loss(targets, head, anchors))
            return pyramid, losses, logits
        split_head = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        detections = self.detector.postprocess_detections(split_head, split_anchors, image_list.image_sizes)
        detections = self.detector.transform.postprocess(detections, image_list.image_sizes, sizes)
        return pyramid, detections, logits

    def _output(self, pyramid: list[torch.Tensor], logits: torch.Tensor) -> ModelOutput:
        embedding = F.normalize(pool_pyramid(pyramid, self.config.pooling), dim=1)
        code = (embedding @ self.code_projection > 0).to(torch.uint8)
        return ModelOutput(embedding, logits, code)

    # -- public API --------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The FPN maps (P3… at the backbone's strides) of standardised (B, 1, S, S) inputs."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """(embedding, logits of the image score, LSH code), like `CbirNet`."""
        pyramid, _, logits = self._run(x)
        return self._output(pyramid, logits)

    def embed(self, x: torch.Tensor) -> ModelOutput:
        return self.forward(x)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def loss(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """FCOS losses (classification, bbox_regression, bbox_ctrness) for xyxy input-pixel `boxes`."""
        full = [{"boxes": t["boxes"], "labels": t.get("labels", torch.zeros(len(t["boxes"]), dtype=torch.int64,
                                                                             device=t["boxes"].device))}
                for t in targets]
        _, losses, _ = self._run(x, full)
        assert isinstance(losses, dict)  # with targets: the losses
        return losses

    def detect_all(self, x: torch.Tensor) -> tuple[ModelOutput, list[dict[str, torch.Tensor]]]:
        """Retrieval outputs and every detection above `score_thresh`, from one pass."""
        pyramid, detections, logits = self._run(x)
        assert isinstance(detections, list)  # without targets: the detections
        return self._output(pyramid, logits), [{"boxes": d["boxes"], "scores": d["scores"]} for d in detections]

    def detect(self, x: torch.Tensor, threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        """Per image, xyxy `boxes` in input pixels and their `scores`, best first, above `threshold`
        (the config's `box_threshold` when None; 0 keeps every box above `score_thresh`)."""
        threshold = self.config.box_threshold if threshold is None else threshold
        _, detections = self.detect_all(x)
        return [filter_detections(d, threshold) for d in detections]

    def detect_original(self, x: torch.Tensor, geometries: Sequence[Geometry], threshold: float | None = None
                        ) -> list[dict[str, np.ndarray]]:
        """Per image, [x, y, w, h] `boxes` in the original image's pixels (numpy) and `scores`."""
        if len(geometries) != len(x):
            raise ValueError(f"{len(geometries)} geometries for {len(x)} images")
        return [{"boxes": boxes_to_original(d["boxes"].cpu().numpy(), g), "scores": d["scores"].cpu().numpy()}
                for d, g in zip(self.detect(x, threshold), geometries, strict=True)]


def pool_pyramid(pyramid: Sequence[torch.Tensor], how: str = "max") -> torch.Tensor:
    """Each (B, C, H, W) map pooled over its locations, concatenated: (B, levels × C). `gem` is the
    generalised mean with p = 3 of the maps' non-negative part."""
    if how == "max":
        pooled = [level.amax(dim=(2, 3)) for level in pyramid]
    elif how == "avg":
        pooled = [level.mean(dim=(2, 3)) for level in pyramid]
    elif how == "gem":
        pooled = [level.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3) for level in pyramid]
    else:
        raise ValueError(f"unknown pooling {how!r}")
    return torch.cat(pooled, dim=1)


def _retinanet_head(channels: int, anchors: int) -> nn.Module:
    from functools import partial

    from torchvision.models.detection.retinanet import RetinaNetHead

    return RetinaNetHead(channels, anchors, num_classes=1, norm_layer=partial(nn.GroupNorm, 32))


def _fcos_head(channels: int, convs: int) -> nn.Module:
    from torchvision.models.detection.fcos import FCOSHead

    return FCOSHead(channels, num_anchors=1, num_classes=1, num_convs=convs)


def create_detector(config: DetectorConfig) -> CbirDetector:
    """A randomly initialised detector for `config`."""
    return CbirDetector(config)


def filter_detections(detection: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    keep = detection["scores"] >= threshold
    return {"boxes": detection["boxes"][keep], "scores": detection["scores"][keep]}


def image_score(detection: dict[str, Any]) -> float:
    """The image's highest box score (0 when it has no box)."""
    scores = detection["scores"]
    scores = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    return float(scores.max()) if scores.size else 0.0


# -- boxes ------------------------------------------------------------------------------------------------


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return box_convert(torch.from_numpy(boxes), "xywh", "xyxy").numpy()


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return box_convert(torch.from_numpy(boxes), "xyxy", "xywh").numpy()


def boxes_to_input(boxes: np.ndarray | list, geometry: Geometry, min_side: float = 1.0) -> np.ndarray:
    """Dataset [x, y, w, h] boxes in original pixels → xyxy in model-input pixels, clipped to the input;
    boxes narrower or shorter than `min_side` input pixels after clipping are dropped."""
    xyxy = np.clip(xywh_to_xyxy(geometry.to_input(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))),
                   0, geometry.size)
    keep = ((xyxy[:, 2] - xyxy[:, 0]) >= min_side) & ((xyxy[:, 3] - xyxy[:, 1]) >= min_side)
    return xyxy[keep]


def boxes_to_original(boxes: np.ndarray, geometry: Geometry) -> np.ndarray:
    """xyxy boxes in model-input pixels → [x, y, w, h] in original pixels, clipped to the original image."""
    xyxy = xywh_to_xyxy(geometry.to_original(xyxy_to_xywh(boxes)))
    xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, geometry.width)
    xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, geometry.height)
    return xyxy_to_xywh(xyxy)


def letterbox_geometry(height: int, width: int, size: int) -> Geometry:
    """The `Geometry` that `cbir.data.transforms.letterbox` gives an (height, width) image, without pixels."""
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return Geometry(int(height), int(width), size, scale, float((size - new_w) // 2), float((size - new_h) // 2))
