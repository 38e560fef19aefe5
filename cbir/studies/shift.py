"""`cbir study shift`: recipes against shift proxies built from two real datasets (issue 13).

Each recipe (`RECIPES`: TrainSettings overrides, and ModelConfig ones such as "intensity") trains three models
from scratch, each on all patients of its training set but a validation share (no test split: the queries come
from elsewhere):

- R on RSNA (`--data`), queried with a sample of Kermany children (`--other`): adult → paediatric;
- K on a sample of Kermany (its NORMAL2 batch and the query sample left out), queried with every RSNA image
  (paediatric → adult), and with a sample of the NORMAL2 normals (a second acquisition batch: specificity);
- P on RSNA PA views, queried with the RSNA AP views (another projection), and `--robustness` there.

Every figure is the product's own ingest, calibration and `cbir evaluate` with patient-bootstrap CIs. These
proxies are the development set for shift: the scoring sets stay unseen. `StudyOptions.recipes` runs only
some recipes; the other recipes' rows of an earlier shift.json in the same folder (same options) are kept.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cbir.console import QUIET, Reporter
from cbir.data.layout import load_dataset
from cbir.data.records import Records
from cbir.data.splits import SplitSpec, patient_uniform
from cbir.io.phi import shown_path
from cbir.report.doc import slug
from cbir.studies.common import StudyOptions, finish, register

#: No appearance part (`cbir.models.appearance`): the recipes as they were before it.
PLAIN = {"appearance_size": 0}
#: A recipe's `init` that stands for the study's `--init` run (a `cbir pretrain` folder of this machine).
FROM_INIT = "--init"
#: Issue 24's recipes: transfer from packaged ImageNet weights (EfficientNet-Lite0, `cbir.models.packaged`).
IMAGENET: dict[str, dict[str, Any]] = {
    "last 3 groups + head (BN frozen) 224 px": {"image_size": 224, "unfreeze": 3, "freeze_bn": True,
                                                "layer_decay": 0.7, "epochs": 6},
    "288 px: last 3 groups + head (BN frozen)": {"image_size": 288, "unfreeze": 3, "freeze_bn": True,
                                                "layer_decay": 0.7, "epochs": 6},
    "EMA weights: last 3 groups + head (BN frozen) 224 px": {"image_size": 224, "unfreeze": 3, "freeze_bn": True,
                                                      "layer_decay": 0.7, "epochs": 6, "ema": True},
    "3 runs' weights averaged: last 3 groups + head (BN frozen) 224 px": {
        "image_size": 224, "unfreeze": 3, "freeze_bn": True, "layer_decay": 0.7, "epochs": 6, "average_runs": 3},
    "frozen backbone + head 224 px": {"image_size": 224, "unfreeze": 0, "epochs": 6},
    "frozen features with no training (floor)": {"image_size": 224, "epochs": 0},
    "last 3 groups + head (BN trained) 224 px": {"image_size": 224, "unfreeze": 3, "freeze_bn": False,
                                                 "layer_decay": 0.7, "epochs": 6},
    "last 3 groups + head (one learning rate) 224 px": {"image_size": 224, "unfreeze": 3, "freeze_bn": True,
                                                       "layer_decay": 1.0, "epochs": 6},
    "full fine-tune (layer decay 0.7; BN trained) 224 px": {"image_size": 224, "unfreeze": -1,
                                                            "freeze_bn": False, "layer_decay": 0.7, "epochs": 6},
    "full fine-tune at 128 px (layer decay 0.7; BN trained)": {"image_size": 128, "unfreeze": -1, "freeze_bn": False,
                                                            "layer_decay": 0.7, "epochs": 10},
    "Lite1: last 3 groups + head (BN frozen) 240 px": {"backbone": "tf_efficientnet_lite1", "image_size": 240,
                                                        "unfreeze": 3, "freeze_bn": True, "layer_decay": 0.7,
                                                        "epochs": 6},
    "linear probe 2 epochs then last 3 groups (LP-FT) 224 px": {"image_size": 224, "unfreeze": 3,
                                                                 "freeze_bn": True, "layer_decay": 0.7,
                                                                 "epochs": 8, "probe_epochs": 2},
    "cbir pretrain continued (--init) then last 3 groups 224 px": {"image_size": 224, "unfreeze": 3,
                                                                   "freeze_bn": True, "layer_decay": 0.7,
                                                                   "epochs": 6, "init": FROM_INIT},
    "last 3 groups + supcon + balanced + strong augmentation 224 px": {
        "image_size": 224, "unfreeze": 3, "freeze_bn": True, "layer_decay": 0.7, "epochs": 6, "augment": "strong",
        "metric_loss": "supcon", "balanced": True},
}
RECIPES: dict[str, dict[str, Any]] = {
    "classifier (old default)": PLAIN,
    "retrieval: supcon + balanced + strong augmentation": {"augment": "strong", "metric_loss": "supcon",
                                                          "balanced": True, **PLAIN},
    "classifier + histogram equalisation": {"intensity": "equalize", **PLAIN},
    "classifier + CLAHE": {"intensity": "clahe", **PLAIN},
    "classifier + appearance (new default)": {},
    "frozen untrained network + appearance (baseline)": {"epochs": 0},
    # issue 24: transfer from packaged ImageNet weights (EfficientNet-Lite0, `cbir.models.packaged`)
    **{f"ImageNet: {name}": {"backbone": "tf_efficientnet_lite0", **recipe} for name, recipe in IMAGENET.items()},
}
#: Recipe → the recipe whose trained weights it reuses: it differs only in the appearance part, which does not
#: change training (`cbir.train.reuse.reusable_run` fits it on the same training images).
SAME_TRAINING = {"classifier + appearance (new default)": "classifier (old default)"}
#: Recipe keys that go to `ModelConfig` (the rest are `TrainSettings` fields).
MODEL_KEYS = ("intensity", "appearance_size", "appearance_weight", "backbone", "image_size")
#: Kermany samples (normal, pneumonia): NORMAL2 left out, few normals remain (597 of 1,341), so both samples
#: are drawn per class.
KERMANY_QUERIES, KERMANY_TRAIN_TOTAL, NORMAL2_QUERIES = (150, 350), 1000, 300


def _sample(records: Records, n: int, salt: str) -> Records:
    """About `n` images, whole patients, by a seeded hash of the patient."""
    u = patient_uniform(records.meta["patient"], salt)
    if len(records) <= n:
        return records
    cut = np.sort(u)[n - 1]
    return records.subset(u <= cut)


def _views(records: Records) -> np.ndarray:
    from cbir.io.dicom import read_header
    return np.array([str(read_header(p).get("ViewPosition", "") or "").upper() for p in records.meta["path"]])


def _by_class(records: Records, counts: tuple[int, ...], salt: str) -> Records:
    """About counts[c] images of class c, whole patients, by a seeded hash of the patient."""
    parts = [_sample(records.subset(records.y == c), n, f"{salt}-{c}") for c, n in enumerate(counts)]
    keep = records.meta["relpath"].isin(set().union(*(set(p.meta["relpath"]) for p in parts))).to_numpy()
    return records.subset(keep)


def build_sets(options: StudyOptions) -> dict[str, Records]:
    """The training sets and query sets of the proxies (a 10 % validation split inside each training set)."""
    spec = SplitSpec(seed=options.seed, val_fraction=0.1, test_fraction=0.0)
    rsna = load_dataset(options.data, options.layout, split=spec)
    assert options.other is not None  # `cbir study shift` requires --other
    kermany = load_dataset(options.other, "auto", split=spec)
    normal2 = kermany.meta["relpath"].str.contains("NORMAL2-").to_numpy()
    first = kermany.subset(~normal2)
    counts = tuple(min(n, int((first.y == c).sum()) // 3) for c, n in enumerate(KERMANY_QUERIES))
    queries = _by_class(first, counts, "shift-queries")   # at most a third of a class, so training keeps most
    rest = first.subset(~first.meta["patient"].isin(set(queries.meta["patient"])).to_numpy())
    normals = int((rest.y == 0).sum())
    train = _by_class(rest, (normals, KERMANY_TRAIN_TOTAL - normals), "shift-train")
    views = _views(rsna)
    return {"rsna": rsna, "kermany-queries": queries, "kermany-train": train.with_split(spec),
            "normal2": _sample(kermany.subset(normal2), NORMAL2_QUERIES, "shift-normal2"),
            "rsna-pa": rsna.subset(views == "PA").with_split(spec), "rsna-ap": rsna.subset(views == "AP")}


PROXIES = (  # (name, training set, query set, with --robustness)
    ("RSNA → Kermany", "rsna", "kermany-queries", False),
    ("Kermany → RSNA", "kermany-train", "rsna", False),
    ("Kermany → NORMAL2 (specificity)", "kermany-train", "normal2", False),
    ("RSNA PA → AP", "rsna-pa", "rsna-ap", True),
)


def _train(records: Records, options: StudyOptions, overrides: dict[str, Any], out: Path, reporter: Reporter,
           base: Path | None = None) -> tuple[Any, float]:
    """Train (or reuse) one recipe's model in `out`; `base`: a folder whose trained weights `out` may start from
    (a recipe that differs only in the appearance part, `SAME_TRAINING`)."""
    from cbir.models import ModelConfig, load_checkpoint
    from cbir.models.device import resolve_device
    from cbir.train import TrainSettings, train_model
    model_overrides: dict[str, Any] = {"backbone": options.backbone, "image_size": options.image_size} | {
        k: v for k, v in overrides.items() if k in MODEL_KEYS}
    config = ModelConfig(label_names=list(records.label_names), target=records.target, **model_overrides)
    config.validate()
    # one training run unless the recipe says otherwise, so that each row keeps the meaning it was measured with
    fields: dict[str, Any] = {"epochs": options.epochs, "batch_size": options.batch_size, "device": options.device,
                              "seed": options.seed, "average_runs": 1, "ema": False}
    if overrides.get("init") == FROM_INIT:   # `selected_recipes` made sure that there is one
        overrides = overrides | {"init": str(options.init[0])}
    settings = TrainSettings(**(fields | {k: v for k, v in overrides.items() if k not in MODEL_KEYS}))
    started = time.perf_counter()
    from dataclasses import asdict

    from cbir.train.reuse import reusable_run
    wanted = {"backbone": config.backbone, "image_size": config.image_size, "intensity": config.intensity}
    if config.has_appearance:
        wanted |= {k: v for k, v in asdict(config).items() if k.startswith("appearance_")}
    else:
        wanted |= {"appearance_size": 0}
    if base is not None and not out.exists() and (base / "model.safetensors").exists():
        shutil.copytree(base, out)
    previous = reusable_run(out, wanted, asdict(settings), records)
    if previous is not None:
        reporter.log(f"reusing {out} (trained with these settings on these images)")
        return load_checkpoint(out, device=resolve_device(settings.device)), previous
    train_model(records, config, settings, out, reporter)
    return load_checkpoint(out, device=resolve_device(settings.device)), \
        round(time.perf_counter() - started, 1)


def _scores(report: dict[str, Any]) -> dict[str, Any]:
    s1, s2 = report["stage1"], report["stage2"]
    wv = s2.get("weighted_vote") or {}
    row = {"n_queries": report["n_queries"], "auc": s1.get("roc_auc"), "auc_ci": s1.get("roc_auc_ci"),
           "stage1_balanced": s1.get("balanced_accuracy"), "stage1_specificity": s1.get("specificity"),
           "knn_accuracy": s2.get("knn_accuracy"), "knn_balanced": s2.get("balanced_accuracy"),
           "knn_balanced_ci": s2.get("balanced_accuracy_ci"), "knn_specificity": s2.get("specificity"),
           "map": s2.get("map_at_k"), "map_ci": s2.get("map_at_k_ci"),
           "vote_accuracy": wv.get("accuracy"), "vote_balanced": wv.get("balanced_accuracy"),
           "vote_balanced_ci": wv.get("balanced_accuracy_ci"), "vote_specificity": wv.get("specificity"),
           "vote_minus_model": wv.get("minus_model_balanced_accuracy"),
           "vote_minus_model_ci": wv.get("minus_model_balanced_accuracy_ci"),
           "agreement": wv.get("agreement_with_model")}
    robust = report.get("robustness")
    if robust:
        row["rank1"] = {name: r["rank1"] for name, r in robust["reencodings"].items()}
    return row


def run_shift(options: StudyOptions, reporter: Reporter = QUIET) -> dict[str, Any]:
    from cbir.app.evaluate import evaluate_collection
    from cbir.app.ingest import ingest_records
    from cbir.io import load_pseudonymizer
    from cbir.store import open_index
    chosen = selected_recipes(options.recipes, options.init)
    sets = build_sets(options)
    pseudonymize = load_pseudonymizer()
    saved = _options_record(options)
    rows, seconds = _earlier_rows(options.out / "shift.json", saved, set(chosen))
    for recipe in chosen:
        overrides = RECIPES[recipe]
        models: dict[str, Any] = {}
        seconds[recipe] = {}
        for proxy, train_name, query_name, robust in PROXIES:
            reporter.log(f"== {recipe}: {proxy}")
            scratch = Path(tempfile.mkdtemp(prefix="cbir-shift-"))
            try:
                if train_name not in models:
                    base = SAME_TRAINING.get(recipe)
                    models[train_name] = _train(
                        sets[train_name], options, overrides, options.out / "models" / f"{_slug(recipe)}-{train_name}",
                        reporter, None if base is None else options.out / "models" / f"{_slug(base)}-{train_name}")
                    seconds[recipe][train_name] = models[train_name][1]
                loaded = models[train_name][0]
                with open_index(str(scratch / "index"), writable=True, create=True) as index:
                    ingest_records(sets[train_name], loaded, index, "shift", pseudonymize, reporter=reporter)
                    report = evaluate_collection(index, "shift", loaded, options.out / "reports" / _slug(recipe)
                                                 / _slug(proxy), queries_from=sets[query_name],
                                                 pseudonymize=pseudonymize, reporter=reporter, robustness=robust)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            rows.setdefault(proxy, {})[recipe] = _scores(report)
    sizes = {name: len(records) for name, records in sets.items()}
    order = list(RECIPES)
    rows = {proxy: dict(sorted(by.items(), key=lambda kv: _rank(order, kv[0]))) for proxy, by in rows.items()}
    seconds = dict(sorted(seconds.items(), key=lambda kv: _rank(order, kv[0])))
    result = {"rows": rows, "train_seconds": seconds, "sizes": sizes, "options": saved}
    return finish("shift", options, result, render_shift(result, options))


def selected_recipes(names: list[str], init: list[Path] | None = None) -> list[str]:
    """The recipes to run, in `RECIPES` order (when `names` is empty: all, but those that continue a `cbir pretrain`
    run unless `init` gives one); `CbirError` for an unknown name, or a named pretrain recipe without one `init`."""
    from cbir.errors import CbirError
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise CbirError(f"unknown recipe {unknown[0]!r} (choose from {'; '.join(RECIPES)})")
    needs = [n for n in names if RECIPES[n].get("init") == FROM_INIT]
    if needs and len(init or []) != 1:
        raise CbirError(f"recipe {needs[0]!r} continues a `cbir pretrain` run: give it as --init RUN (one)")
    return [r for r in RECIPES if r in names or not names and (init or RECIPES[r].get("init") != FROM_INIT)]


def _options_record(options: StudyOptions) -> dict[str, Any]:
    return {"data": shown_path(options.data), "other": shown_path(options.other) if options.other else None,
            "backbone": options.backbone,
            "image_size": options.image_size, "epochs": options.epochs, "seed": options.seed}


def _earlier_rows(path: Path, saved: dict[str, Any], chosen: set[str]
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    """Rows and training seconds of the recipes not run now, from an earlier shift.json with the same options."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, {}
    if earlier.get("options") != saved:
        return {}, {}
    rows = {proxy: {r: row for r, row in by.items() if r not in chosen}
            for proxy, by in (earlier.get("rows") or {}).items()}
    seconds = {r: s for r, s in (earlier.get("train_seconds") or {}).items() if r not in chosen}
    return rows, seconds


def _rank(order: list[str], recipe: str) -> int:
    return order.index(recipe) if recipe in order else len(order)


def _slug(text: str) -> str:
    return slug(text).strip("-")[:40]


def _ci(value: Any, ci: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def render_shift(result: dict[str, Any], options: StudyOptions) -> str:
    saved = result.get("options", {})
    sizes = result.get("sizes", {})
    lines = ["### Recipes against shift proxies (`cbir study shift`)", "",
             f"{saved.get('backbone')} from scratch at {saved.get('image_size')} px, {saved.get('epochs')} epochs, "
             "unless the recipe says otherwise (the ImageNet recipes: `IMAGENET` in cbir/studies/shift.py), "
             f"seed {saved.get('seed')}. Training sets: RSNA {sizes.get('rsna')} images, RSNA PA "
             f"{sizes.get('rsna-pa')}, Kermany sample {sizes.get('kermany-train')} (10 % of each for validation "
             f"and the vote's calibration). Queries: Kermany sample {sizes.get('kermany-queries')}, RSNA "
             f"{sizes.get('rsna')}, NORMAL2 {sizes.get('normal2')}, RSNA AP {sizes.get('rsna-ap')}. 95 % "
             "patient-bootstrap intervals; k = 10. *Vote* is the weighted, prior-corrected, calibrated vote "
             "(docs/metrics.md); *kNN* the plain majority of 10; *vote − model* the vote's balanced accuracy "
             "minus the model's on the same queries, with a paired interval (n/a: rows measured before it). On "
             "NORMAL2 every query is normal: the balanced accuracies are the specificities.", "",
             "| proxy | recipe | stage-1 AUC | stage-1 bal. acc. | kNN bal. acc. | vote bal. acc. | vote − model | "
             "vote spec. | mAP@10 | agreement | rank-1 (min) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for proxy, by_recipe in result["rows"].items():
        for recipe, r in by_recipe.items():
            rank1 = min(r["rank1"].values()) if r.get("rank1") else None
            cells = [_ci(r["auc"], r.get("auc_ci")), _ci(r["stage1_balanced"], None),
                     _ci(r["knn_balanced"], r.get("knn_balanced_ci")),
                     _ci(r["vote_balanced"], r.get("vote_balanced_ci")),
                     _ci(r.get("vote_minus_model"), r.get("vote_minus_model_ci")),
                     _ci(r["vote_specificity"], None), _ci(r["map"], r.get("map_ci")), _ci(r["agreement"], None),
                     _ci(rank1, None)]
            lines.append(f"| {proxy} | {recipe} | " + " | ".join(cells) + " |")
    secs = result.get("train_seconds", {})
    lines += ["", "Training time on this 2-core CPU, seconds: " + "; ".join(
        f"{recipe}: " + ", ".join(f"{k} {v:.0f}" for k, v in by.items()) for recipe, by in secs.items()) + "."]
    return "\n".join(lines)


register("shift", render_shift)(run_shift)
