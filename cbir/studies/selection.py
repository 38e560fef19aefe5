"""Study `selection`: which weights to keep, measured on patients that did not choose them.

In each fold's development data (test patients dropped), the validation patients are cut in two halves by a
patient hash: half A plays the validation set that a rule may look at, half B checks the result. One binary
model is trained per fold with the default schedule; after every epoch both the trained weights and their
exponential moving average (EMA) are scored on A and B. Rules: the best epoch by A's AUC (raw or EMA), and the
last epoch of the schedule (raw or EMA). A rule holds up when its B AUC is high and its A estimate is not far
above B (optimism = A − B).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from cbir.console import QUIET, Reporter
from cbir.data.transforms import model_input
from cbir.metrics import roc_auc
from cbir.models import CbirNet, ModelConfig
from cbir.models.device import resolve_device
from cbir.studies.common import (
    VERDICT_RULE,
    StudyOptions,
    development_records,
    finish,
    fmt_mean_sd,
    halves,
    paired_verdict,
    register,
)
from cbir.train import TrainSettings, train_model
from cbir.train.loop import preload

RULES = {"best-raw": ("best", False), "last-raw": ("last", False), "best-ema": ("best", True),
         "last-ema": ("last", True)}
RULE_NAMES = {"best-raw": "best epoch by validation AUC", "last-raw": "last epoch of the schedule",
              "best-ema": "EMA weights, best epoch by validation AUC", "last-ema": "EMA weights, last epoch"}


@torch.no_grad()
def _probabilities(model: CbirNet, x: torch.Tensor, device: torch.device, batch_size: int = 128) -> np.ndarray:
    model.eval()
    intensity = model.config.intensity
    out = [torch.sigmoid(model(model_input(x[i:i + batch_size].float(), intensity).to(device)).logits[:, 0])
           .cpu().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def pick(curve_a: list[float], last: bool) -> int:
    """Index of the epoch a rule keeps: the last one, or the first with the best A score."""
    if last:
        return len(curve_a) - 1
    scores = [-math.inf if math.isnan(v) else v for v in curve_a]
    return int(np.argmax(scores))


@register("selection", lambda result, options: render(result, options))
def run_selection(options: StudyOptions, reporter: Reporter = QUIET) -> dict[str, Any]:
    device = resolve_device(options.device)
    settings = TrainSettings(epochs=options.epochs, batch_size=options.batch_size, device=options.device,
                             seed=options.seed, select="best", ema=True)
    folds = []
    for fold in options.fold_numbers:
        started = time.perf_counter()
        records = development_records(options, fold)
        val = records.split("val")
        x_val, keep, _ = preload(val, options.image_size, settings, reporter, "val (study)")
        half = halves(val)[keep]
        y = val.y[keep]
        curves: dict[str, list[float]] = {f"{w}_{h}": [] for w in ("raw", "ema") for h in ("a", "b")}

        def hook(epoch: int, raw: nn.Module, ema: nn.Module | None, x=x_val, half=half, y=y,
                 curves=curves) -> None:
            assert ema is not None  # settings.ema
            for name, model in (("raw", raw), ("ema", ema)):
                prob = _probabilities(cast(CbirNet, model), x, device)
                for h, part in (("a", 0), ("b", 1)):
                    curves[f"{name}_{h}"].append(roc_auc(y[half == part], prob[half == part]))

        config = ModelConfig(backbone=options.backbone, task="binary", image_size=options.image_size,
                             label_names=list(records.label_names), target=records.target)
        reporter.log(f"== selection study, fold {fold}: {len(records.split('train'))} train, {len(val)} val images "
                     f"({int((half == 0).sum())} in A, {int((half == 1).sum())} in B)")
        train_model(records, config, settings, options.out / f"fold{fold}", reporter, epoch_hook=hook)
        rules = {}
        for rule, (which, ema) in RULES.items():
            w = "ema" if ema else "raw"
            epoch = pick(curves[f"{w}_a"], which == "last")
            rules[rule] = {"epoch": epoch + 1, "auc_a": curves[f"{w}_a"][epoch], "auc_b": curves[f"{w}_b"][epoch]}
        folds.append({"fold": fold, "n_a": int((half == 0).sum()), "n_b": int((half == 1).sum()),
                      "positives_a": int(y[half == 0].sum()), "positives_b": int(y[half == 1].sum()),
                      "curves": curves, "rules": rules, "seconds": round(time.perf_counter() - started, 1)})
    result = {"study": "selection", "options": {k: str(v) for k, v in asdict(options).items()}, "folds": folds}
    return finish("selection", options, result, render(result, options))


def render(result: dict[str, Any], options: StudyOptions) -> str:
    folds = result["folds"]
    lines = [
        "### Model selection: which epoch to keep (`cbir study selection`)", "",
        f"{options.backbone} from scratch at {options.image_size} px, binary task, {options.epochs} epochs with the "
        f"default schedule, {len(folds)} of {options.folds} folds of `{options.data}` (test patients never "
        "loaded). Each fold's validation patients are halved: A is what a rule may look at, B checks it. "
        f"Validation is {options.val_fraction:g} of all patients; A and B hold "
        f"{', '.join(str(f['n_a']) + '/' + str(f['n_b']) for f in folds)} images per fold.", "",
        "| rule | epoch kept (per fold) | A AUC (the estimate) | B AUC (the check) | optimism A − B |",
        "|---|---|---:|---:|---:|",
    ]
    for rule in RULES:
        a = [f["rules"][rule]["auc_a"] for f in folds]
        b = [f["rules"][rule]["auc_b"] for f in folds]
        gap = [x - y for x, y in zip(a, b, strict=True)]
        epochs = ", ".join(str(f["rules"][rule]["epoch"]) for f in folds)
        lines.append(f"| {RULE_NAMES[rule]} | {epochs} | {fmt_mean_sd(a)} | {fmt_mean_sd(b)} | {fmt_mean_sd(gap)} |")
    lines += ["", "Paired against the last epoch (the same fold's B patients), B AUC difference, mean ± sd over folds:",
              ""]
    paired, verdict = paired_verdict({r: {f["fold"]: f["rules"][r]["auc_b"] for f in folds} for r in RULES},
                                     "last-raw", RULE_NAMES.__getitem__)
    lines += paired
    lines += ["", f"Kept as the default: **{RULE_NAMES[verdict]}**. {VERDICT_RULE} The last epoch is the default "
              "because it needs no validation set to pick it and its validation AUC is an honest estimate (its "
              "optimism is near 0). With about "
              f"{int(np.mean([f['n_b'] for f in folds]))} images in B per fold, one fold's AUC moves by about 0.05 "
              "by chance alone."]
    return "\n".join(lines)
