"""Checkpoints are directories: config.json, model.safetensors and a fingerprint file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cbir.errors import CbirError
from cbir.models.calibration import ProbabilityCalibration
from cbir.models.detector_config import DetectorConfig
from cbir.models.device import place
from cbir.models.domain import DOMAIN, DomainModel
from cbir.models.factory import CbirNet, ModelConfig, create_model
from cbir.models.registry import Task, get_task

if TYPE_CHECKING:
    from cbir.models.detection import CbirDetector  # loads torchvision's detection models

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FINGERPRINT = "fingerprint"
#: The split of the training data (`cbir.data.splits.split_record`); ingest and evaluate use it by default.
SPLIT = "split.json"


@dataclass
class LoadedModel:
    """A checkpoint's model in eval mode; `task` says what it does (`cbir.models.registry.Task`)."""

    model: CbirNet | CbirDetector  # the same forward() → ModelOutput and probabilities()
    config: ModelConfig | DetectorConfig
    fingerprint: str
    path: Path
    #: The training data's split record (None for a checkpoint written before splits were recorded).
    split: dict[str, Any] | None = None
    #: Whether a query is like the training images (`cbir.models.domain`); None: no domain.safetensors (older
    #: checkpoints, detectors) or one fitted for other weights.
    domain: DomainModel | None = None
    #: The target probability's calibration (`cbir.models.calibration`); None: the raw score (older checkpoints,
    #: detectors, or one fitted for other weights).
    calibration: ProbabilityCalibration | None = None

    @property
    def operating_point(self) -> float:
        """The probability from which the model says "target": the calibrated prevalence, or 0.5 uncalibrated."""
        return self.calibration.operating_point if self.calibration is not None else 0.5

    @property
    def described(self) -> str:
        """Backbone, embedding size and folder, for messages that name a model."""
        return f"{self.config.backbone}, dim {self.config.vector_dim}, at {self.path}"

    @property
    def task(self) -> Task:
        """The model's task (config.json stores its name)."""
        return get_task(self.config.task)


def fingerprint_of(config: ModelConfig | DetectorConfig, weights_file: Path) -> str:
    """sha256 over the config and the weight bytes: equal fingerprints mean identical outputs."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    with open(weights_file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def save_checkpoint(model: CbirNet | CbirDetector, out: Path) -> str:
    """Write the checkpoint directory and return its fingerprint."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    fingerprint = fingerprint_of(model.config, out / WEIGHTS)
    (out / FINGERPRINT).write_text(fingerprint + "\n")
    return fingerprint


def write_split(out: Path, record: dict[str, Any]) -> None:
    """Record the split of the training data in the checkpoint directory."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SPLIT).write_text(json.dumps(record, indent=2) + "\n")


def read_split(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / SPLIT).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise CbirError(f"{path / SPLIT}: unreadable split record ({exc})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model (a CbirNet, or a detector for task detection) in eval mode.

    Refuses a directory whose weights do not match its recorded fingerprint.
    """
    path = Path(path)
    if path.is_file() and path.name in (CONFIG, WEIGHTS, FINGERPRINT):
        path = path.parent
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise CbirError(f"{path}: not a cbir model (missing {name}; train one with `cbir train`)")
    try:
        config = _config(json.loads((path / CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise CbirError(f"{path / CONFIG}: unreadable model config ({exc})") from None
    fingerprint = fingerprint_of(config, path / WEIGHTS)
    recorded = (path / FINGERPRINT).read_text().strip() if (path / FINGERPRINT).is_file() else fingerprint
    if recorded != fingerprint:
        raise CbirError(f"{path}: weights do not match the recorded fingerprint ({recorded} ≠ {fingerprint})")
    try:
        state = load_file(str(path / WEIGHTS))
    except (RuntimeError, OSError) as exc:
        raise CbirError(f"{path / WEIGHTS}: cannot load weights ({str(exc).splitlines()[0][:140]})") from None
    model = _assigned_without_init(config, state)
    if model is None:
        try:
            model = _build(config)
        except (TypeError, AttributeError) as exc:
            raise CbirError(f"{path / CONFIG}: unreadable model config ({exc})") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CbirError(f"{path / WEIGHTS}: cannot load weights ({str(exc).splitlines()[0][:140]})") from None
    place(model, device).eval()
    return LoadedModel(cast("CbirNet | CbirDetector", model), config, fingerprint, path.resolve(), read_split(path),
                       read_domain(path, fingerprint, domain_features_of(model)),
                       ProbabilityCalibration.load(path, fingerprint))


def domain_features_of(model: nn.Module) -> str:
    """Which features `model` gives its domain model (`cbir.models.stages.describe`)."""
    return str(getattr(model, "domain_features", "pooled"))


def read_domain(path: Path, fingerprint: str, features: str = "pooled") -> DomainModel | None:
    """The checkpoint's domain model; None without one, with an earlier format, or when it was fitted for other
    weights or other features (a stale file)."""
    try:
        domain = DomainModel.load(path)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise CbirError(f"{path / DOMAIN}: unreadable domain model ({str(exc).splitlines()[0][:140]})") from None
    if domain is None or domain.fingerprint != fingerprint or domain.features != features:
        return None
    return domain


def _config(data: dict) -> Any:
    """The config (its task's `config_class`: ModelConfig, DetectorConfig) of a config.json's contents; a
    config.json without a task is a binary model's."""
    return _task_of(data).config_class.from_dict(data)


def _task_of(data: dict) -> Task:
    return get_task(data.get("task", ModelConfig.task))


def _build(config: Any) -> nn.Module:
    """A freshly initialised model for `config`."""
    return get_task(config.task).create(config)


def _assigned_without_init(config: Any, state: dict[str, torch.Tensor]) -> nn.Module | None:
    """A CbirNet built on the meta device with `state` assigned to it, which skips the random initialisation that
    the weights replace anyway (resnet18: 0.1–0.3 s of every `cbir query`; docs/performance.md). None, for the
    ordinary build, for a detector, a state that does not fit, or a backbone that keeps a tensor outside its state
    dict (a non-persistent buffer such as a relative-position index, or a tensor attribute), which would be left
    without values."""
    if not isinstance(config, ModelConfig) or config.encoder is not None:   # an encoder reads its own file
        return None
    try:
        with torch.device("meta"):
            model = create_model(config)
        # copies, not the loaded views into the file's buffer: those are not 64-byte aligned, and BLAS kernels
        # then round differently (measured: logits 1 ulp off), where the ordinary build's copies are bit-identical
        model.load_state_dict({name: tensor.clone() for name, tensor in state.items()}, assign=True)
    except Exception:  # noqa: BLE001 - whatever went wrong, the ordinary build says it properly
        return None
    for module in model.modules():
        tensors = [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
            return None
    return model


def is_detector_checkpoint(path: str | Path) -> bool:
    """Whether `path` (a checkpoint directory or a file in one) holds a model whose task finds boxes."""
    path = Path(path)
    config = (path.parent if path.is_file() else path) / CONFIG
    try:
        return _task_of(json.loads(config.read_text())).boxes
    except (OSError, json.JSONDecodeError, AttributeError, CbirError):
        return False


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """`load_checkpoint` for a checkpoint that must hold a detector."""
    if (Path(path) / CONFIG).is_file() and not is_detector_checkpoint(path):
        task = json.loads((Path(path) / CONFIG).read_text()).get("task")
        raise CbirError(f"{path}: a {task!r} model, not a detector")
    return load_checkpoint(path, device)
