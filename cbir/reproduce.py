"""`cbir reproduce`: the seed's table by patient-level k-fold cross-validation.

For each fold i of k (`cbir.data.splits.SplitSpec`: patient p is in fold ⌊u(p)·k⌋ + 1), every approach trains
on the other folds (their validation share included), ingests the whole dataset into its own collection with
that fold's split, and is evaluated with fold i's patients as queries against the other folds' images
(same-patient neighbours excluded). The table gives mean ± sd over the folds and, pooling the folds (every
patient is queried exactly once), 95 % bootstrap intervals by patient. `--folds 0` runs one hold-out split.

With `--nih`, the multilabel approach is trained on the NIH data (14 findings, split into the same folds by
NIH patient), then ingests and is evaluated on the same RSNA archive through its Pneumonia output; its own NIH
archive is evaluated as well. The RSNA images were drawn from NIH, so the NIH images that have a near-duplicate
among the RSNA images (`cbir.app.audit`) are left out of its training data, and results.md says so. Every
evaluation leaves out queries with a near-duplicate of another patient in the archive (`cbir.app.evaluate`).
Without `--nih`, the RSNA layout has one label only, so there is no honest multilabel row and it is left out.
Detection needs boxes, so it runs only on the rsna layout. On a folder layout only binary and hash apply
(multilabel with three or more classes).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cbir.app.audit import leaked_files
from cbir.app.evaluate import evaluate_collection
from cbir.app.heldout import multilabel_auc
from cbir.app.ingest import ingest_records
from cbir.console import QUIET, Reporter
from cbir.data.layout import load_dataset
from cbir.data.records import Records
from cbir.data.splits import SplitSpec
from cbir.errors import CbirError
from cbir.evaluation.pooled import pool_queries
from cbir.io import load_pseudonymizer
from cbir.io.phi import shown_path
from cbir.models import LoadedModel, ModelConfig, get_task, load_checkpoint
from cbir.models.device import resolve_device
from cbir.report.doc import slug, update_section
from cbir.report.results import render_results
from cbir.store import open_index
from cbir.store.versions import drop
from cbir.train import TrainSettings, train_model
from cbir.train.reuse import reusable_run
from cbir.train.settings import DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE

APPROACHES = {
    "binary": "Binary classification (baseline)",
    "hash": "Binary classification + hash layer",
    "multilabel": "Multilabel classification",
    "detection": "Detection (boxes)",
}
#: The seed thesis' table on the full RSNA challenge set (26,684 patients): stage-1 ROC-AUC and kNN accuracy.
SEED_TABLE = {"binary": (0.8357, 0.7867), "hash": (0.8372, 0.7985), "multilabel": (0.8403, 0.8004),
              "detection": (0.8319, 0.7948)}

#: Metrics averaged over folds: name → path in an evaluation report.
FOLD_METRICS = {
    "roc_auc": ("stage1", "roc_auc"), "knn_accuracy": ("stage2", "knn_accuracy"),
    "balanced_accuracy": ("stage2", "balanced_accuracy"), "map_at_k": ("stage2", "map_at_k"),
    "map_at_k_hits": ("stage2", "map_at_k_hits"), "hamming_map_at_k": ("stage2", "hamming_map_at_k"),
    "prefilter_knn_accuracy": ("stage2", "prefilter_knn_accuracy"),
    "knn_sensitivity": ("stage2", "sensitivity"), "knn_specificity": ("stage2", "specificity"),
    "model_sensitivity": ("stage1", "sensitivity"), "model_specificity": ("stage1", "specificity"),
    "majority_accuracy": ("baseline", "majority_accuracy"), "box_map": ("stage1", "box_map"),
}


@dataclass
class ReproduceOptions:
    data: Path
    out: Path
    layout: str = "auto"
    nih: Path | None = None
    #: None: `cbir train`'s defaults (`cbir.train.settings`) for binary, hash and multilabel, and the detector's
    #: own (resnet18 from random weights at 128 px, `DETECTOR_RECIPE`)
    backbone: str | None = None
    image_size: int | None = None
    nih_image_size: int | None = None  # default: image_size
    epochs: int | None = None
    device: str = "auto"
    bits: int = 64
    embed_dim: int = 128
    k: int = 10
    tasks: list[str] | None = None
    batch_size: int = 32
    patient_regex: str | None = None
    reuse: bool = False
    folds: int = 5
    val_fraction: float = 0.1
    seed: int = 0
    doc: Path | None = None
    readme: Path | None = None

    def spec(self, fold: int) -> SplitSpec:
        if self.folds:
            return SplitSpec(seed=self.seed, val_fraction=self.val_fraction, folds=self.folds, fold=fold)
        return SplitSpec(seed=self.seed, val_fraction=self.val_fraction)

    @property
    def fold_numbers(self) -> list[int]:
        return list(range(1, self.folds + 1)) if self.folds else [0]


@dataclass
class FoldRow:
    task: str
    fold: int
    trained_on: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    bits: int = 0
    embed_dim: int = 0
    heldout: dict[str, Any] = field(default_factory=dict)


def applicable_tasks(records: Records, nih: Records | None) -> list[str]:
    """The approaches this data supports, in the seed table's order."""
    tasks = ["binary", "hash"]
    if nih is not None or len(records.label_names) > 2:
        tasks.append("multilabel")
    if records.layout == "rsna" and any(len(b) for b in records.meta["boxes"]):
        tasks.append("detection")
    return tasks


#: The detector's recipe in reproduce when no option says otherwise: 10 epochs keep a 5-fold run of the detector
#: under an hour on a 2-core CPU (it costs about twice a classifier per epoch).
DETECTOR_RECIPE: dict[str, Any] = {"backbone": "resnet18", "image_size": 128, "epochs": 10}


def recipe(task: str, options: ReproduceOptions, per_label_nih: bool = False) -> dict[str, Any]:
    """Backbone, image size and epochs of `task`'s models: the options where given, else `cbir train`'s defaults
    (the detector: `DETECTOR_RECIPE`)."""
    base = DETECTOR_RECIPE if get_task(task).boxes else {
        "backbone": DEFAULT_BACKBONE, "image_size": DEFAULT_IMAGE_SIZE, "epochs": TrainSettings().epochs}
    size = options.image_size
    if per_label_nih and options.nih_image_size:
        size = options.nih_image_size
    return {"backbone": options.backbone or base["backbone"], "image_size": size or base["image_size"],
            "epochs": options.epochs or base["epochs"]}


def describe(task: str, options: ReproduceOptions) -> str:
    """How `task`'s models start and train, in words, e.g. "tf_efficientnet_lite0 fine-tuned from packaged
    ImageNet weights (last 3 groups, BatchNorm frozen, EMA weights) at 224 px, 6 epochs"."""
    from cbir.models.packaged import packaged_for
    chosen = recipe(task, options)
    settings = TrainSettings()
    if packaged_for(chosen["backbone"]) is not None and not get_task(task).boxes:
        groups = "all groups" if settings.unfreeze < 0 else f"last {settings.unfreeze} groups"
        start = (f"fine-tuned from packaged ImageNet weights ({groups}"
                 f"{', BatchNorm frozen' if settings.freeze_bn else ''}"
                 f"{', EMA weights' if settings.ema in (None, True) else ''})")
    else:
        start = "trained from random initialisation"
    return f"{chosen['backbone']} {start} at {chosen['image_size']} px, {chosen['epochs']} epochs"


def _train(task: str, records: Records, settings: TrainSettings, out: Path, options: ReproduceOptions,
           image_size: int, reporter: Reporter) -> None:
    common: dict[str, Any] = {"backbone": recipe(task, options)["backbone"], "image_size": image_size,
                              "bits": options.bits,
              "label_names": list(records.label_names), "target": records.target}
    if get_task(task).boxes:
        from cbir.models.detector_config import DetectorConfig
        config: Any = DetectorConfig(**common)
    else:
        config = ModelConfig(task=task, embed_dim=options.embed_dim, **common)
    train_model(records, config, settings, out, reporter)


def run_reproduce(options: ReproduceOptions, reporter: Reporter = QUIET) -> dict[str, Any]:
    """See the module docstring; returns results.json's dict. With `reuse`, a model already trained in `out`
    with the same settings and split is used as it is (its recorded training time is reported)."""
    started = time.perf_counter()
    probe = load_dataset(options.data, options.layout, patient_regex=options.patient_regex)
    probe_nih = load_dataset(options.nih, "nih") if options.nih else None
    chosen = options.tasks or applicable_tasks(probe, probe_nih)
    unknown = [t for t in chosen if t not in APPROACHES]
    if unknown:
        raise CbirError(f"unknown task(s) {', '.join(unknown)} (choose from {', '.join(APPROACHES)})")
    per_label = [t for t in chosen if get_task(t).per_label]
    if per_label and probe_nih is None and len(probe.label_names) <= 2:
        raise CbirError(f"{options.data}: {per_label[0]} needs --nih or a dataset with more than two labels "
                        f"(this one has {probe.label_names})")
    options.out.mkdir(parents=True, exist_ok=True)
    pseudonymize = load_pseudonymizer()
    leaked, audit = (_nih_audit(probe_nih, probe, pseudonymize, reporter)
                     if probe_nih is not None and "multilabel" in chosen else (set(), None))
    settings = TrainSettings(batch_size=options.batch_size, device=options.device, seed=options.seed)
    rows: list[FoldRow] = []
    for fold in options.fold_numbers:
        spec = options.spec(fold)
        records = load_dataset(options.data, options.layout, split=spec, patient_regex=options.patient_regex)
        nih = load_dataset(options.nih, "nih", split=spec) if options.nih else None
        if nih is not None and leaked:   # NIH images that are RSNA images never train the multilabel model
            nih = nih.subset(~nih.meta["path"].isin(leaked).to_numpy())
        tag = f"fold{fold}" if fold else "holdout"
        reporter.log(f"=== {spec.describe()}: {_counts(records)}")
        for task in chosen:
            rows.append(_run_task(task, fold, tag, records, nih, settings, options, pseudonymize, reporter))
            _write(options, rows, chosen, started, final=False, audit=audit)
    return _write(options, rows, chosen, started, final=True, audit=audit)


def _nih_audit(nih: Records, records: Records, pseudonymize: Any, reporter: Reporter) -> tuple[set[str], dict]:
    """The NIH images that have a near-duplicate among the evaluated dataset's images (`cbir audit`: the RSNA
    challenge images were drawn from NIH), which the multilabel model must not train on, and what to report."""
    leaked, result = leaked_files(nih, records, pseudonymize, reporter=reporter)
    kept = len(nih) - len(leaked)
    summary = {"dataset": nih.dataset, "images": len(nih), "left_out": len(leaked), "against": records.dataset,
               "threshold": result.threshold, "method": result.method,
               "description": f"{nih.dataset}: {kept} of {len(nih)} images, without the {len(leaked)} that duplicate "
                              f"{records.dataset} images (cbir audit, tiny-image cosine ≥ {result.threshold:g})"}
    reporter.log(f"leakage audit: the multilabel model trains on {summary['description']}")
    return leaked, summary


def _run_task(task: str, fold: int, tag: str, records: Records, nih: Records | None, settings: TrainSettings,
              options: ReproduceOptions, pseudonymize: Any, reporter: Reporter) -> FoldRow:
    train_set = nih if get_task(task).per_label and nih is not None else records
    chosen = recipe(task, options, per_label_nih=train_set is nih)
    image_size = chosen["image_size"]
    settings = replace(settings, epochs=chosen["epochs"])
    row = FoldRow(task, fold, trained_on=train_set.dataset)
    model_dir = options.out / "models" / tag / task
    wanted: dict[str, Any] = {"task": task, "backbone": chosen["backbone"], "image_size": image_size,
                              "bits": options.bits}
    if not get_task(task).boxes:
        defaults = ModelConfig()
        wanted |= {k: v for k, v in asdict(defaults).items() if k.startswith("appearance_")}
    previous = reusable_run(model_dir, wanted, {"epochs": chosen["epochs"]}, train_set) if options.reuse else None
    if previous is not None:
        reporter.log(f"== {APPROACHES[task]}, {tag}: reusing the model trained in {model_dir}")
        row.seconds["train"] = round(previous, 1)
    else:
        reporter.log(f"== {APPROACHES[task]}, {tag}: train on {train_set.dataset}")
        t0 = time.perf_counter()
        _train(task, train_set, settings, model_dir, options, image_size, reporter)
        row.seconds["train"] = round(time.perf_counter() - t0, 1)
    loaded = load_checkpoint(model_dir, device=resolve_device(options.device))
    row.bits, row.embed_dim = loaded.config.bits, loaded.config.vector_dim
    collection = f"{task}-{tag}"
    with open_index(str(options.out / "index"), writable=True, create=True) as index:
        if index.has_collection(collection):
            drop(index, collection)
        t0 = time.perf_counter()
        ingest_records(records, loaded, index, collection, pseudonymize, reporter=reporter)
        row.seconds["ingest"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        row.metrics = evaluate_collection(index, collection, loaded, options.out / "reports" / tag / task,
                                          k=options.k, reporter=reporter)
        row.seconds["evaluate"] = round(time.perf_counter() - t0, 1)
        row.heldout = _heldout(train_set, loaded, row.metrics)
        if loaded.task.per_label and train_set is not records:
            row.heldout["retrieval"] = _own_retrieval(index, train_set, loaded, pseudonymize, options, tag,
                                                      reporter)
    return row


def _counts(records: Records) -> str:
    counts = records.meta["split"].value_counts().to_dict()
    return ", ".join(f"{counts.get(n, 0)} {n}" for n in ("train", "val", "test")) + f" images of {records.dataset}"


def _heldout(train_set: Records, loaded: LoadedModel, report: dict[str, Any]) -> dict[str, Any]:
    """Per-finding AUC (multilabel) on the test fold of its training data, or the box mAP (detection) that the
    evaluation measured on the test fold."""
    test = train_set.split("test")
    if loaded.task.per_label and len(test):
        return {"dataset": train_set.dataset, **multilabel_auc(test, loaded)}
    s1 = report["stage1"]
    if loaded.task.boxes and "box_map" in s1:
        return {"dataset": train_set.dataset, "box_map": s1["box_map"], "box_threshold": s1["box_threshold"],
                "roc_auc": s1["roc_auc"], "n_images": s1["box_images"], "n_with_boxes": s1["box_images_with_boxes"]}
    return {}


def _own_retrieval(index: Any, train_set: Records, loaded: Any, pseudonymize: Any, options: ReproduceOptions,
                   tag: str, reporter: Reporter) -> dict[str, Any]:
    """Stage 2 of a multilabel model on its own (NIH) archive, where relevance can mean a shared finding."""
    collection = f"multilabel-{train_set.dataset}-{tag}"
    if index.has_collection(collection):
        drop(index, collection)
    ingest_records(train_set, loaded, index, collection, pseudonymize, reporter=reporter)
    report = evaluate_collection(index, collection, loaded, options.out / "reports" / tag / collection,
                                 k=options.k, reporter=reporter)
    s2, base = report["stage2"], report["baseline"]
    return {"collection": collection, "n_queries": report.get("n_queries"),
            "knn_accuracy": s2.get("knn_accuracy"), "balanced_accuracy": s2.get("balanced_accuracy"),
            "map_at_k": s2.get("map_at_k"), "map_at_k_any_finding": s2.get("map_at_k_any_finding"),
            "majority_accuracy": base.get("majority_accuracy")}


def _fold_json(row: FoldRow) -> dict[str, Any]:
    values = {name: row.metrics.get(section, {}).get(key) for name, (section, key) in FOLD_METRICS.items()}
    return {"task": row.task, "fold": row.fold, "trained_on": row.trained_on, **values,
            "n_queries": row.metrics.get("n_queries"), "n_archive": row.metrics.get("n_archive"),
            "codes": row.metrics.get("stage2", {}).get("codes") or {}, "heldout": row.heldout,
            "bits": row.bits, "embed_dim": row.embed_dim, "seconds": row.seconds,
            "duplicates": (row.metrics.get("context") or {}).get("duplicates")}


def _write(options: ReproduceOptions, rows: list[FoldRow], tasks: list[str], started: float, final: bool,
           audit: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.json and results.md (after every fold's task, so a long run shows its progress); on the final
    call also the document sections (`--doc`, `--readme`). `audit`: what the multilabel model's NIH training
    data left out (`_nih_audit`)."""
    per_fold = [_fold_json(r) for r in rows]
    pooled = {task: pool_queries([r.metrics["per_query"] for r in rows if r.task == task], options.k)
              for task in tasks if any(r.task == task for r in rows)}
    results = {"options": {k: (shown_path(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
               "device": str(resolve_device(options.device)), "tasks": tasks, "approaches": APPROACHES,
               "seed_table": SEED_TABLE, "folds": per_fold, "pooled": pooled, "complete": final,
               "recipes": {task: recipe(task, options) | {"description": describe(task, options)} for task in tasks},
               "seconds": round(time.perf_counter() - started, 1), "audit": {"multilabel_training": audit}}
    (options.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown, headline = render_results(results)
    (options.out / "results.md").write_text(markdown)
    if final and options.doc is not None:
        update_section(options.doc, f"reproduce-{_doc_name(options)}", markdown)
    if final and options.readme is not None:
        update_section(options.readme, "headline", headline)
    return results


def _doc_name(options: ReproduceOptions) -> str:
    return slug(Path(options.data).name) or "data"


def fold_values(results: dict[str, Any], task: str, name: str) -> list[float]:
    return [r[name] for r in results["folds"] if r["task"] == task and r.get(name) is not None]


def mean_of(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
