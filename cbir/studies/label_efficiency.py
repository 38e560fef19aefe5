"""Studies `ssl-method` and `label-efficiency`: does self-supervised pretraining (`cbir pretrain`) help?

Both use one hold-out split by patient per dataset (`SplitSpec(seed, val_fraction, test_fraction)`).

`ssl-method` compares pretraining runs (and a random backbone) by a kNN probe on the VALIDATION patients: the
backbone's pooled features, cosine, k = 10, the training patients as the labelled archive. Test patients are
dropped before anything is read. The best mean kNN balanced accuracy over the datasets names the default method.

`label-efficiency` trains the default binary recipe from scratch and from the pretrained run (`--init`) with 10 %,
25 % and 100 % of the training (and validation) patients' labels, subsampled by patient, stratified by the
patient's label, nested, with a fixed seed; the kept weights are the last epoch's, so validation chooses nothing.
Every run is scored on the held-out test patients: stage-1 ROC-AUC, kNN balanced accuracy and mAP@10 (queries:
test images; archive: the run's labelled training images), each with a 95 % bootstrap interval by patient, and
the paired bootstrap interval of pretrained − scratch on the same test patients.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cbir.console import QUIET, Reporter
from cbir.data.layout import load_dataset
from cbir.data.records import Records
from cbir.data.splits import SplitSpec, patient_uniform
from cbir.data.transforms import model_input
from cbir.errors import CbirError
from cbir.io.phi import shown_path
from cbir.metrics import average_precisions_at_k, knn_vote, majority_baseline
from cbir.metrics_ci import Bootstrap, weighted_auc, weighted_balanced_accuracy, weighted_mean
from cbir.models import ModelConfig, load_checkpoint
from cbir.models.device import resolve_device
from cbir.studies.common import StudyOptions, finish, register
from cbir.train import TrainSettings, train_model
from cbir.train.preload import preload
from cbir.train.reuse import finished_run

FRACTIONS = (0.1, 0.25, 1.0)
K = 10
#: The hold-out test share of the patients (a quarter: tighter intervals than the default 0.2).
TEST_FRACTION = 0.25
#: Every fine-tune takes at least this many optimiser steps (small subsets get more epochs).
MIN_STEPS = 300


def study_spec(options: StudyOptions) -> SplitSpec:
    return SplitSpec(seed=options.seed, val_fraction=options.val_fraction, test_fraction=TEST_FRACTION)


def datasets(options: StudyOptions) -> list[Path]:
    return [p for p in (options.data, options.other) if p is not None]


def label_subset(records: Records, fraction: float, seed: int) -> np.ndarray:
    """Per image, whether its patient is in the `fraction` kept, per split (train, val) and per patient label
    (positive when any of its images is): each stratum's patients in a seeded hash order, the first
    ceil(fraction · n) kept, so smaller fractions are subsets of larger ones."""
    if fraction >= 1:
        return np.ones(len(records), dtype=bool)
    patients = records.meta["patient"].astype(str).to_numpy()
    split = records.meta["split"].astype(str).to_numpy()
    y = records.y
    table: dict[str, tuple[str, int]] = {}
    for p, s, v in zip(patients, split, y, strict=True):
        old = table.get(p, (s, 0))
        table[p] = (s, max(old[1], int(v)))
    names = np.asarray(sorted(table))
    order = patient_uniform(names, f"label-efficiency-{seed}")
    kept: set[str] = set()
    for stratum in {v for v in table.values()}:
        members = np.asarray([table[n] == stratum for n in names])
        ranked = names[members][np.argsort(order[members], kind="stable")]
        kept.update(ranked[:math.ceil(fraction * len(ranked))].tolist())
    return np.asarray([p in kept for p in patients])


@torch.no_grad()
def pooled_features(backbone: torch.nn.Module, x: torch.Tensor, intensity: str, device: torch.device,
                    batch_size: int = 256) -> np.ndarray:
    """L2-normalised pooled backbone features of (N, 1, S, S) images."""
    backbone.eval()
    out = [F.normalize(backbone(model_input(x[i:i + batch_size].float(), intensity).to(device)), dim=1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def knn_scores(ref: np.ndarray, y_ref: np.ndarray, queries: np.ndarray, y_q: np.ndarray,
               groups: np.ndarray, k: int = K) -> dict[str, Any]:
    """kNN (cosine) of the queries against the labelled archive: balanced accuracy, AUC of the positive vote
    share and mAP@k (relevant: same label), with 95 % bootstrap intervals by patient (`groups`)."""
    sims = queries @ ref.T
    k = min(k, ref.shape[0])
    top = np.argsort(-sims, axis=1)[:, :k]
    labels = y_ref[top]
    pred, _ = knn_vote(labels, k)
    share = labels.mean(axis=1)
    relevant = labels == y_q[:, None]
    n_rel = np.asarray([(y_ref == v).sum() for v in y_q])
    ap = average_precisions_at_k(relevant, k, n_rel)
    boot = Bootstrap.by_group(groups)
    return {"knn_bal_acc": weighted_balanced_accuracy(y_q, pred, np.ones(len(y_q))),
            "knn_bal_acc_ci": boot.interval(lambda w: weighted_balanced_accuracy(y_q, pred, w)),
            "knn_auc": weighted_auc(y_q, share, np.ones(len(y_q))),
            "map10": weighted_mean(ap, np.ones(len(y_q))),
            "map10_ci": boot.interval(lambda w: weighted_mean(ap, w)),
            "_pred": pred, "_ap": ap}


# -- ssl-method --------------------------------------------------------------------------------------------------


def _ssl_method(options: StudyOptions, reporter: Reporter = QUIET) -> dict[str, Any]:
    from safetensors.torch import load_file

    from cbir.models.ssl import create_backbone
    from cbir.train.pretrain import WEIGHTS, read_run
    if not options.init:
        raise CbirError("study ssl-method needs --init RUN for each pretraining run to compare")
    device = resolve_device(options.device)
    runs = [(str(run), read_run(run)) for run in options.init]
    sizes = {r["image_size"] for _, r in runs} | {options.image_size}
    if len(sizes) > 1:
        raise CbirError(f"the runs and --image-size differ in image size ({sorted(sizes)}): compare at one size")
    rows = []
    for root in datasets(options):
        records = load_dataset(root, options.layout, split=study_spec(options))
        records = records.subset((records.meta["split"] != "test").to_numpy())  # test patients never read
        train, val = records.split("train"), records.split("val")
        settings = TrainSettings(workers=2)
        x_ref, keep_ref, _ = preload(train, options.image_size, settings, reporter, "archive (train)")
        x_q, keep_q, _ = preload(val, options.image_size, settings, reporter, "queries (val)")
        y_ref, y_q = train.y[keep_ref], val.y[keep_q]
        groups = val.meta["patient"].astype(str).to_numpy()[keep_q]
        candidates: list[tuple[str, dict[str, Any] | None]] = [("random backbone (no pretraining)", None), *runs]
        for name, record in candidates:
            torch.manual_seed(options.seed)
            backbone = create_backbone(options.backbone if record is None else record["backbone"]).to(device)
            if record is not None:
                backbone.load_state_dict(load_file(str(Path(name) / WEIGHTS)))
            intensity = "standardize" if record is None else record["intensity"]
            scores = knn_scores(pooled_features(backbone, x_ref, intensity, device), y_ref,
                                pooled_features(backbone, x_q, intensity, device), y_q, groups)
            rows.append({"dataset": records.dataset, "run": name,
                         "method": "none" if record is None else record["method"],
                         "epochs": None if record is None else record.get("epochs"),
                         "steps": None if record is None else record.get("steps"),
                         "train_seconds": None if record is None else record.get("train_seconds"),
                         "n_archive": len(y_ref), "n_queries": len(y_q),
                         **{k: v for k, v in scores.items() if not k.startswith("_")}})
            reporter.log(f"{records.dataset} {name}: kNN balanced accuracy {scores['knn_bal_acc']:.3f}")
    means = {"none": float(np.mean([r["knn_bal_acc"] for r in rows if r["method"] == "none"]))}
    for _, record in runs:
        vals = [r["knn_bal_acc"] for r in rows if r["method"] == record["method"]]
        means[record["method"]] = float(np.mean(vals))
    winner = max((m for m in means if m != "none"), key=lambda method: means[method]) if len(means) > 1 else None
    result = {"study": "ssl-method", "options": {k: str(v) for k, v in asdict(options).items()}, "rows": rows,
              "means": means, "winner": winner}
    return finish("ssl-method", options, result, render_method(result, options))


def render_method(result: dict[str, Any], options: StudyOptions) -> str:
    rows = result["rows"]
    lines = ["### Pretraining method: kNN probe on validation patients (`cbir study ssl-method`)", "",
             "Each run pretrained the same backbone on every image in `../shared` for the same number of steps "
             "(`cbir pretrain --epochs 2`; `pretrain.json` has its settings). Probe: the frozen backbone's "
             f"pooled features, cosine kNN (k = {K}), the training patients as the labelled archive and the "
             "validation patients as queries, on the hold-out split of the label-efficiency study (its test "
             "patients are never read). 95 % bootstrap intervals by patient.", "",
             "| dataset | backbone | steps | train s | kNN balanced accuracy | kNN vote AUC | mAP@10 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['method'] if r['method'] != 'none' else 'random (none)'} | "
                     f"{r['steps'] if r['steps'] is not None else '–'} | "
                     f"{r['train_seconds'] if r['train_seconds'] is not None else '–'} | "
                     f"{_ci(r['knn_bal_acc'], r['knn_bal_acc_ci'])} | {r['knn_auc']:.3f} | "
                     f"{_ci(r['map10'], r['map10_ci'])} |")
    means = ", ".join(f"{m} {v:.3f}" for m, v in result["means"].items())
    lines += ["", f"Mean kNN balanced accuracy over the datasets: {means}. The default `--method` is the best: "
              f"**{result['winner']}**."]
    return "\n".join(lines)


def _ci(value: float | None, ci: list[float] | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


# -- label-efficiency -------------------------------------------------------------------------------------------


def _label_efficiency(options: StudyOptions, reporter: Reporter = QUIET) -> dict[str, Any]:
    from cbir.train.pretrain import read_run
    if len(options.init) != 1:
        raise CbirError("study label-efficiency needs one --init RUN (a `cbir pretrain` run folder)")
    run = options.init[0]
    record = read_run(run, options.backbone)
    device = resolve_device(options.device)
    started = time.perf_counter()
    result: dict[str, Any] = {"study": "label-efficiency",
                              "options": {k: str(v) for k, v in asdict(options).items()},
                              "pretrain": {k: record.get(k) for k in ("method", "image_size", "epochs", "steps",
                                                                      "n_images", "seconds", "train_seconds",
                                                                      "sha256", "sources")},
                              "rows": [], "baselines": [], "seconds": 0.0}
    previous = options.out / "label-efficiency.json"
    if previous.is_file():  # keep the rows of an interrupted run with the same options
        try:
            old = json.loads(previous.read_text())
            if old.get("options") == result["options"] and old.get("pretrain", {}).get("sha256") == record["sha256"]:
                result["rows"], result["baselines"] = old["rows"], old["baselines"]
        except (OSError, ValueError, KeyError):
            pass
    for root in datasets(options):
        records = load_dataset(root, options.layout, split=study_spec(options))
        test = records.split("test")
        development = records.subset((records.meta["split"] != "test").to_numpy())
        settings = TrainSettings(workers=2)
        x_test, keep_test, _ = preload(test, options.image_size, settings, reporter, "test")
        y_test = test.y[keep_test]
        groups = test.meta["patient"].astype(str).to_numpy()[keep_test]
        train_all = development.split("train")
        x_train, keep_train, _ = preload(train_all, options.image_size, settings, reporter, "train (archive)")
        if not any(b["dataset"] == records.dataset for b in result["baselines"]):
            base = majority_baseline(train_all.y, y_test)
            result["baselines"].append({"dataset": records.dataset, "n_test_images": len(y_test),
                                        "n_test_patients": len(set(groups)), "positives": int(y_test.sum()),
                                        "majority_accuracy": base.accuracy,
                                        "n_train_images": len(train_all), "n_val_images":
                                            int((development.meta["split"] == "val").sum())})
        boot = Bootstrap.by_group(groups)
        scratch: dict[float, dict[str, np.ndarray]] = {}
        for fraction in FRACTIONS:
            subset = development.subset(label_subset(development, fraction, options.seed))
            in_archive = label_subset(train_all, fraction, options.seed)[keep_train]
            for init in ("scratch", "pretrained"):
                done = [r for r in result["rows"] if r["dataset"] == records.dataset and r["fraction"] == fraction
                        and r["init"] == init]
                out = options.out / records.dataset / f"{int(fraction * 100)}pct-{init}"
                config = ModelConfig(backbone=options.backbone, task="binary", image_size=options.image_size,
                                     label_names=list(records.label_names), target=records.target)
                n_train = int((subset.meta["split"] == "train").sum())
                steps_per_epoch = math.ceil(n_train / options.batch_size)
                epochs = max(options.epochs, math.ceil(MIN_STEPS / steps_per_epoch))
                run_settings = TrainSettings(epochs=epochs, batch_size=options.batch_size, device=options.device,
                                             seed=options.seed, init=str(run) if init == "pretrained" else None)
                held = finished_run(out, config.to_dict(), {"epochs": epochs, "init": run_settings.init,
                                                            "seed": options.seed}, subset.split_record())
                if held is None:
                    reporter.log(f"== {records.dataset}: {int(fraction * 100)} % of the labels ({n_train} training "
                                 f"images), {init}, {epochs} epochs")
                    seconds = train_model(subset, config, run_settings, out, reporter).seconds
                else:
                    seconds = held
                loaded = load_checkpoint(out, device)
                prob, emb_test = _outputs(loaded, x_test, device)
                _, emb_ref = _outputs(loaded, x_train[in_archive], device)
                y_ref = train_all.y[keep_train][in_archive]
                scores = knn_scores(emb_ref, y_ref, emb_test, y_test, groups)
                row = {"dataset": records.dataset, "fraction": fraction, "init": init, "epochs": epochs,
                       "n_train_images": n_train, "n_labelled": len(subset), "train_seconds": round(seconds, 1),
                       "fingerprint": loaded.fingerprint,
                       "auc": weighted_auc(y_test, prob, np.ones(len(y_test))),
                       "auc_ci": boot.interval(partial(weighted_auc, y_test, prob)),
                       **{k: v for k, v in scores.items() if not k.startswith("_")}}
                keep = {"prob": prob, "pred": scores["_pred"], "ap": scores["_ap"]}
                if init == "scratch":
                    scratch[fraction] = keep
                elif fraction in scratch:
                    row["diff"] = _paired(boot, y_test, scratch[fraction], keep)
                result["rows"] = [r for r in result["rows"] if r not in done] + [row]
                result["seconds"] = round(result.get("seconds", 0.0) + time.perf_counter() - started, 1)
                started = time.perf_counter()
                finish("label-efficiency", options, result, render_efficiency(result, options))
                reporter.log(f"   test AUC {row['auc']:.3f}, kNN balanced accuracy {row['knn_bal_acc']:.3f}")
    plot_efficiency(result, options)
    return finish("label-efficiency", options, result, render_efficiency(result, options))


@torch.no_grad()
def _outputs(loaded: Any, x: torch.Tensor, device: torch.device, batch_size: int = 256
             ) -> tuple[np.ndarray, np.ndarray]:
    """Target probability and retrieval embedding of each image."""
    model = loaded.model.eval()
    probs, embs = [], []
    for i in range(0, len(x), batch_size):
        out = model(model_input(x[i:i + batch_size].float(), loaded.config.intensity).to(device))
        probs.append(torch.sigmoid(out.logits[:, loaded.config.target_index]).cpu().numpy())
        embs.append(out.embedding.cpu().numpy())
    return np.concatenate(probs), np.concatenate(embs)


def _paired(boot: Bootstrap, y: np.ndarray, a: dict[str, np.ndarray], b: dict[str, np.ndarray]
            ) -> dict[str, Any]:
    """Pretrained (b) − scratch (a) on the same test patients, with paired 95 % bootstrap intervals."""
    def diff(metric: Any) -> dict[str, Any]:
        return {"value": metric(b, np.ones(len(y))) - metric(a, np.ones(len(y))),
                "ci": boot.interval(lambda w: metric(b, w) - metric(a, w))}
    return {"auc": diff(lambda s, w: weighted_auc(y, s["prob"], w)),
            "knn_bal_acc": diff(lambda s, w: weighted_balanced_accuracy(y, s["pred"], w)),
            "map10": diff(lambda s, w: weighted_mean(s["ap"], w))}


PLOT = "label-efficiency.png"


def plot_path(options: StudyOptions) -> Path:
    return (options.doc.parent if options.doc is not None else options.out) / PLOT


def plot_efficiency(result: dict[str, Any], options: StudyOptions) -> Path | None:
    """Test AUC and kNN balanced accuracy against the share of labels, scratch and pretrained, per dataset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["dataset"] for r in result["rows"]))
    if not names:
        return None
    fig, axes = plt.subplots(len(names), 2, figsize=(9, 3.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, (metric, label) in enumerate((("auc", "stage-1 ROC-AUC"), ("knn_bal_acc", "kNN balanced accuracy"))):
            ax = axes[i][j]
            for init, colour in (("scratch", "tab:grey"), ("pretrained", "tab:blue")):
                rows = sorted((r for r in result["rows"] if r["dataset"] == name and r["init"] == init),
                              key=lambda r: r["fraction"])
                if not rows:
                    continue
                xs = [100 * r["fraction"] for r in rows]
                ys = [r[metric] for r in rows]
                cis = [r.get(f"{metric}_ci") or [v, v] for r, v in zip(rows, ys, strict=True)]
                ax.plot(xs, ys, "o-", color=colour, label=init)
                ax.fill_between(xs, [c[0] for c in cis], [c[1] for c in cis], color=colour, alpha=0.15)
            ax.set_xscale("log")
            ax.set_xticks([10, 25, 100], ["10 %", "25 %", "100 %"])
            ax.set_title(f"{name}: {label}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = plot_path(options)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_efficiency(result: dict[str, Any], options: StudyOptions) -> str:
    p = result["pretrain"]
    rows = result["rows"]
    sources = ", ".join(f"`{shown_path(s['root']) if 'root' in s else s.get('dataset')}` {s['images']}"
                        for s in p.get("sources") or [])   # runs before pretrain.json named datasets by id
    lines = [
        "### Label efficiency: from scratch against self-supervised pretraining (`cbir study label-efficiency`)", "",
        f"Pretraining: `cbir pretrain` ({p['method']}, {options.backbone}, {p['image_size']} px) on every image in "
        f"`../shared` ({p['n_images']} readable images of {sources}), {p['epochs']} epochs "
        f"({p['steps']} steps) in {_minutes(p.get('seconds'))} on this 2-core CPU; backbone sha256 "
        f"`{str(p['sha256'])[:16]}`. **Transductive use of unlabelled images:** the pretraining saw every image, "
        "the test patients' included (never a label); a user who pretrains on their own archive does the same.", "",
        f"Fine-tuning: the default binary recipe (`cbir train`: {options.backbone} at {options.image_size} px, the "
        f"embedding's appearance part on, last epoch kept), {options.epochs} epochs, or more for small subsets so "
        f"that every run takes at least {MIN_STEPS} steps; seed {options.seed}. One hold-out split by patient per "
        f"dataset (test {TEST_FRACTION:g}, validation {options.val_fraction:g} of the patients); the 10 % and 25 % "
        "subsets keep that share of the training and validation patients, stratified by the patient's label, "
        "nested, fixed seed. Validation chooses nothing (the last epoch is kept). Scored on the test patients: "
        f"kNN with k = {K} against the run's labelled training images. 95 % bootstrap intervals by patient; Δ is "
        "pretrained − scratch, paired on the same test patients.", "",
        "| dataset | labels | init | train images | epochs | train s | stage-1 ROC-AUC | kNN balanced accuracy "
        "| mAP@10 | Δ AUC | Δ kNN bal. acc. |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["fraction"], r["init"] != "scratch")):
        d = r.get("diff") or {}
        lines.append(
            f"| {r['dataset']} | {int(100 * r['fraction'])} % | {r['init']} | {r['n_train_images']} | {r['epochs']} | "
            f"{r['train_seconds']:.0f} | {_ci(r['auc'], r['auc_ci'])} | {_ci(r['knn_bal_acc'], r['knn_bal_acc_ci'])} | "
            f"{_ci(r['map10'], r['map10_ci'])} | {_delta(d.get('auc'))} | {_delta(d.get('knn_bal_acc'))} |")
    for b in result["baselines"]:
        lines.append(f"| {b['dataset']} | majority baseline | – | {b['n_train_images']} | – | – | 0.500 | 0.500 | – | "
                     f"– | – |")
    tests = "; ".join(f"{b['dataset']}: {b['n_test_images']} test images of {b['n_test_patients']} patients, "
                      f"{b['positives']} positive (majority-label accuracy {b['majority_accuracy']:.3f})"
                      for b in result["baselines"])
    lines += ["", f"Test sets: {tests}. Wall time of the fine-tunes and scoring: {_minutes(result.get('seconds'))} "
              "(timings are noisy: another engineer's jobs shared the 2 cores).", "",
              f"![label efficiency]({PLOT})", "", verdict(result)]
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    """Whether pretraining helped: a Δ whose paired interval lies above 0 counts, one that spans 0 does not."""
    better: list[str] = []
    worse: list[str] = []
    level: list[str] = []
    for r in result["rows"]:
        for metric in ("auc", "knn_bal_acc"):
            d = (r.get("diff") or {}).get(metric)
            if not d or not d.get("ci"):
                continue
            name = f"{r['dataset']} {int(100 * r['fraction'])} % {'AUC' if metric == 'auc' else 'kNN'}"
            (better if d["ci"][0] > 0 else worse if d["ci"][1] < 0 else level).append(name)
    return (f"Paired intervals above 0 (pretraining better): {', '.join(better) or 'none'}; below 0 (worse): "
            f"{', '.join(worse) or 'none'}; spanning 0: {len(level)} of {len(better) + len(worse) + len(level)}.")


def _delta(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    ci = d.get("ci")
    return f"{d['value']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{float(seconds) / 60:.1f} min"


register("ssl-method", lambda result, options: render_method(result, options))(_ssl_method)
register("label-efficiency", lambda result, options: render_efficiency(result, options))(_label_efficiency)
