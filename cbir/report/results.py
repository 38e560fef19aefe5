"""The Markdown of `cbir reproduce`: per-fold means ± sd, pooled figures with 95 % intervals, and a README
headline, all rendered from results.json."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np


def _values(results: dict[str, Any], task: str, name: str) -> list[float]:
    return [r[name] for r in results["folds"] if r["task"] == task and r.get(name) is not None]


def _ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """mean ± sd (sample sd over folds; one fold: the value alone)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        return f"{scale * v[0]:.{digits}f}"
    return f"{scale * v.mean():.{digits}f} ± {scale * v.std(ddof=1):.{digits}f}"


def _ci(value: float | None, interval: list[float] | None, scale: float = 100.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{scale * value:.1f}"
    return text + (f" ({scale * interval[0]:.1f}–{scale * interval[1]:.1f})" if interval else "")


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _command(options: dict[str, Any]) -> str:
    parts = ["cbir reproduce", f"--data {options['data']}", f"--out {options['out']}"]
    if options.get("nih"):
        parts.append(f"--nih {options['nih']}")
        if options.get("nih_image_size"):
            parts.append(f"--nih-image-size {options['nih_image_size']}")
    parts += [f"--folds {options['folds']}"] + [f"--{flag.replace('_', '-')} {options[flag]}"
                                                for flag in ("backbone", "image_size", "epochs") if options.get(flag)]
    if options.get("tasks"):
        parts += [f"--task {t}" for t in options["tasks"]]
    return " ".join(parts)


def render_results(results: dict[str, Any]) -> tuple[str, str]:
    """(the results Markdown, a one-paragraph headline for the README)."""
    options, tasks, approaches = results["options"], results["tasks"], results["approaches"]
    k = options["k"]
    folds_done = sorted({r["fold"] for r in results["folds"]})
    n_folds = options["folds"]
    scheme = f"{n_folds}-fold cross-validation by patient" if n_folds else "one hold-out split by patient"
    lines = [f"### `cbir reproduce` on `{options['data']}`: {scheme}", "", "```bash", _command(options), "```", ""]
    first = next((r for r in results["folds"]), None)
    status = "" if results.get("complete") else f" **Partial: {len(folds_done)} of {n_folds or 1} folds so far.**"
    if first:
        lines += [f"{_recipes(results)}, on {results['device']}; each fold's model trains on the "
                  f"other folds (validation {options['val_fraction']:g} of all patients, inside them) and its "
                  f"{first['n_queries']} or so test patients query the other folds' {first['n_archive']} images "
                  f"(k = {k}, same-patient neighbours excluded). Wall time of the whole command: "
                  f"{results['seconds'] / 60:.0f} min.{status}", ""]
    lines += ["Mean ± sd over the folds, in percent. The seed's figures are its thesis' table on the full challenge "
              "set (26,684 patients).", "",
              f"| Approach | trained on | Stage-1 ROC-AUC | kNN accuracy | kNN balanced accuracy | mAP@{k} | "
              "majority baseline | seed: ROC-AUC / kNN accuracy |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    seed = results.get("seed_table") or {}
    for task in tasks:
        trained = sorted({r["trained_on"] for r in results["folds"] if r["task"] == task})
        if not trained:
            continue
        audited = ((results.get("audit") or {}).get("multilabel_training") or {}) if task == "multilabel" else {}
        if audited.get("dataset") in trained:   # what the multilabel model trained on, after the leakage audit
            trained = [f"{audited['dataset']}: {audited['images'] - audited['left_out']} of {audited['images']} "
                       f"images ({audited['left_out']} {audited['against']} duplicates left out)"]
        ref = seed.get(task)
        cells = [_ms(_values(results, task, name))
                 for name in ("roc_auc", "knn_accuracy", "balanced_accuracy", "map_at_k", "majority_accuracy")]
        lines.append(f"| {approaches[task]} | {', '.join(trained)} | {' | '.join(cells)} | "
                     f"{'—' if not ref else f'{100 * ref[0]:.2f} / {100 * ref[1]:.2f}'} |")
    pooled = results.get("pooled") or {}
    lines += ["", "Pooled over the folds (each patient is a query once), with 95 % bootstrap intervals that "
              "resample patients. Two approaches whose intervals overlap are not shown to differ.", "",
              f"| Approach | queries | Stage-1 ROC-AUC | kNN accuracy | kNN balanced accuracy | mAP@{k} | "
              "majority baseline |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += _pooled_rows(tasks, approaches, pooled, lambda p: [
        str(p["n_queries"]), _ci(p["roc_auc"], p["roc_auc_ci"]), _ci(p["knn_accuracy"], p["knn_accuracy_ci"]),
        _ci(p["balanced_accuracy"], p["balanced_accuracy_ci"]), _ci(p["map_at_k"], p["map_at_k_ci"]),
        _ci(p["majority_accuracy"], None)])
    lines += ["", "Per-class recall, pooled: the model's own prediction (its calibrated probability at its operating "
              "point, docs/metrics.md) beside the kNN vote.",
              "", "| Approach | model sensitivity | model specificity | model balanced accuracy | kNN sensitivity | "
              "kNN specificity |", "|---|---:|---:|---:|---:|---:|"]
    lines += _pooled_rows(tasks, approaches, pooled, lambda p: [
        _pct(p["model"]["sensitivity"]), _pct(p["model"]["specificity"]),
        _ci(p["model_balanced_accuracy"], p["model_balanced_accuracy_ci"]), _pct(p["knn"]["sensitivity"]),
        _pct(p["knn"]["specificity"])])
    lines += _vote(tasks, approaches, pooled)
    lines += _codes(results, k) + _detection(results) + _multilabel(results) + _audit(results) + _times(results)
    return "\n".join(lines) + "\n", _headline(results)


def _vote(tasks: list[str], approaches: dict[str, str], pooled: dict[str, Any]) -> list[str]:
    """The calibrated vote (what query, montage and serve show), pooled, beside the model: stage 2 − stage 1."""
    if not any(p.get("vote_balanced_accuracy") is not None for p in pooled.values()):
        return []
    return ["", "The calibrated vote (weighted, prior-corrected: what `cbir query` shows), pooled, and its balanced "
            "accuracy minus the model's on the same queries (paired 95 % interval).", "",
            "| Approach | vote sensitivity | vote specificity | vote balanced accuracy | vote − model |",
            "|---|---:|---:|---:|---:|"] + _pooled_rows(
        [t for t in tasks if (pooled.get(t) or {}).get("vote")], approaches, pooled, lambda p: [
            _pct(p["vote"]["sensitivity"]), _pct(p["vote"]["specificity"]),
            _ci(p["vote_balanced_accuracy"], p["vote_balanced_accuracy_ci"]),
            _ci(p["vote_minus_model_balanced_accuracy"], p["vote_minus_model_balanced_accuracy_ci"])])


def _pooled_rows(tasks: list[str], approaches: dict[str, str], pooled: dict[str, Any],
                 cells: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    return [f"| {approaches[task]} | " + " | ".join(cells(pooled[task])) + " |" for task in tasks if pooled.get(task)]


def _codes(results: dict[str, Any], k: int) -> list[str]:
    rows = [r for r in results["folds"] if r.get("codes")]
    if not rows:
        return []
    lines = ["", f"Binary codes (mean ± sd over folds): Hamming-ranking mAP@{k} and kNN accuracy after a Hamming "
             "prefilter to 10 % of the archive, for the model's own code (the learned hash layer for the hash "
             "approach, LSH otherwise), LSH and ITQ fitted on the archive.", "",
             f"| Approach | code | Hamming mAP@{k} | prefilter + kNN accuracy |", "|---|---|---:|---:|"]
    for task in results["tasks"]:
        mine = [r for r in rows if r["task"] == task]
        for code in ("model", "lsh", "itq"):
            maps = [r["codes"][code]["hamming_map_at_k"] for r in mine if code in r["codes"]]
            accs = [r["codes"][code]["prefilter_knn_accuracy"] for r in mine if code in r["codes"]]
            if maps:
                lines.append(f"| {results['approaches'][task]} | {code} | {_ms(maps)} | {_ms(accs)} |")
    return lines


def _detection(results: dict[str, Any]) -> list[str]:
    maps = _values(results, "detection", "box_map")
    if not maps:
        return []
    return ["", f"Detection: box mAP (RSNA metric, IoU 0.40–0.75, original pixels, box threshold chosen on "
            f"validation) on the test folds: {_ms(maps)} %."]


def _multilabel(results: dict[str, Any]) -> list[str]:
    rows = [r for r in results["folds"] if r["task"] == "multilabel" and r["heldout"].get("per_class_auc")]
    if not rows:
        return []
    names = list(rows[0]["heldout"]["per_class_auc"])
    lines = ["", f"Multilabel: per-finding ROC-AUC on the {rows[0]['heldout']['dataset']} test folds "
             "(mean ± sd; n/a where a fold has one class only).", "", "| Finding | ROC-AUC |", "|---|---:|"]
    for name in names:
        lines.append(f"| {name} | {_ms([r['heldout']['per_class_auc'][name] for r in rows])} |")
    own = [r["heldout"].get("retrieval") for r in rows if r["heldout"].get("retrieval")]
    if own:
        lines += ["", f"In its own {rows[0]['heldout']['dataset']} archive: mAP@k where relevant means at least "
                  f"one shared finding (\"No Finding\" included) {_ms([o['map_at_k_any_finding'] for o in own])}; "
                  f"Pneumonia kNN accuracy {_ms([o['knn_accuracy'] for o in own])} against a majority baseline of "
                  f"{_ms([o['majority_accuracy'] for o in own])}."]
    return lines


def _audit(results: dict[str, Any]) -> list[str]:
    """The leakage audit (`cbir.app.audit`): what the multilabel model's training data left out, and the
    queries each approach's evaluation left out as near-duplicates of another patient's archive image, or that
    it could not look for them."""
    training = (results.get("audit") or {}).get("multilabel_training")
    lines = ["", "Leakage audit (`cbir audit`, near-duplicates by the tiny image's cosine)."]
    if training:
        lines.append(f"The multilabel model trains on {training['description']}.")
    audited, not_audited = [], []
    for task in results["tasks"]:
        notes = [r.get("duplicates") for r in results["folds"] if r["task"] == task]
        if not notes:
            continue
        if all(n and n.get("audited") for n in notes):
            audited.append(f"{results['approaches'][task]} {sum(n['excluded'] for n in notes)}")
        else:
            not_audited.append(results["approaches"][task])
    if audited:
        lines.append("Queries left out because their archive holds a near-duplicate of another patient's image "
                     f"(all folds): {', '.join(audited)}.")
    if not_audited:
        lines.append(f"**Not audited** (the embedding has no appearance part, so duplicates of queries may be in the "
                     f"archive): {', '.join(not_audited)}.")
    return lines if len(lines) > 2 else []


def _times(results: dict[str, Any]) -> list[str]:
    lines = ["", "Seconds per fold (mean): train / ingest (whole dataset) / evaluate.", "",
             "| Approach | train s | ingest s | evaluate s |", "|---|---:|---:|---:|"]
    for task in results["tasks"]:
        mine = [r["seconds"] for r in results["folds"] if r["task"] == task]
        if mine:
            lines.append(f"| {results['approaches'][task]} | " + " | ".join(
                f"{np.mean([s.get(step, 0.0) for s in mine]):.0f}" for step in ("train", "ingest", "evaluate")) + " |")
    return lines


def _binary_recipe(results: dict[str, Any]) -> str:
    recipe = (results.get("recipes") or {}).get("binary")
    if recipe:
        return str(recipe["description"])
    options = results["options"]
    return f"{options['backbone']} trained from scratch at {options['image_size']} px"


def _recipes(results: dict[str, Any]) -> str:
    """How the models were trained, per approach (results.json before `recipes` existed: one recipe)."""
    recipes = results.get("recipes")
    if not recipes:
        options = results["options"]
        return (f"{options['backbone']} from random initialisation at {options['image_size']} px, "
                f"{options['epochs']} epochs per model")
    return "; ".join(f"{task}: {r['description']}" for task, r in recipes.items())


def _headline(results: dict[str, Any]) -> str:
    options = results["options"]
    p = (results.get("pooled") or {}).get("binary")
    if not p:
        return ""
    n_folds = options["folds"]
    scheme = f"{n_folds}-fold cross-validation by patient" if n_folds else "a hold-out split by patient"
    trained = next((r["trained_on"] for r in results["folds"] if r["task"] == "binary"), "")
    name = {"rsna": "RSNA pneumonia X-rays", "nih": "NIH ChestX-ray14 images"}.get(trained, f"{trained} images")
    opening = (f"On {name} ({p['n_patients']} patients of `{options['data']}`, {scheme}, "
               f"{_binary_recipe(results)} on {results['device']}), the binary model's stage-1 ROC-AUC is "
               f"**{_ci(p['roc_auc'], p['roc_auc_ci'])} %**")
    majority = f"{_pct(p['majority_accuracy'])} % accuracy for always predicting the majority class"
    closing = ("(95 % bootstrap intervals by patient, folds pooled). Per-fold means ± sd and the other approaches: "
               "[docs/results.md](docs/results.md).")
    knn = (f"{_ci(p['balanced_accuracy'], p['balanced_accuracy_ci'])} % balanced accuracy and "
           f"{_ci(p['knn_accuracy'], p['knn_accuracy_ci'])} % accuracy")
    if p.get("vote_balanced_accuracy") is None:   # results made before the calibrated vote was pooled
        return f"{opening} and the kNN vote over the Qdrant index reaches **{knn}**, against {majority} {closing}"
    k = p.get("k") or options.get("k")
    difference = p.get("vote_minus_model_balanced_accuracy")
    paired = ("" if difference is None else " (minus the model's own balanced accuracy: "
              f"{_ci(difference, p.get('vote_minus_model_balanced_accuracy_ci'))} points, a paired interval)")
    return (f"{opening}, and the calibrated vote of its {k} nearest cases in the Qdrant index (what `cbir query` "
            f"shows) reaches **{_ci(p['vote_balanced_accuracy'], p['vote_balanced_accuracy_ci'])} % balanced "
            f"accuracy**{paired}. Baselines: {majority}, and the plain majority of the {k} neighbours, {knn} "
            f"{closing}")
