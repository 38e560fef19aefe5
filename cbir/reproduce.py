"""`cbir reproduce`: train the four seed approaches, ingest each into its own collection, evaluate all on
the same test patients, and write `results.md` and `results.json`.

The queries are the test split of the RSNA-layout (or folder-layout) data, which every approach ingests
with the same deterministic by-patient split. With `--nih`, the multilabel approach is trained on the NIH
data (14 findings) and then ingests and is evaluated on the same RSNA archive (its Pneumonia output is the
stage-1 score). Without `--nih` it trains on the RSNA data alone, where multilabel is just [Pneumonia],
and the table says so. Detection needs boxes, so it runs only on the rsna layout. Multilabel needs more
than one label, or an NIH set, so it is skipped on a two-class folder layout.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbir.console import QUIET, Reporter
from cbir.data.layout import load_dataset
from cbir.data.records import Records
from cbir.errors import CbirError
from cbir.evaluate.heldout import multilabel_auc
from cbir.evaluate.run import evaluate_collection
from cbir.index import open_index
from cbir.index.ingest import ingest_records
from cbir.index.versions import drop
from cbir.io import load_pseudonymizer
from cbir.models import ModelConfig, load_checkpoint
from cbir.train import TrainSettings, train_model
from cbir.train.loop import resolve_device

APPROACHES = {
    "binary": "Binary classification (baseline)",
    "hash": "Binary classification + hash layer",
    "multilabel": "Multilabel classification",
    "detection": "Detection (boxes)",
}


@dataclass
class Row:
    task: str
    approach: str
    trained_on: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    bits: int = 0
    embed_dim: int = 0
    note: str = ""
    heldout: dict[str, Any] = field(default_factory=dict)  # per-finding AUC (multilabel), box mAP (detection)


def applicable_tasks(records: Records, nih: Records | None) -> list[str]:
    """The approaches this data supports, in the seed table's order."""
    tasks = ["binary", "hash"]
    if nih is not None or len(records.label_names) > 2 or records.layout == "rsna":
        tasks.append("multilabel")
    if records.layout == "rsna" and any(len(b) for b in records.meta["boxes"]):
        tasks.append("detection")
    return tasks


def _train(task: str, records: Records, settings: TrainSettings, out: Path, backbone: str, image_size: int,
           bits: int, embed_dim: int, reporter: Reporter) -> None:
    if task == "detection":
        from cbir.models.detection import DetectorConfig
        from cbir.train.detection import train_detector
        config = DetectorConfig(backbone=backbone, image_size=image_size, bits=bits,
                                label_names=list(records.label_names), target=records.target)
        train_detector(records, config, settings, out, reporter)
        return
    config = ModelConfig(backbone=backbone, task=task, image_size=image_size, embed_dim=embed_dim, bits=bits,
                         label_names=list(records.label_names), target=records.target)
    train_model(records, config, settings, out, reporter)


def _reusable(model_dir: Path, task: str, backbone: str, image_size: int, bits: int, epochs: int) -> float | None:
    """Training seconds of a finished run in `model_dir` made with these settings, or None."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        summary = json.loads((model_dir / "train.json").read_text())
    except (OSError, ValueError):
        return None
    same = (config.get("task") == task and config.get("backbone") == backbone
            and config.get("image_size") == image_size and config.get("bits") == bits
            and (summary.get("settings") or {}).get("epochs") == epochs)
    return float(summary.get("seconds") or 0.0) if same and (model_dir / "model.safetensors").exists() else None


def run_reproduce(data: Path, out: Path, layout: str = "auto", nih: Path | None = None,
                  backbone: str = "resnet18", image_size: int = 224, epochs: int = 10, device: str = "auto",
                  bits: int = 64, embed_dim: int = 128, k: int = 10, tasks: list[str] | None = None,
                  batch_size: int = 32, patient_regex: str | None = None, reuse: bool = False,
                  reporter: Reporter = QUIET) -> dict[str, Any]:
    """See the module docstring. With `reuse`, a model already trained in `out` with the same settings is
    used as it is (its recorded training time is reported) and only ingest and evaluation run again."""
    records = load_dataset(data, layout, patient_regex=patient_regex)
    nih_records = load_dataset(nih, "nih") if nih else None
    chosen = tasks or applicable_tasks(records, nih_records)
    unknown = [t for t in chosen if t not in APPROACHES]
    if unknown:
        raise CbirError(f"unknown task(s) {', '.join(unknown)} (choose from {', '.join(APPROACHES)})")
    out.mkdir(parents=True, exist_ok=True)
    pseudonymize = load_pseudonymizer()
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, device=device)
    rows: list[Row] = []
    for task in chosen:
        train_set = nih_records if task == "multilabel" and nih_records is not None else records
        row = Row(task, APPROACHES[task], trained_on=train_set.dataset)
        if task == "multilabel" and nih_records is None:
            row.note = f"trained on {records.dataset} alone: labels {records.label_names}"
        model_dir = out / "models" / task
        previous = _reusable(model_dir, task, backbone, image_size, bits, epochs) if reuse else None
        if previous is not None:
            reporter.log(f"== {row.approach}: reusing the model trained in {model_dir}")
            row.seconds["train"] = round(previous, 1)
        else:
            reporter.log(f"== {row.approach}: train on {train_set.dataset}")
            started = time.perf_counter()
            _train(task, train_set, settings, model_dir, backbone, image_size, bits, embed_dim, reporter)
            row.seconds["train"] = round(time.perf_counter() - started, 1)
        loaded = load_checkpoint(model_dir, device=resolve_device(device))
        row.bits, row.embed_dim = loaded.config.bits, loaded.config.embed_dim
        with open_index(str(out / "index"), writable=True, create=True) as index:
            if index.has_collection(task):
                drop(index, task)
            started = time.perf_counter()
            ingest_records(records, loaded, index, task, pseudonymize, reporter=reporter)
            row.seconds["ingest"] = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            row.metrics = evaluate_collection(index, task, loaded, out / "reports" / task, k=k, reporter=reporter)
            row.seconds["evaluate"] = round(time.perf_counter() - started, 1)
            row.heldout = _heldout(task, train_set, loaded, row.metrics)
            if task == "multilabel" and train_set is not records:
                row.heldout["retrieval"] = _own_retrieval(index, train_set, loaded, pseudonymize, out, k, reporter)
        rows.append(row)
    results = {"data": str(data), "layout": records.layout, "nih": str(nih) if nih else None,
               "backbone": backbone, "image_size": image_size, "epochs": epochs, "k": k,
               "device": str(resolve_device(device)), "rows": [_row_json(r) for r in rows]}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render_results(results))
    return results


def _heldout(task: str, train_set: Records, loaded: Any, report: dict[str, Any]) -> dict[str, Any]:
    """Per-finding AUC (multilabel) on the test split of its training data, or the box mAP (detection) that
    the evaluation measured on the test split."""
    test = train_set.split("test")
    if task == "multilabel" and len(test):
        return {"dataset": train_set.dataset, **multilabel_auc(test, loaded)}
    s1 = report["stage1"]
    if task == "detection" and "box_map" in s1:
        return {"dataset": train_set.dataset, "box_map": s1["box_map"], "box_threshold": s1["box_threshold"],
                "roc_auc": s1["roc_auc"], "n_images": s1["box_images"], "n_with_boxes": s1["box_images_with_boxes"]}
    return {}


def _own_retrieval(index: Any, train_set: Records, loaded: Any, pseudonymize: Any, out: Path, k: int,
                   reporter: Reporter) -> dict[str, Any]:
    """Stage 2 of a multilabel model on its own (NIH) archive, where relevance can mean a shared finding."""
    collection = f"multilabel_{train_set.dataset}"
    if index.has_collection(collection):
        drop(index, collection)
    ingest_records(train_set, loaded, index, collection, pseudonymize, reporter=reporter)
    report = evaluate_collection(index, collection, loaded, out / "reports" / collection, k=k, reporter=reporter)
    s2, base = report["stage2"], report["baseline"]
    return {"collection": collection, "n_queries": report.get("n_queries"),
            "knn_accuracy": s2.get("knn_accuracy"), "balanced_accuracy": s2.get("balanced_accuracy"),
            "map_at_k": s2.get("map_at_k"), "map_at_k_any_finding": s2.get("map_at_k_any_finding"),
            "majority_accuracy": base.get("majority_accuracy")}


def _row_json(row: Row) -> dict[str, Any]:
    s1, s2, base = row.metrics["stage1"], row.metrics["stage2"], row.metrics["baseline"]
    return {"task": row.task, "approach": row.approach, "trained_on": row.trained_on, "note": row.note,
            "roc_auc": s1.get("roc_auc"), "knn_accuracy": s2.get("knn_accuracy"),
            "balanced_accuracy": s2.get("balanced_accuracy"), "map_at_k": s2.get("map_at_k"),
            "hamming_map_at_k": s2.get("hamming_map_at_k"), "prefilter_knn_accuracy": s2.get("prefilter_knn_accuracy"),
            "majority_accuracy": base.get("majority_accuracy"),
            "majority_balanced_accuracy": base.get("majority_balanced_accuracy"),
            "n_queries": row.metrics.get("n_queries"), "bits": row.bits, "embed_dim": row.embed_dim,
            "codes": s2.get("codes") or {}, "heldout": row.heldout, "seconds": row.seconds}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def render_results(results: dict[str, Any]) -> str:
    k, rows = results["k"], results["rows"]
    lines = [
        f"# Results: {results['layout']} data at {results['image_size']} px, {results['backbone']}, "
        f"{results['epochs']} epochs" + (f", on {results['device']}" if results.get("device") else ""),
        "",
        f"Queries: the test split ({rows[0]['n_queries'] if rows else 0} images); archive: train + val; "
        "same-patient neighbours excluded. Percentages; the majority baseline always predicts the archive's "
        "majority label (its balanced accuracy is 50).",
        "",
        f"| Approach | Stage 1 ROC-AUC | kNN accuracy | balanced accuracy | mAP@{k} | Hamming mAP@{k} | "
        "prefilter + kNN accuracy | majority baseline | bits | embedding | train s | ingest s | evaluate s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for row in rows:
        name = row["approach"] + (" *" if row["note"] else "")
        if row["note"]:
            notes.append(f"\\* {row['approach']}: {row['note']}.")
        secs = row["seconds"]
        lines.append(f"| {name} | {_pct(row['roc_auc'])} | {_pct(row['knn_accuracy'])} | "
                     f"{_pct(row['balanced_accuracy'])} | {_pct(row['map_at_k'])} | {_pct(row['hamming_map_at_k'])} | "
                     f"{_pct(row.get('prefilter_knn_accuracy'))} | {_pct(row['majority_accuracy'])} | {row['bits']} | "
                     f"{row['embed_dim']} | {secs.get('train', 0):.0f} | {secs.get('ingest', 0):.0f} | "
                     f"{secs.get('evaluate', 0):.0f} |")
    lines += ["", *notes, *_codes_section(rows, k), *_heldout_section(rows)]
    return "\n".join(lines) + "\n"


def _codes_section(rows: list[dict[str, Any]], k: int) -> list[str]:
    coded = [r for r in rows if r.get("codes")]
    if not coded:
        return []
    lines = ["", "## Binary codes: the model's own, LSH and ITQ", "",
             "`model` is the learned hash layer for the hash approach and LSH inside the model otherwise; `lsh` "
             "is the sign of a seeded Gaussian projection of the embedding; `itq` is fitted on the archive's "
             f"embeddings. Hamming mAP@{k} ranks by code alone; prefilter + kNN keeps the Hamming top-N "
             "(10 % of the archive) and ranks it by exact cosine.", "",
             f"| Approach | code | Hamming mAP@{k} | prefilter + kNN accuracy | prefilter + kNN balanced |",
             "|---|---|---:|---:|---:|"]
    for row in coded:
        for name, v in row["codes"].items():
            lines.append(f"| {row['approach']} | {name} | {_pct(v['hamming_map_at_k'])} | "
                         f"{_pct(v['prefilter_knn_accuracy'])} | {_pct(v['prefilter_balanced_accuracy'])} |")
    return lines


def _heldout_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        held = row.get("heldout") or {}
        if "per_class_auc" in held:
            lines += ["", f"## Multilabel: per-finding ROC-AUC on the {held['dataset']} test split "
                      f"({held['n_images']} images)", "", "| Finding | ROC-AUC |", "|---|---:|",
                      *(f"| {name} | {_pct(auc)} |" for name, auc in held["per_class_auc"].items()),
                      f"| mean | {_pct(held['mean_auc'])} |"]
        own = held.get("retrieval")
        if own:
            lines += ["", f"Retrieval in its own {held['dataset']} archive ({own['n_queries']} test queries, "
                      "train + val archive): Pneumonia kNN accuracy "
                      f"{_pct(own['knn_accuracy'])} (balanced {_pct(own['balanced_accuracy'])}, majority "
                      f"{_pct(own['majority_accuracy'])}); mAP@k {_pct(own['map_at_k'])} when relevant means the "
                      f"same Pneumonia label, {_pct(own['map_at_k_any_finding'])} when it means at least one "
                      "shared finding (\"No Finding\" included)."]
        if "box_map" in held:
            lines += ["", f"## Detection on the {held['dataset']} test split ({held['n_images']} images, "
                      f"{held['n_with_boxes']} with boxes)", "",
                      f"Box mAP (RSNA metric, IoU 0.40–0.75, original pixels) {_pct(held['box_map'])} at box "
                      f"threshold {held['box_threshold']:.2f} (chosen on validation); image-score ROC-AUC "
                      f"{_pct(held['roc_auc'])}."]
    return lines
