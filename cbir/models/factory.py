"""`create_model(config)`: a timm backbone (in_chans=1) with embedding, classification and code heads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cbir.data.transforms import INTENSITIES
from cbir.errors import CbirError
from cbir.models.appearance import Appearance, join
from cbir.models.registry import get_task
from cbir.models.stages import describe, features_and_stages, stage_names

HASH_BITS = (16, 256)
#: Config fields that only the hash task uses; left out of other tasks' config.json (and so fingerprints).
HASH_FIELDS = ("hash_pair_weight", "hash_quant_weight", "hash_balance_weight")
#: Config fields of the appearance part (`cbir.models.appearance`); left out of config.json when it is off, and
#: off for a config.json without them (a checkpoint written before it existed keeps its embedding).
APPEARANCE_FIELDS = ("appearance_size", "appearance_weight", "appearance_window")
#: How images are decoded for the model (`ModelConfig.decode`): in full, or grey JPEGs at reduced resolution.
DECODES = ("full", "reduced")
#: What the retrieval embedding's semantic part is (`ModelConfig.retrieval`).
RETRIEVALS = ("head", "encoder")


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
    hash_pair_weight: float = 1.0      # checked on real RSNA validation folds: docs/results.md
    hash_quant_weight: float = 0.5
    hash_balance_weight: float = 1.0
    #: How input intensities are prepared (`cbir.data.transforms.model_input`): "standardize" (per-image zero
    #: mean, unit variance), "equalize" (global histogram equalisation) or "clahe", each then standardised.
    #: Left out of config.json when "standardize", so checkpoints from before the field keep their fingerprint.
    intensity: str = "standardize"
    #: The embedding's appearance part (`cbir.models.appearance`): a tiny image of `appearance_size`² pixels with
    #: weight `appearance_weight` in the cosine; 0 = off. Chosen on validation patients (docs/results.md).
    appearance_size: int = 16
    appearance_weight: float = 0.5
    #: σ of its centre weighting, in half-widths (`cbir.models.appearance.centre_window`); 0 = flat.
    appearance_window: float = 1.0
    #: "full", or "reduced": grey 8-bit JPEGs (files and JPEG Baseline DICOMs) decoded by DCT scaling at 1/2–1/8
    #: of their size, never below `image_size` (`cbir.io.jpeg_draft`; other pixels differ slightly, faster). Part
    #: of the input contract: training, ingest and queries all decode the same way. Left out of config.json when
    #: "full", so checkpoints from before the field keep their fingerprint and their decoding.
    decode: str = "full"
    #: A frozen encoder from a local file (`cbir.models.encoder.EncoderSpec.to_dict`: file, sha256, format, input
    #: contract), used as the backbone instead of a timm model; None: a trained timm backbone. With one, the
    #: intensity is "unit" (the contract normalises) and `image_size` is the contract's. Left out when None.
    encoder: dict[str, Any] | None = None
    #: What the neighbours are found by: "head" (the trained projection, L2-normalised) or "encoder" (a frozen
    #: encoder's own pooled features, L2-normalised; only the classifier and codes learn). Left out when "head".
    retrieval: str = "head"

    @property
    def has_appearance(self) -> bool:
        return self.appearance_size > 0 and self.appearance_weight > 0

    @property
    def semantic_dim(self) -> int:
        """Length of the embedding's semantic part: the projection's, or the frozen encoder's features'."""
        return int((self.encoder or {})["num_features"]) if self.retrieval == "encoder" else self.embed_dim

    @property
    def vector_dim(self) -> int:
        """Length of the retrieval embedding: the semantic part, plus the appearance part when it is on."""
        return self.semantic_dim + (self.appearance_size ** 2 if self.has_appearance else 0)

    @property
    def num_outputs(self) -> int:
        """One logit for binary and hash (the target), one per label name for multilabel."""
        return len(self.label_names) if get_task(self.task).per_label else 1

    @property
    def target_index(self) -> int:
        """Column of the target's logit (multilabel: its position in `label_names`; otherwise 0)."""
        return self.label_names.index(self.target) if get_task(self.task).per_label else 0

    def validate(self) -> None:
        """Raise `CbirError` (one line) for an unknown task or intensity, a bad bit count or a target not in the
        labels."""
        task = get_task(self.task)
        if task.config_class is not ModelConfig:
            raise CbirError(f"task {self.task!r} does not train a CbirNet (its config is a "
                            f"{task.config_class.__name__})")
        if self.intensity not in INTENSITIES:
            raise CbirError(f"unknown intensity {self.intensity!r} (choose from {', '.join(INTENSITIES)})")
        if self.decode not in DECODES:
            raise CbirError(f"unknown decode {self.decode!r} (choose from {', '.join(DECODES)})")
        low, high = HASH_BITS
        if task.hash_layer and not low <= self.bits <= high:
            raise CbirError(f"--bits {self.bits} is outside {low}..{high} for the hash task")
        if task.per_label and self.target not in self.label_names:
            raise CbirError(f"target {self.target!r} is not one of the labels {self.label_names}")
        if self.retrieval not in RETRIEVALS:
            raise CbirError(f"unknown retrieval {self.retrieval!r} (choose from {', '.join(RETRIEVALS)})")
        if self.retrieval == "encoder" and self.encoder is None:
            raise CbirError("retrieval by the encoder's features needs a frozen encoder (--encoder FILE)")
        if self.encoder is not None:
            _validate_encoder(self)
        elif self.intensity == "unit":
            raise CbirError("intensity 'unit' (pixels as read) is a frozen encoder's; its contract normalises them")
        if self.appearance_size < 0 or not 0 <= self.appearance_weight < 1 or self.appearance_window < 0:
            raise CbirError(f"appearance size {self.appearance_size} / weight {self.appearance_weight} / window "
                            f"{self.appearance_window}: the size and window must be ≥ 0 and the weight in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not get_task(self.task).hash_layer:
            for name in HASH_FIELDS:
                data.pop(name)
        if not self.has_appearance:
            for name in APPEARANCE_FIELDS:
                data.pop(name)
        if self.intensity == "standardize":
            data.pop("intensity")
        if self.decode == "full":
            data.pop("decode")
        if self.encoder is None:
            data.pop("encoder")
        if self.retrieval == "head":
            data.pop("retrieval")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The config of a config.json; a field it lacks (older checkpoints: `intensity`, `decode`) takes its
        default ("full" for `decode`)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "appearance_size" not in known:
            known |= {"appearance_size": 0, "appearance_weight": 0.0, "appearance_window": 0.0}
        known.setdefault("appearance_window", 0.0)
        return cls(**known)


def _validate_encoder(config: ModelConfig) -> None:
    from cbir.models.encoder import EncoderSpec

    contract = EncoderSpec.from_dict(config.encoder or {}).contract
    if config.intensity != "unit":
        raise CbirError(f"intensity {config.intensity!r}: a frozen encoder takes unit pixels (its contract "
                        "normalises them)")
    if config.image_size != contract.size:
        raise CbirError(f"image size {config.image_size}: the encoder's input contract says {contract.size}")


def decode_size(config: Any) -> int | None:
    """What `cbir.io.read_image` takes as `reduce_to` for a model's inputs: its input size when its config says
    `decode="reduced"`, else None (full decode; also every detector)."""
    return config.image_size if getattr(config, "decode", "full") == "reduced" else None


class ModelOutput(NamedTuple):
    embedding: torch.Tensor   # (B, vector_dim), L2-normalised: the retrieval embedding
    logits: torch.Tensor      # (B, num_outputs)
    code: torch.Tensor        # (B, bits) of 0/1 (uint8)
    hash: torch.Tensor | None = None  # (B, bits) tanh-relaxed hash layer (task hash only), in (-1, 1)
    semantic: torch.Tensor | None = None  # (B, embed_dim), L2-normalised projection (what the losses train)
    pooled: torch.Tensor | None = None    # (B, num_features) the backbone's pooled features
    #: (B, p) what the out-of-domain warning measures (`cbir.models.stages`); None in training and for detectors
    domain: torch.Tensor | None = None


class CbirNet(nn.Module):
    """Backbone → pooled features → embedding projection → (L2-normalised embedding, logits).

    Task hash adds a hash layer `Linear(embed_dim → bits)` + BatchNorm on the (pre-normalisation) projection
    `z`, relaxed with tanh for training; its code is `h > 0`. Other tasks get their codes by locality-sensitive
    hashing: the sign of a fixed random projection of the embedding, seeded by `code_seed` and stored in the
    checkpoint. With an appearance part (`cbir.models.appearance`) the retrieval embedding joins the unit
    projection (`semantic`) and the input's centred tiny image; `forward_head` alone gives the semantic part.
    """

    backbone: Any  # a timm model: num_features, forward_features, forward_head
    code_projection: torch.Tensor  # a buffer

    def __init__(self, config: ModelConfig, pretrained: bool = False, weights: Path | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = _create_backbone(config, pretrained, weights)
        features = self.backbone.num_features
        self.embed = nn.Linear(features, config.embed_dim)
        self.classifier = nn.Linear(config.embed_dim, config.num_outputs)
        generator = torch.Generator().manual_seed(config.code_seed)
        projection = torch.randn(config.vector_dim, config.bits, generator=generator)
        self.register_buffer("code_projection", projection)
        self.hash_head = _hash_head(config) if get_task(config.task).hash_layer else None
        self.appearance = (Appearance(config.appearance_size, config.appearance_window) if config.has_appearance
                           else None)
        #: The feature stages whose averages the out-of-domain warning measures (`cbir.models.stages`).
        self.domain_stages = stage_names(self.backbone)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's unpooled feature map."""
        return self.backbone.forward_features(x)

    def projection(self, features: torch.Tensor) -> torch.Tensor:
        """The embedding projection `z` (before L2 normalisation) of a feature map."""
        return self.embed(self.backbone.forward_head(features, pre_logits=True))

    def forward_head(self, features: torch.Tensor) -> ModelOutput:
        """The semantic outputs of a feature map (the embedding without an appearance part)."""
        pooled = self.backbone.forward_head(features, pre_logits=True)
        z = self.embed(pooled)
        embedding = F.normalize(pooled if self.config.retrieval == "encoder" else z, dim=1)
        if self.hash_head is None:
            code = (embedding @ self.code_projection[:self.config.semantic_dim] > 0).to(torch.uint8)
            return ModelOutput(embedding, self.classifier(z), code, semantic=embedding, pooled=pooled)
        relaxed = torch.tanh(self.hash_head(z))
        return ModelOutput(embedding, self.classifier(z), (relaxed > 0).to(torch.uint8), relaxed, embedding, pooled)

    @property
    def domain_features(self) -> str:
        """Which features `ModelOutput.domain` holds (`cbir.models.stages.describe`)."""
        return describe(self.domain_stages)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if self.training:
            out = self.forward_head(self.forward_features(x))
        else:   # the same pass also gives the out-of-domain warning's features
            features, stages = features_and_stages(self.backbone, x, self.domain_stages)
            out = self.forward_head(features)
            assert out.pooled is not None
            out = out._replace(domain=stages if stages is not None else F.normalize(out.pooled.float(), dim=1))
        if self.appearance is None:
            return out
        embedding = join(out.embedding, self.appearance(x), self.config.appearance_weight)
        code = out.code if self.hash_head is not None else (embedding @ self.code_projection > 0).to(torch.uint8)
        return out._replace(embedding=embedding, code=code)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Independent sigmoid per output; the target's is column `config.target_index`."""
        return torch.sigmoid(logits)


def _hash_head(config: ModelConfig) -> nn.Sequential:
    """Linear(embed_dim → bits), then BatchNorm1d so that each bit's pre-activation is centred over the images.

    Without the centring, `z`'s common offset pushes most bits to one sign for every image and tanh saturates
    there, so the balance loss has no gradient left (measured: constant bits on synthetic RSNA). Training sets
    the statistics precisely after every epoch (`cbir.train.classifier.calibrate_hash_centre`), not by a running
    average.
    """
    return nn.Sequential(nn.Linear(config.embed_dim, config.bits), nn.BatchNorm1d(config.bits))


def create_model(config: ModelConfig, pretrained: bool = False, weights: Path | None = None) -> CbirNet:
    """Build the network for `config` (random init unless `pretrained` or local `weights`)."""
    return CbirNet(config, pretrained=pretrained, weights=weights)


def _create_backbone(config: ModelConfig, pretrained: bool, weights: Path | None) -> nn.Module:
    if config.encoder is not None:
        if pretrained or weights is not None:
            raise CbirError("--encoder: the frozen encoder brings its own weights (no --pretrained or --weights)")
        from cbir.models.encoder import EncoderSpec, FrozenEncoder

        return FrozenEncoder(EncoderSpec.from_dict(config.encoder))
    if not timm.is_model(config.backbone) and config.backbone not in timm.list_models():  # is_model: no sorting
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
                f"--pretrained downloads timm's weights for {config.backbone!r} and could not ({_brief(exc)}); "
                "offline, drop --pretrained to start from the packaged ImageNet weights (tf_efficientnet_lite0/1/2) "
                "or pass a local file with --weights FILE"
            ) from None
        if weights is not None:
            raise CbirError(f"{weights}: cannot load weights into {config.backbone} ({_brief(exc)})") from None
        raise


def _brief(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:140]
