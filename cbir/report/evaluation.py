"""Write an evaluation report: `report.json`, `report.md`, `roc.png` and `precision_at_k.png`.

Plots use matplotlib's Agg canvas on a standalone `Figure` (no pyplot), so nothing changes the
process-wide backend or keeps figures alive. The report never holds image paths or patient keys:
`context` keys that name them are refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cbir import metrics
from cbir.evaluation.summary import to_json_safe

FIGSIZE = (5.0, 4.0)
DPI = 120

#: Keys (at any depth of the report or its context) that would leak images or patients.
FORBIDDEN_KEYS = frozenset(
    {"patient", "patient_id", "patient_ids", "relpath", "relpaths", "image_path", "image_paths"}
)


def write_report(
    report: dict,
    out_dir: Path,
    y_query: np.ndarray,
    prob_query: np.ndarray,
    title: str,
    context: dict,
) -> dict[str, Path]:
    """Write the four report files into `out_dir` (created if missing) and return their paths.

    `report` is `cbir.evaluation.summarize`'s dict; `y_query` / `prob_query` draw the Stage 1 ROC;
    `context` (model, collection, dataset, timings, …) goes into `report.json` and the Markdown table.
    Returns `{"json", "markdown", "roc", "precision_at_k"}` → path.
    """
    payload = to_json_safe({**report, "title": title, "context": context})
    _refuse_private_keys(payload)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "roc": out / "roc.png",
        "precision_at_k": out / "precision_at_k.png",
    }
    paths["json"].write_text(json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n")
    _plot_roc(np.asarray(y_query), np.asarray(prob_query), paths["roc"])
    _plot_precision(payload, paths["precision_at_k"])
    paths["markdown"].write_text(render_markdown(payload, paths["roc"].name, paths["precision_at_k"].name))
    return paths


def _refuse_private_keys(value: Any, where: str = "report") -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if str(key).lower() in FORBIDDEN_KEYS:
                raise ValueError(f"{where}.{key}: patient keys and image paths do not belong in a report")
            _refuse_private_keys(item, f"{where}.{key}")
    elif isinstance(value, list):
        for item in value:
            _refuse_private_keys(item, where)


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------


def _new_axes() -> tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    fig.clear()


def _plot_roc(y: np.ndarray, prob: np.ndarray, path: Path) -> None:
    """Stage 1 ROC curve with its AUC in the legend and the chance diagonal."""
    fig, ax = _new_axes()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance (AUC 0.500)")
    auc = metrics.roc_auc(y, prob)
    if np.isnan(auc):
        ax.text(0.5, 0.6, "ROC undefined:\nthe queries hold one class only", ha="center", va="center")
    else:
        fpr, tpr, _ = metrics.roc_curve(y, prob)
        ax.plot(fpr, tpr, color="C0", linewidth=1.8, label=f"Stage 1 (AUC {auc:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="False positive rate", ylabel="True positive rate")
    ax.set_title("ROC, Stage 1 classifier")
    ax.legend(loc="lower right")
    _save(fig, path)


def _plot_precision(payload: dict, path: Path) -> None:
    """Precision@k for k = 1..K against the majority-baseline accuracy (dashed)."""
    curve = payload["stage2"]["precision_curve"]
    ks = sorted(int(k) for k in curve)
    values = [np.nan if curve[str(k)] is None else curve[str(k)] for k in ks]
    base = payload["baseline"]
    fig, ax = _new_axes()
    ax.plot(ks, values, marker="o", markersize=3, color="C0", label="kNN precision@k")
    if base["majority_accuracy"] is not None:
        ax.axhline(
            base["majority_accuracy"], linestyle="--", color="C3",
            label=f"majority baseline ({_label_name(payload)}) {base['majority_accuracy']:.3f}",
        )
    ax.axvline(payload["k"], linestyle=":", color="grey", label=f"k = {payload['k']} (voting)")
    ax.set(ylim=(0, 1.02), xlabel="k (neighbours retrieved)", ylabel="precision@k")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Retrieval precision@k")
    ax.legend(loc="lower right")
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------


def _class_names(payload: dict) -> tuple[str, str]:
    """(positive, negative) class names: the context's target and negative label when it has them."""
    context = payload.get("context") or {}
    positive = str(context.get("target") or payload.get("task", "positive"))
    return positive, str(context.get("negative_label") or f"not {positive}")


def _label_name(payload: dict) -> str:
    """Human name of the majority label."""
    positive, negative = _class_names(payload)
    return positive if payload["baseline"]["majority_label"] == 1 else negative


def _fmt(value: Any, float_format: str = ".3f") -> str:
    """A table cell: metrics with 3 decimals (`float_format`), `n/a` for undefined, `|` escaped."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return format(value, float_format)
    if isinstance(value, list):
        return ", ".join(_fmt(v, float_format) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(mapping: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _context_table(payload: dict) -> list[str]:
    rows = [("task", payload.get("task")), ("queries", payload.get("n_queries")),
            ("archive", payload.get("n_archive")), ("k", payload.get("k"))]
    rows += _flatten(payload.get("context") or {})
    cells = [f"| {_fmt(name)} | {_fmt(value, '.4g')} |" for name, value in rows]
    return ["| Item | Value |", "|---|---|", *cells]


def _metrics_table(payload: dict) -> list[str]:
    s1, s2, base, k = payload["stage1"], payload["stage2"], payload["baseline"], payload["k"]
    rows = [
        ("Stage 1 ROC-AUC", s1["roc_auc"], s1.get("roc_auc_ci"), 0.5),
        (f"Stage 1 accuracy (p ≥ {s1.get('operating_point', 0.5):.3g})", s1.get("accuracy", s1["accuracy_at_0.5"]),
         None, base["majority_accuracy"]),
        (f"Stage 1 balanced accuracy (p ≥ {s1.get('operating_point', 0.5):.3g})", s1["balanced_accuracy"], None,
         base["majority_balanced_accuracy"]),
        *([("Box mAP (RSNA metric, IoU 0.40–0.75)", s1["box_map"], None, "—")] if "box_map" in s1 else []),
        *_vote_rows(s2.get("weighted_vote"), base),
        (f"Majority of {k} accuracy (baseline)", s2["knn_accuracy"], s2.get("knn_accuracy_ci"),
         base["majority_accuracy"]),
        (f"Majority of {k} balanced accuracy (baseline)", s2["balanced_accuracy"], s2.get("balanced_accuracy_ci"),
         base["majority_balanced_accuracy"]),
        (f"kNN vote-share ROC-AUC (k={k})", s2.get("vote_auc"), None, 0.5),
        (f"Precision@{k}", s2["precision_at_k"], None, "—"),
        (f"mAP@{k} (AP@k / min(k, R))", s2["map_at_k"], s2.get("map_at_k_ci"), "—"),
        *([(f"mAP@{k}, divided by the hits (hashing variant)", s2["map_at_k_hits"], None, "—")]
          if "map_at_k_hits" in s2 else []),
        *((name, value, None, ref) for name, value, ref in _optional_rows(s2, k, base)),
        (f'Majority baseline accuracy (always "{_label_name(payload)}")', base["majority_accuracy"], None, "—"),
    ]
    ci = payload.get("ci") or {}
    lines = ["| Metric | Value | 95 % CI | Majority baseline |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {_fmt(value)} | {_fmt_ci(interval)} | {_fmt(ref)} |" for name, value, interval, ref in rows]
    if ci:
        lines += ["", f"95 % intervals: {ci.get('method', 'bootstrap')}, {ci.get('replicates')} replicates "
                  f"resampling the {ci.get('resampled', 'queries')}. Two figures whose intervals overlap may "
                  "differ by noise alone."]
    return lines


def _vote_rows(vote: dict | None, base: dict) -> list[tuple[str, Any, Any, Any]]:
    """The vote that `cbir query` shows (weighted, prior-corrected, calibrated; its label is its probability at
    the stated operating point): the stage-2 headline. Reports without it have none."""
    if not vote:
        return []
    return [("Vote accuracy (what cbir query shows)", vote["accuracy"], None, base["majority_accuracy"]),
            ("Vote balanced accuracy (what cbir query shows)", vote["balanced_accuracy"],
             vote.get("balanced_accuracy_ci"), base["majority_balanced_accuracy"]),
            ("Vote minus model, balanced accuracy (paired)", vote["minus_model_balanced_accuracy"],
             vote.get("minus_model_balanced_accuracy_ci"), "—"),
            ("Vote probability ROC-AUC", vote.get("probability_auc"), None, 0.5)]


def _fmt_ci(interval: Any) -> str:
    return "—" if not interval else f"{interval[0]:.3f}–{interval[1]:.3f}"


def _optional_rows(s2: dict, k: int, base: dict) -> list[tuple[str, Any, Any]]:
    """Rows for the stage-2 metrics that only some reports carry (codes, multilabel)."""
    rows = []
    if "map_at_k_any_finding" in s2:
        rows.append((f"mAP@{k}, any shared finding", s2["map_at_k_any_finding"], "—"))
    if "hamming_map_at_k" in s2:
        rows.append((f"mAP@{k}, Hamming ranking of the codes", s2["hamming_map_at_k"], "—"))
    if "prefilter_knn_accuracy" in s2:
        rows.append((f"kNN accuracy (k={k}) after a Hamming prefilter to {s2.get('prefilter_size', '?')}",
                     s2["prefilter_knn_accuracy"], base["majority_accuracy"]))
    return rows


def _recall_table(payload: dict) -> list[str]:
    """Sensitivity and specificity of the vote and of the plain majority of k beside the model's own."""
    s1, s2 = payload["stage1"], payload["stage2"]
    if "sensitivity" not in s2:
        return []
    positive, negative = _class_names(payload)
    vote = s2.get("weighted_vote") or {}
    point = f"{s1.get('operating_point', 0.5):.3g}"
    return [f"| Per-class recall | model (p ≥ {point}) | vote | majority of {payload['k']} |", "|---|---:|---:|---:|",
            f"| sensitivity (recall of {positive}) | {_fmt(s1.get('sensitivity'))} | {_fmt(vote.get('sensitivity'))} "
            f"| {_fmt(s2['sensitivity'])} |",
            f"| specificity (recall of {negative}) | {_fmt(s1.get('specificity'))} | {_fmt(vote.get('specificity'))} "
            f"| {_fmt(s2['specificity'])} |", ""]


def _per_class_table(payload: dict) -> list[str]:
    """Stage 1 ROC-AUC per label (multilabel reports), or nothing."""
    aucs = payload["stage1"].get("per_class_auc")
    if not aucs:
        return []
    return ["| Label | Stage 1 ROC-AUC |", "|---|---:|", *(f"| {_fmt(name)} | {_fmt(auc)} |"
                                                      for name, auc in aucs.items()), ""]


def _codes_table(payload: dict) -> list[str]:
    """Stage 2 with the model's codes, LSH and archive-fitted ITQ (reports that carry `stage2.codes`)."""
    codes = payload["stage2"].get("codes")
    if not codes:
        return []
    k = payload.get("k", "k")
    return ["| Binary code | Hamming-ranking mAP@" + f"{k} | prefilter + kNN accuracy | prefilter + kNN balanced |",
            "|---|---:|---:|---:|",
            *(f"| {name} | {_fmt(v['hamming_map_at_k'])} | {_fmt(v['prefilter_knn_accuracy'])} | "
              f"{_fmt(v['prefilter_balanced_accuracy'])} |" for name, v in codes.items()), ""]


def _confusion_table(payload: dict) -> list[str]:
    (tn, fp), (fn, tp) = payload["stage2"]["confusion"]
    positive, negative = _class_names(payload)
    return [
        f"| kNN confusion | predicted {negative} | predicted {positive} |", "|---|---:|---:|",
        f"| true {negative} | {tn} | {fp} |", f"| true {positive} | {fn} | {tp} |",
    ]


def interpretation(payload: dict) -> str:
    """One honest sentence comparing kNN accuracy with always predicting the majority label."""
    knn, ba = payload["stage2"]["knn_accuracy"], payload["stage2"]["balanced_accuracy"]
    base = payload["baseline"]
    maj, maj_ba = base["majority_accuracy"], base["majority_balanced_accuracy"]
    name = _label_name(payload)
    if knn is None or maj is None:
        return f'kNN accuracy cannot be compared with always predicting "{name}": no queries.'
    points = 100.0 * (knn - maj)
    direction = "above" if points > 0 else "below"
    side = "level with" if abs(points) < 0.05 else f"{abs(points):.1f} points {direction}"
    return (
        f'kNN accuracy ({100 * knn:.1f}%) is {side} always predicting "{name}" ({100 * maj:.1f}%); '
        f"balanced accuracy is {_fmt(ba)} against {_fmt(maj_ba)} for that baseline."
    )


def _robustness_table(payload: dict) -> list[str]:
    block = payload.get("robustness")
    if not block:
        return []
    base = block["original"]
    lines = ["## Robustness to re-encoding", "",
             f"Each query re-encoded and read back; the original is ranked among {block['archive_size']} archive "
             "points plus every original query (exact cosine). Changes are against the originals embedded in "
             "the same run.", "",
             "| re-encoding | rank-1 | 95 % CI | median rank | kNN accuracy (Δ) | balanced accuracy (Δ) | "
             "mAP (Δ) | AUC (Δ) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    def cell(row: dict, key: str) -> str:
        return f"{_fmt(row['metrics'].get(key))} ({_signed(row['change'].get(key))})"
    for name, row in block["reencodings"].items():
        lines.append(f"| {name} | {_fmt(row['rank1'])} | {_fmt_ci(row.get('rank1_ci'))} | "
                     f"{_fmt(row['median_rank'], '.0f')} | {cell(row, 'knn_accuracy')} | "
                     f"{cell(row, 'balanced_accuracy')} | {cell(row, 'map_at_k')} | {cell(row, 'roc_auc')} |")
    lines.append(f"| original | | | | {_fmt(base.get('knn_accuracy'))} | {_fmt(base.get('balanced_accuracy'))} | "
                 f"{_fmt(base.get('map_at_k'))} | {_fmt(base.get('roc_auc'))} |")
    if block.get("failures"):
        lines.append(f"\n{block['failures']} query images could not be re-encoded or read back.")
    return [*lines, ""]


def _signed(value: Any) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _unknown_labels(payload: dict) -> list[str]:
    """A sentence on the images left out because their labels are unknown (none: nothing)."""
    unknown = payload.get("unknown_labels") or {}
    queries, archive = int(unknown.get("queries_skipped") or 0), int(unknown.get("archive_skipped") or 0)
    if not queries and not archive:
        return []
    return [f"**Unknown labels:** {queries} test queries and {archive} archive images have unknown labels and are "
            "left out of every figure below (they neither query nor vote).", ""]


def render_markdown(
    payload: dict, roc_png: str = "roc.png", precision_png: str = "precision_at_k.png"
) -> str:
    """The Markdown report for a `report.json` payload; images are linked relative to the file."""
    lines = [
        f"# {payload.get('title') or 'Evaluation report'}", "",
        "## Context", "", *_context_table(payload), "",
        "## Metrics", "", *_unknown_labels(payload), *_metrics_table(payload), "",
        f"**Interpretation:** {interpretation(payload)}", "",
        *_confusion_table(payload), "",
        *_recall_table(payload),
        *_per_class_table(payload),
        *_codes_table(payload),
        *_robustness_table(payload),
        "## Plots", "", f"![ROC]({roc_png})", "", f"![Precision@k]({precision_png})", "",
    ]
    return "\n".join(lines)
