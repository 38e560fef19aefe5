"""`create_model(config)`: a timm backbone (in_chans=1) with embedding, classification and code heads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cbir.errors import CbirError

TASKS = ("binary",)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved as the checkpoint's config.json."""

    backbone: str = "resnet18"
    task: str = "binary"
    image_size: int = 224
    embed_dim: int = 128
    bits: int = 64
    label_names: list[str] = field(default_factory=lambda: ["Pneumonia"])
    target: str = "Pneumonia"
    drop_rate: float = 0.0
    code_seed: int = 0

    @property
    def num_outputs(self) -> int:
        return 1 if self.task == "binary" else len(self.label_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class ModelOutput(NamedTuple):
    embedding: torch.Tensor   # (B, embed_dim), L2-normalised
    logits: torch.Tensor      # (B, num_outputs)
    code: torch.Tensor        # (B, bits) of 0/1 (uint8)


class CbirNet(nn.Module):
    """Backbone → pooled features → embedding projection → (L2-normalised embedding, logits).

    Models without a trained hash layer get their codes by locality-sensitive hashing: the sign of a
    fixed random projection of the embedding, seeded by `code_seed` and stored in the checkpoint.
    """

    def __init__(self, config: ModelConfig, pretrained: bool = False, weights: Path | None = None) -> None:
        super().__init__()
        if config.task not in TASKS:
            raise CbirError(f"unknown task {config.task!r} (choose from {', '.join(TASKS)})")
        self.config = config
        self.backbone = _create_backbone(config, pretrained, weights)
        features = self.backbone.num_features
        self.embed = nn.Linear(features, config.embed_dim)
        self.classifier = nn.Linear(config.embed_dim, config.num_outputs)
        generator = torch.Generator().manual_seed(config.code_seed)
        projection = torch.randn(config.embed_dim, config.bits, generator=generator)
        self.register_buffer("code_projection", projection)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's unpooled feature map."""
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> ModelOutput:
        pooled = self.backbone.forward_head(features, pre_logits=True)
        z = self.embed(pooled)
        embedding = F.normalize(z, dim=1)
        code = (embedding @ self.code_projection > 0).to(torch.uint8)
        return ModelOutput(embedding, self.classifier(z), code)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.forward_head(self.forward_features(x))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


def create_model(config: ModelConfig, pretrained: bool = False, weights: Path | None = None) -> CbirNet:
    """Build the network for `config` (random init unless `pretrained` or local `weights`)."""
    return CbirNet(config, pretrained=pretrained, weights=weights)


def _create_backbone(config: ModelConfig, pretrained: bool, weights: Path | None) -> nn.Module:
    if config.backbone not in timm.list_models() and not timm.is_model(config.backbone):
        raise CbirError(f"unknown timm backbone {config.backbone!r} (see `timm.list_models()`)")
    kwargs: dict[str, Any] = {"in_chans": 1, "num_classes": 0, "drop_rate": config.drop_rate}
    if weights is not None:
        if not Path(weights).is_file():
            raise CbirError(f"{weights}: weights file not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        pretrained = True
    try:
        return timm.create_model(config.backbone, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained and weights is None:
            raise CbirError(
                f"cannot download pretrained weights for {config.backbone!r} (offline? {_brief(exc)}); "
                "train from scratch without --pretrained, or pass a local file with --weights"
            ) from None
        if weights is not None:
            raise CbirError(f"{weights}: cannot load weights into {config.backbone} ({_brief(exc)})") from None
        raise


def _brief(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:140]
