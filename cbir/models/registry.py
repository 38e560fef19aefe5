"""The task registry, timm-style: `register_task(Task(...))` adds a task, `get_task(name)` finds it.

A task is what `cbir train --task` names and a checkpoint's config.json stores (as its name, a string): how the
labels become training targets, the model and its config, the loss and the training step, and how a loaded
model embeds a batch. The four tasks (binary, hash, multilabel, detection) are registered by
`cbir.models.tasks`, which `cbir.models` imports, so they are known whenever a model can be built or loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cbir.errors import CbirError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

#: (model, config, pixels) → (a `cbir.models.factory.ModelOutput`, the detections or None): `pixels` is a
#: (B, 1, S, S) batch in [0, 1], letterboxed; `config` is the loaded model's (its input intensities).
Embed = Callable[[Any, Any, "torch.Tensor"], "tuple[Any, list[dict[str, torch.Tensor]] | None]"]


class TaskConfig(Protocol):
    """What a task's config class (`ModelConfig`, `DetectorConfig`) has."""

    task: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Batch:
    """One training batch as a task's step gets it (before augmentation)."""

    x: torch.Tensor                          # (B, 1, S, S) float in [0, 1], on the CPU
    device: torch.device
    target: torch.Tensor | None = None       # (B, outputs) 0/1 targets (classification)
    pos_weight: torch.Tensor | None = None   # (outputs,) BCE positive weights, on `device`
    patients: torch.Tensor | None = None     # (B,) patient numbers (the supervised contrastive loss)
    boxes: list[torch.Tensor] | None = None  # per image, xyxy boxes in input pixels (detection)


@dataclass(frozen=True)
class Task:
    """One training task; behaviour switches read its attributes, never its name."""

    name: str
    #: The config dataclass of its models (`ModelConfig` or `DetectorConfig`), with `from_dict`/`to_dict`.
    config_class: type[TaskConfig]
    #: The model factory: (config, pretrained=False, weights=None) → a freshly initialised model.
    create: Callable[..., nn.Module]
    #: How labels become targets: `Records` → (N, outputs) float32 for a classifier, (N,) 0/1 for a detector.
    targets: Callable[[Any], np.ndarray]
    #: The loss the step minimises (its arguments depend on the model: outputs and targets, or inputs and boxes).
    loss: Callable[..., Any]
    #: One training step's losses on a batch: (model, Batch, generator, settings) → {part: loss, "loss": total}.
    step: Callable[..., dict[str, torch.Tensor]]
    #: How a loaded model embeds a batch.
    embed: Embed
    #: One output per label name (else one: the target).
    per_label: bool = False
    #: A trained hash layer makes the codes (else locality-sensitive hashing of the embedding).
    hash_layer: bool = False
    #: The model finds boxes (a detector): boxes in query answers, box metrics, box training data.
    boxes: bool = False
    #: Gradient-norm clipping of every step (None: none).
    clip_grad: float | None = None


#: Every registered task by name, in registration order.
TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task` to `TASKS`; a name can be registered once."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task `name`; a one-line `CbirError` listing the known tasks otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise CbirError(f"unknown task {name!r} (choose from {', '.join(TASKS)})") from None
