"""`cbir pretrain`: learn a backbone from images without labels, and `cbir train --init RUN` to start from it.

The images come from any layout cbir reads (`cbir.data.layout.load_dataset`: rsna, nih, folder) or a plain folder;
labels are never read. Each step draws a batch, a second image per image from its patient (`PatientPairs`, where
the layout names patients, `cbir.data.patients`: a label file, a DICOM header's PatientID, or a matching file-name
rule), two `ssl_augment` views, and minimises the method's loss (`cbir.models.ssl`). The
run folder keeps the backbone only (backbone.safetensors) and a record (pretrain.json) with its sha256.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cbir.console import QUIET, Reporter
from cbir.data.layout import load_dataset
from cbir.data.records import Records
from cbir.data.transforms import INTENSITIES, model_input
from cbir.data.views import PatientPairs, ssl_augment
from cbir.errors import CbirError, DatasetError, failure_reasons
from cbir.io.digest import sha256_of
from cbir.models.device import place, resolve_device
from cbir.models.packaged import load_packaged, packaged_for
from cbir.models.ssl import METHODS, SSLModel
from cbir.train.preload import preload
from cbir.train.settings import TrainSettings

WEIGHTS = "backbone.safetensors"
RECORD = "pretrain.json"


@dataclass
class PretrainSettings:
    backbone: str = "resnet18"
    image_size: int = 64
    intensity: str = "standardize"
    #: "vicreg" or "simclr" (NT-Xent): VICReg had the higher mean kNN balanced accuracy on validation patients at
    #: an equal step budget (`cbir study ssl-method`, docs/results.md), by less than the noise.
    method: str = "vicreg"
    epochs: int = 10
    #: Stop (and finish the learning-rate schedule) after this many minutes; None: run all epochs.
    minutes: float | None = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    #: Probability that an image's second view is another image of its patient (when it has one).
    patient_p: float = 0.5
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    #: Start from random weights even when the backbone has packaged ImageNet weights (`cbir.models.packaged`),
    #: from which it starts otherwise: ImageNet continued on the user's X-rays.
    random_init: bool = False

    def validate(self) -> None:
        if self.method not in METHODS:
            raise CbirError(f"--method {self.method!r}: choose from {', '.join(METHODS)}")
        learnt = [name for name in INTENSITIES if name != "unit"]   # "unit" is a frozen encoder's
        if self.intensity not in learnt:
            raise CbirError(f"--intensity {self.intensity!r}: choose from {', '.join(learnt)}")
        if not 0 <= self.patient_p <= 1:
            raise CbirError(f"--patient-p {self.patient_p}: must be in [0, 1]")
        if self.minutes is not None and self.minutes <= 0:
            raise CbirError(f"--minutes {self.minutes}: must be positive")


@dataclass
class PretrainResult:
    out: Path
    sha256: str
    n_images: int
    failures: list[str] = field(default_factory=list)
    epochs: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def load_sources(roots: list[Path], reporter: Reporter = QUIET) -> tuple[list[Records], list[str | None]]:
    """Each root as its layout (detected: rsna, nih, folder), else every image under it (plain); and one patient
    key per image, namespaced by root, or None where its key does not group images (`Records.grouped_patients`:
    a file that is its own patient, or a DICOM without a usable PatientID)."""
    sources, keys = [], []
    for i, root in enumerate(roots):
        try:
            records = load_dataset(root, "auto")
        except DatasetError as exc:
            if "cannot tell the dataset layout" not in str(exc):
                raise
            records = load_dataset(root, "plain")
        grouped = records.grouped_patients()
        without = f"; {int((~grouped).sum())} images without one" if grouped.any() and not grouped.all() else ""
        reporter.log(f"{root}: {len(records)} images ({records.layout} layout; patients "
                     f"{'by ' + records.patient_rule if grouped.any() else 'unknown: augmentations only'}{without})")
        sources.append(records)
        keys += [f"{i}:{p}" if g else None for p, g in zip(records.meta["patient"].astype(str), grouped, strict=True)]
    return sources, keys


def pretrain(roots: list[Path], out: Path, settings: PretrainSettings, reporter: Reporter = QUIET
             ) -> PretrainResult:
    """Pretrain `settings.backbone` on every readable image under `roots` and write the run folder `out`."""
    started = time.perf_counter()
    settings.validate()
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    model = SSLModel(settings.backbone, settings.method, settings.temperature)   # a bad name fails early
    source = None if settings.random_init else packaged_for(settings.backbone)
    init = load_packaged(model.backbone, source) if source is not None else {"source": "random"}
    reporter.log(f"starting from packaged ImageNet weights ({source.package})" if source is not None
                 else "starting from random weights")
    place(model, device)
    sources, all_keys = load_sources(roots, reporter)
    images, keys, failures, offset = [], [], [], 0
    for records in sources:
        x, keep, failed = preload(records, settings.image_size, TrainSettings(workers=settings.workers), reporter,
                                  records.dataset)
        images.append(x)
        keys += [all_keys[offset + int(j)] for j in keep]
        failures += failed
        offset += len(records)
    x_all = torch.cat(images)
    pairs = PatientPairs(keys)
    n = len(x_all)
    if n < 2:
        raise DatasetError(f"only {n} readable image: pretraining needs at least 2")
    batch_size = min(settings.batch_size, n)
    reporter.log(f"pretraining {settings.backbone} ({settings.method}) on {n} images at {settings.image_size} px; "
                 f"{pairs.images_with_partner} have another image of their patient; {len(failures)} skipped")

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, n // batch_size)
    total = steps_per_epoch * settings.epochs
    budget = settings.minutes * 60 if settings.minutes else None
    generator = torch.Generator().manual_seed(settings.seed)
    history: list[dict[str, float]] = []
    step, t_train, done = 0, time.perf_counter(), False
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator)
        losses = []
        with reporter.task(f"pretrain epoch {epoch}", steps_per_epoch) as bar:
            for b in range(steps_per_epoch):
                progress = step / max(total, 1)
                if budget is not None:
                    progress = max(progress, (time.perf_counter() - t_train) / budget)
                if progress >= 1:
                    done = True
                    break
                for group in optimizer.param_groups:
                    group["lr"] = settings.lr * _schedule(progress)
                idx = order[b * batch_size:(b + 1) * batch_size]
                loss = pretrain_step(model, x_all, idx, pairs, generator, settings, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.advance(1)
        if losses:
            history.append({"epoch": epoch, "steps": len(losses), "loss": sum(losses) / len(losses),
                            "seconds": round(time.perf_counter() - t_train, 1)})
            reporter.log(f"pretrain epoch {epoch}: loss {history[-1]['loss']:.4f} ({len(losses)} steps, "
                         f"{history[-1]['seconds']:.0f} s)")
        if done:
            break
    seconds = round(time.perf_counter() - started, 1)
    sha = save_run(out, model, settings, {
        "init": init, "n_images": n, "n_failed": len(failures),
        "failure_reasons": failure_reasons(failures, [p for r in sources for p in r.meta["path"].astype(str)]),
        "steps": step,
        "epochs": round(step / steps_per_epoch, 2), "seconds": seconds,
        "train_seconds": round(time.perf_counter() - t_train, 1), "device": str(device), "history": history,
        "patients_with_pairs": pairs.images_with_partner,
        "sources": [{"dataset": r.dataset_id, "layout": r.layout, "images": len(r)} for r in sources]})
    return PretrainResult(out=out, sha256=sha, n_images=n, failures=failures, epochs=round(step / steps_per_epoch, 2),
                          steps=step, seconds=seconds, history=history)


def pretrain_step(model: SSLModel, x: torch.Tensor, idx: torch.Tensor, pairs: PatientPairs,
                  generator: torch.Generator, settings: PretrainSettings, device: torch.device) -> torch.Tensor:
    """The loss of one batch: view 1 of each image, view 2 of it or of another image of its patient."""
    second = pairs.partners(idx, generator, settings.patient_p)
    v1 = model_input(ssl_augment(x[idx].float(), generator), settings.intensity).to(device)
    v2 = model_input(ssl_augment(x[second].float(), generator), settings.intensity).to(device)
    return model.loss(v1, v2, pairs.groups[idx].to(device))


def _schedule(progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up over the first 5 % of the run, then cosine to 1 % of the peak."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    p = (progress - warmup) / (1 - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def save_run(out: Path, model: SSLModel, settings: PretrainSettings, extra: dict[str, Any]) -> str:
    """Write backbone.safetensors and pretrain.json (with the weights' sha256) to `out`; returns the sha256."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    sha = sha256_of(out / WEIGHTS)
    record = {"backbone": settings.backbone, "image_size": settings.image_size, "intensity": settings.intensity,
              "method": settings.method, "sha256": sha, **extra, "settings": asdict(settings)}
    (out / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return sha


def read_run(run: Path, backbone: str | None = None, option: str = "--init") -> dict[str, Any]:
    """The record of a pretraining run, checked: the folder, its record and weights exist, the weights' sha256 is
    the recorded one, and (given `backbone`) it is that backbone. One-line CbirError (naming `option`) otherwise."""
    record_path, weights = Path(run) / RECORD, Path(run) / WEIGHTS
    if not Path(run).is_dir():
        raise CbirError(f"{option} {run}: no such pretraining run folder")
    try:
        record = json.loads(record_path.read_text())
        recorded_sha, name = str(record["sha256"]), str(record["backbone"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CbirError(f"{option} {run}: not a `cbir pretrain` run ({RECORD} unreadable: "
                        f"{type(exc).__name__})") from None
    if not weights.is_file():
        raise CbirError(f"{option} {run}: {WEIGHTS} is missing")
    if sha256_of(weights) != recorded_sha:
        raise CbirError(f"{option} {run}: {WEIGHTS} is corrupt (its sha256 differs from the one in {RECORD})")
    if backbone is not None and name != backbone:
        raise CbirError(f"{option} {run}: it pretrained {name!r}, but this model's backbone is {backbone!r} "
                        f"(pass --backbone {name})")
    return record


def init_backbone(model: torch.nn.Module, run: Path, backbone: str) -> dict[str, Any]:
    """Load a pretraining run's backbone weights into `model.backbone` (a `CbirNet`'s); returns what the training
    record keeps of it (path, sha256, method, …)."""
    record = read_run(run, backbone)
    try:
        state = load_file(str(Path(run) / WEIGHTS))
        cast(torch.nn.Module, model.backbone).load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise CbirError(f"--init {run}: cannot load its weights into {backbone} "
                        f"({str(exc).strip().splitlines()[0][:140] if str(exc).strip() else type(exc).__name__})"
                        ) from None
    return {"run": str(run), "sha256": record["sha256"], "method": record.get("method"),
            "image_size": record.get("image_size"), "epochs": record.get("epochs"),
            "n_images": record.get("n_images")}
