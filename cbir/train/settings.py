"""What a training run is given (`TrainSettings`) and what it returns (`TrainResult`), for every task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbir.data.transforms import AUGMENTATIONS
from cbir.io.policy import DEFAULT_READER, ReaderPolicy

if TYPE_CHECKING:
    from cbir.models.registry import Task

#: The default backbone and input size of `cbir train` (with `TrainSettings`' defaults, the default recipe):
#: EfficientNet-Lite0 from packaged ImageNet weights (`cbir.models.packaged`), its last 3 groups fine-tuned at
#: 224 px. Chosen on the shift proxies and validation patients, never on test patients (docs/results.md,
#: "Transfer from ImageNet").
DEFAULT_BACKBONE = "tf_efficientnet_lite0"
DEFAULT_IMAGE_SIZE = 224
#: The recipe before issue 24: resnet18 from random weights at 128 px, all layers, 15 epochs.
#: Why `ema` is refused with a frozen encoder (checked by `cbir train` before the data is read, and by the loop).
EMA_WITH_ENCODER = ("--ema: a frozen --encoder cannot be copied for the average, and only the heads train on it; "
                    "drop --ema")
SCRATCH_RECIPE: dict[str, Any] = {"backbone": "resnet18", "image_size": 128, "random_init": True, "unfreeze": -1,
                                  "freeze_bn": False, "layer_decay": 1.0, "epochs": 15}


@dataclass
class TrainSettings:
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    device: str = "auto"
    workers: int = 2
    #: What the readers accept while the images are decoded (`cbir.app.settings.Settings.reader`).
    reader: ReaderPolicy = DEFAULT_READER
    seed: int = 0
    pretrained: bool = False
    weights: str | None = None
    #: "last": the last epoch of the schedule; "best": the epoch with the best validation score. "last" is the
    #: default: on real RSNA it checked as well as "best" on held-out validation patients, and its validation
    #: estimate was not optimistic (docs/results.md, "Model selection").
    select: str = "last"
    #: Keep an exponential moving average of the weights (time constant `ema_epochs`) and use it instead.
    #: None: on when a backbone is fine-tuned from pretrained weights (the default recipe: its vote held up against
    #: its own model on the shift proxies with two seeds, docs/results.md); off from random weights (measured level
    #: there; the detector's recipe was measured without it) and for a frozen `--encoder` (only the heads train).
    ema: bool | None = None
    ema_epochs: float = 1.0
    #: "basic" (`cbir.data.transforms.augment`) or "strong" (`augment_strong`: also window, resolution, blur,
    #: noise and JPEG re-encoding).
    augment: str = "basic"
    #: "none" or "supcon": a supervised contrastive loss on the embedding beside the classification loss
    #: (`cbir.models.losses.supervised_contrastive_loss`), weighted by `metric_weight`.
    metric_loss: str = "none"
    metric_weight: float = 1.0
    metric_temperature: float = 0.1
    #: Draw every batch with equally many images of each class (the minority repeated), instead of a shuffle.
    balanced: bool = False
    #: A `cbir pretrain` run folder whose backbone weights start the training (`cbir.train.pretrain`).
    init: str | None = None
    #: Start from random weights even where packaged ImageNet weights fit the backbone (`cbir.models.packaged`).
    random_init: bool = False
    #: How many of the backbone's last coarse groups train (-1: all; 0: a frozen backbone), their learning rates
    #: (`layer_decay` per group towards the stem) and whether its BatchNorm statistics stay (`cbir.train.transfer`).
    unfreeze: int = 3
    layer_decay: float = 0.7
    freeze_bn: bool = True
    #: The first `probe_epochs` of `epochs` train the heads alone, on frozen features; then the last `unfreeze`
    #: groups join, with a fresh warm-up and cosine schedule (`cbir.train.transfer`, LP-FT). 0: none.
    probe_epochs: int = 0
    #: Train this many runs from the same start, differing only in batch order and augmentation draws, and keep
    #: the mean of their weights (`cbir.train.loop.average_states`): a weight-averaged ensemble at one model's
    #: inference cost. 1: one run.
    average_runs: int = 1

    def validate(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)}, not {self.augment!r}")
        if self.metric_loss not in ("none", "supcon"):
            raise ValueError(f"metric_loss must be 'none' or 'supcon', not {self.metric_loss!r}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], not {self.layer_decay}")
        if self.unfreeze < -1:
            raise ValueError(f"unfreeze must be -1 (all), 0 (none) or a number of groups, not {self.unfreeze}")
        if not 0 <= self.probe_epochs < max(self.epochs, 1):
            raise ValueError(f"probe_epochs must be in 0..epochs − 1 ({self.epochs - 1}), not {self.probe_epochs}")
        if self.average_runs < 1 or self.average_runs > 1 and self.epochs == 0:
            raise ValueError(f"average_runs must be 1, or more with epochs ≥ 1, not {self.average_runs}")
        if self.random_init and (self.pretrained or self.weights or self.init):
            raise ValueError("random_init excludes pretrained, weights and init")

    def check_task(self, task: Task) -> None:
        """Refuse the options that `task` cannot use: they would be ignored, yet recorded in train.json."""
        if task.boxes and (self.augment, self.metric_loss, self.balanced) != ("basic", "none", False):
            raise ValueError("--augment/--metric-loss/--balanced: the detector has its own box-aware augmentation, "
                             "no metric loss and no class batches; they are for binary and hash (multilabel: all "
                             "but --balanced)")
        if task.per_label and self.balanced:  # one batch group per label combination: epochs would balloon
            raise ValueError(f"--balanced draws equally many images of each label combination: not for {task.name}, "
                             "whose classes are weighted in the loss (drop --balanced)")


@dataclass
class TrainResult:
    out: Path
    fingerprint: str
    best_epoch: int
    best_val_auc: float
    history: list[dict] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Validation:
    """One epoch's validation of the kept weights, as a task's training data scores it."""

    #: metrics.jsonl fields after the training losses ("val_loss", "val_auc", …) and after "lr"/"seconds".
    row: dict[str, Any]
    extra: dict[str, Any]
    #: The selection score (`cbir.train.selection.Keeper.consider`): higher is better.
    score: float
    #: The `TrainResult` fields that the epoch gives when its weights are kept ("best_val_auc", …).
    best: dict[str, float]
    #: The epoch's log line after the training loss.
    log: str
