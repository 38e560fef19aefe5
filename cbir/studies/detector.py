"""Studies `detector` and `pooling`: FCOS against RetinaNet, and how the detector's FPN maps become an embedding.

`detector` trains both detectors per fold on the fold's training patients and scores them on its validation
patients: box mAP (RSNA metric), image-score AUC and kNN retrieval through `cbir evaluate`. `pooling` takes each
fold's FCOS model from that study (or trains one) and embeds the same images with global max, mean and GeM
pooling of the FPN maps, scored the same way. Test patients are never loaded.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cbir.console import QUIET, Reporter
from cbir.models import load_checkpoint
from cbir.models.detection import DETECTORS, POOLINGS, DetectorConfig
from cbir.models.device import resolve_device
from cbir.studies.common import (
    VERDICT_RULE,
    StudyOptions,
    development_records,
    finish,
    fmt_mean_sd,
    paired_verdict,
    register,
    score_on_validation,
)
from cbir.train import TrainSettings, train_model


def _trained(options: StudyOptions, records: Any, detector: str, out: Path, reporter: Reporter) -> Path:
    """A detector trained on the fold's training patients (kept if `out` already holds one of these settings)."""
    model_dir = out / "model"
    if (model_dir / "model.safetensors").is_file() and (model_dir / "train.json").is_file():
        saved = load_checkpoint(model_dir).config
        assert isinstance(saved, DetectorConfig)  # a detector study's model
        if (saved.detector, saved.backbone, saved.image_size) == (detector, options.backbone, options.image_size):
            return model_dir
    config = DetectorConfig(backbone=options.backbone, image_size=options.image_size, detector=detector,
                            label_names=list(records.label_names), target=records.target)
    settings = TrainSettings(epochs=options.epochs, batch_size=options.batch_size, device=options.device,
                             seed=options.seed)
    train_model(records, config, settings, model_dir, reporter)
    return model_dir


def _scores(report: dict[str, Any]) -> dict[str, Any]:
    s1, s2 = report["stage1"], report["stage2"]
    return {"box_map": s1.get("box_map"), "roc_auc": s1["roc_auc"], "knn_accuracy": s2["knn_accuracy"],
            "balanced_accuracy": s2["balanced_accuracy"], "map_at_k": s2["map_at_k"],
            "n_queries": report["n_queries"]}


@register("detector", lambda result, options: _render(result, options, "detector", _DETECTOR_TEXT))
def run_detector(options: StudyOptions, reporter: Reporter = QUIET) -> dict[str, Any]:
    runs = []
    for fold in options.fold_numbers:
        records = development_records(options, fold)
        for detector in DETECTORS:
            started = time.perf_counter()
            out = options.out / f"fold{fold}" / detector
            reporter.log(f"== detector {detector}, fold {fold}")
            model_dir = _trained(options, records, detector, out, reporter)
            loaded = load_checkpoint(model_dir, resolve_device(options.device))
            report = score_on_validation(records, loaded, out / "val-report", reporter=reporter)
            runs.append({"fold": fold, "detector": detector, **_scores(report),
                         "seconds": round(time.perf_counter() - started, 1)})
    result = {"study": "detector", "options": {k: str(v) for k, v in asdict(options).items()}, "runs": runs}
    return finish("detector", options, result, _render(result, options, "detector", _DETECTOR_TEXT))


@register("pooling", lambda result, options: _render(result, options, "pooling", _POOLING_TEXT))
def run_pooling(options: StudyOptions, reporter: Reporter = QUIET) -> dict[str, Any]:
    runs = []
    for fold in options.fold_numbers:
        records = development_records(options, fold)
        model_dir = _trained(options, records, "fcos", options.out / f"fold{fold}" / "fcos", reporter)
        for pooling in POOLINGS:
            loaded = load_checkpoint(model_dir, resolve_device(options.device))
            assert isinstance(loaded.config, DetectorConfig)  # `_trained` made a detector
            loaded.config.pooling = pooling  # the model's config object: its forward pass pools this way
            loaded.fingerprint = f"{loaded.fingerprint}-{pooling}"
            reporter.log(f"== pooling {pooling}, fold {fold}")
            report = score_on_validation(records, loaded, options.out / f"fold{fold}" / f"pool-{pooling}",
                                         reporter=reporter)
            runs.append({"fold": fold, "pooling": pooling, **_scores(report)})
    result = {"study": "pooling", "options": {k: str(v) for k, v in asdict(options).items()}, "runs": runs}
    return finish("pooling", options, result, _render(result, options, "pooling", _POOLING_TEXT))


_DETECTOR_TEXT: tuple[str, str] = ("### Detection: FCOS against RetinaNet (`cbir study detector`)",
                  "Both on the same timm backbone + FPN (P3–P5, 64 channels), same schedule and augmentation; "
                  "RetinaNet with 3 scales × 3 ratios per level.")
_POOLING_TEXT: tuple[str, str] = ("### Detection: pooling the FPN maps into the embedding (`cbir study pooling`)",
                 "The same trained FCOS model per fold; only the pooling of its FPN maps changes.")


def _render(result: dict[str, Any], options: StudyOptions, key: str, text: tuple[str, str]) -> str:
    runs = result["runs"]
    folds = sorted({r["fold"] for r in runs})
    lines = [text[0], "", f"{text[1]} {options.backbone} from scratch at {options.image_size} px, "
             f"{options.epochs} epochs, {len(folds)} of {options.folds} folds of `{options.data}`; each fold's "
             "validation patients query its training images (test patients never loaded). Mean ± sd over folds.",
             "", f"| {key} | box mAP | image-score ROC-AUC | kNN accuracy | kNN balanced accuracy | mAP@10 |",
             "|---|---:|---:|---:|---:|---:|"]
    names = list(dict.fromkeys(r[key] for r in runs))
    for name in names:
        mine = [r for r in runs if r[key] == name]
        lines.append(f"| {name} | " + " | ".join(fmt_mean_sd([r[m] for r in mine]) for m in
                                                ("box_map", "roc_auc", "knn_accuracy", "balanced_accuracy",
                                                 "map_at_k")) + " |")
    metric = "box_map" if key == "detector" else "balanced_accuracy"
    default = "fcos" if key == "detector" else "max"
    by_option = {n: {r["fold"]: r[metric] for r in runs if r[key] == n and r[metric] is not None} for n in names}
    paired, verdict = paired_verdict(by_option, default)
    what = "box mAP" if key == "detector" else "kNN balanced accuracy"
    lines += ["", f"Paired against the default {default} (same fold), {what} difference, mean ± sd over folds:", "",
              *paired, "", f"Kept as the default: **{verdict}**. {VERDICT_RULE}"]
    return "\n".join(lines)
