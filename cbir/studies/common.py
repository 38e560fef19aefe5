"""What the studies share: fold data without test patients, halves of a validation split, summaries."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir.data.layout import load_dataset
from cbir.data.records import Records
from cbir.data.splits import SplitSpec, patient_uniform
from cbir.report.doc import update_section

#: name → runner(options) → result dict with "markdown"; filled by the study modules.
STUDIES: dict[str, Callable[..., dict[str, Any]]] = {}
#: name → render(result, options) → the study's Markdown, to rebuild it from NAME.json (`cbir study --render`).
RENDERERS: dict[str, Callable[..., str]] = {}


@dataclass
class StudyOptions:
    data: Path
    out: Path
    layout: str = "auto"
    folds: int = 5
    use_folds: list[int] = field(default_factory=list)  # empty: all folds
    val_fraction: float = 0.2
    seed: int = 0
    backbone: str = "resnet18"
    image_size: int = 128
    epochs: int = 15
    batch_size: int = 32
    device: str = "auto"
    doc: Path | None = None
    other: Path | None = None   # a second dataset (study shift)
    models: Path | None = None  # a `cbir reproduce` run's models folder to take the folds' models from (appearance)
    recipes: list[str] = field(default_factory=list)  # study shift: only these recipes (empty: all)
    init: list[Path] = field(default_factory=list)  # ssl-method, label-efficiency: `cbir pretrain` run folders

    @property
    def fold_numbers(self) -> list[int]:
        return self.use_folds or list(range(1, self.folds + 1))

    def spec(self, fold: int) -> SplitSpec:
        return SplitSpec(seed=self.seed, val_fraction=self.val_fraction, folds=self.folds, fold=fold)


def register(name: str, render: Callable[..., str]) -> Callable[[Callable[..., dict[str, Any]]],
                                                                 Callable[..., dict[str, Any]]]:
    def add(func: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        STUDIES[name] = func
        RENDERERS[name] = render
        return func
    return add


def rerender(name: str, options: StudyOptions) -> dict[str, Any]:
    """Rebuild NAME.md (and the document section) from the NAME.json of an earlier run, without training."""
    from cbir.errors import CbirError
    path = options.out / f"{name}.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CbirError(f"{path}: no results of an earlier `cbir study {name}` run ({exc})") from None
    saved = result.get("options") or {}
    options = StudyOptions(data=Path(saved.get("data", options.data)), out=options.out,
                           folds=int(saved.get("folds", options.folds)),
                           val_fraction=float(saved.get("val_fraction", options.val_fraction)),
                           backbone=saved.get("backbone", options.backbone),
                           image_size=int(saved.get("image_size", options.image_size)),
                           epochs=int(saved.get("epochs", options.epochs)), doc=options.doc,
                           other=Path(saved["other"]) if saved.get("other") else options.other)
    return finish(name, options, result, RENDERERS[name](result, options))


def development_records(options: StudyOptions, fold: int) -> Records:
    """Fold `fold`'s training and validation images; its test patients are dropped before anything reads them."""
    records = load_dataset(options.data, options.layout, split=options.spec(fold))
    return records.subset((records.meta["split"] != "test").to_numpy())


def halves(records: Records, salt: str = "half") -> np.ndarray:
    """Per image of `records`, 0 or 1: two halves by patient (a seeded hash), for select-on-one, check-on-other."""
    return (patient_uniform(records.meta["patient"], salt) >= 0.5).astype(np.int64)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (sd 0 for one value, nan for none)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt_mean_sd(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    if math.isnan(mean):
        return "n/a"
    return f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def finish(name: str, options: StudyOptions, result: dict[str, Any], markdown: str) -> dict[str, Any]:
    """Write NAME.json and NAME.md into the study folder, and the study's section of the document
    (`options.doc`)."""
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (options.out / f"{name}.md").write_text(markdown.strip() + "\n")
    if options.doc is not None:
        update_section(options.doc, f"study-{name}", markdown)
    return result | {"markdown": markdown}


def score_on_validation(records: Records, loaded: Any, out: Path, k: int = 10,
                        reporter: Any = None) -> dict[str, Any]:
    """`cbir evaluate`'s report with the validation patients as queries against the training images.

    The development data is ingested into a scratch Qdrant Edge index with its val split relabelled test, so
    the product's own ingest and evaluation score it (the split check is waived on purpose: these are the
    model's validation patients, not test patients)."""
    import shutil
    import tempfile

    from cbir.app.evaluate import evaluate_collection
    from cbir.app.ingest import ingest_records
    from cbir.console import QUIET
    from cbir.io import load_pseudonymizer
    from cbir.store import open_index

    reporter = reporter or QUIET
    meta = records.meta.assign(split=records.meta["split"].replace({"val": "test"}))
    relabelled = Records(root=records.root, dataset=records.dataset, layout=records.layout,
                         label_names=list(records.label_names), labels=records.labels, meta=meta,
                         target=records.target, patient_rule=records.patient_rule, split_spec=records.split_spec,
                         dataset_id=records.dataset_id, dataset_id_given=records.dataset_id_given)
    scratch = Path(tempfile.mkdtemp(prefix="cbir-study-"))
    try:
        with open_index(str(scratch / "index"), writable=True, create=True) as index:
            ingest_records(relabelled, loaded, index, "study", load_pseudonymizer(), reporter=reporter)
            report = evaluate_collection(index, "study", loaded, out, k=k, reporter=reporter,
                                         allow_other_split=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.pop("per_query", None)
    return report


#: Two-sided 95 % critical values of Student's t for 1..10 degrees of freedom (normal beyond).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)

#: How the studies' verdict lines describe the rule.
VERDICT_RULE = ("An option replaces the default only when a paired t-test over the folds (5 %, two-sided) finds it "
                "better; with few folds that takes a large, consistent gain.")


def t_critical(df: int) -> float:
    return T_975[df - 1] if 1 <= df <= len(T_975) else 1.96


def paired_verdict(values: dict[str, dict[int, float]], default: str,
                   label: Callable[[str], str] = str) -> tuple[list[str], str]:
    """Each option against the default, paired by fold: the difference's mean ± sd, and the option kept.

    `values` maps option → fold → metric. An option replaces the default only when a paired t-test over the
    folds finds it better (5 %, two-sided); of several such options the largest gain wins.
    """
    verdict, best_gain, lines = default, 0.0, []
    for name, by_fold in values.items():
        if name == default:
            continue
        diff = [v - values[default][f] for f, v in by_fold.items() if f in values[default]]
        mean, sd = mean_sd(diff)
        margin = t_critical(len(diff) - 1) * sd / math.sqrt(len(diff)) if len(diff) > 1 else math.inf
        state = "better" if mean > margin else "worse" if mean < -margin else "within noise"
        lines.append(f"- {label(name)}: {mean:+.3f} ± {sd:.3f} ({state})")
        if state == "better" and mean > best_gain:
            verdict, best_gain = name, mean
    return lines, verdict
