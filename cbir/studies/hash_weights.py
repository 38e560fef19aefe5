"""Study `hash-weights`: the weights of the hash task's pairwise, quantisation and bit-balance losses.

One hash model per weighting and fold, trained on the fold's training patients; its validation patients query
the training images through `cbir evaluate` (`score_on_validation`). The figure that decides is the Hamming-
ranking mAP@10 of the learned codes (what the hash layer is for); cosine kNN balanced accuracy and the codes'
bit balance are reported beside it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np

from cbir.console import QUIET, Reporter
from cbir.models import ModelConfig, load_checkpoint
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

#: (pair, quantisation, balance) weights tried: the default, weaker regularisers, no pair term.
WEIGHTINGS = [(1.0, 0.5, 1.0), (1.0, 0.1, 0.1), (1.0, 0.01, 0.01), (0.0, 0.1, 0.1)]
DEFAULT_NAME = "1-0.5-1"


@register("hash-weights", lambda result, options: render(result, options))
def run_hash_weights(options: StudyOptions, reporter: Reporter = QUIET) -> dict[str, Any]:
    settings = TrainSettings(epochs=options.epochs, batch_size=options.batch_size, device=options.device,
                             seed=options.seed)
    runs = []
    for fold in options.fold_numbers:
        records = development_records(options, fold)
        for pair, quant, balance in WEIGHTINGS:
            started = time.perf_counter()
            name = f"{pair:g}-{quant:g}-{balance:g}"
            out = options.out / f"fold{fold}" / name
            reporter.log(f"== hash weights {name}, fold {fold}")
            config = ModelConfig(backbone=options.backbone, task="hash", image_size=options.image_size, bits=64,
                                 label_names=list(records.label_names), target=records.target,
                                 hash_pair_weight=pair, hash_quant_weight=quant, hash_balance_weight=balance)
            trained = train_model(records, config, settings, out / "model", reporter)
            loaded = load_checkpoint(out / "model", resolve_device(options.device))
            report = score_on_validation(records, loaded, out / "val-report", reporter=reporter)
            s2 = report["stage2"]
            ones = trained.history[-1].get("val_bit_ones") or {}
            runs.append({"fold": fold, "weights": [pair, quant, balance], "name": name,
                         "hamming_map_at_k": s2["codes"]["model"]["hamming_map_at_k"],
                         "lsh_hamming_map_at_k": s2["codes"]["lsh"]["hamming_map_at_k"],
                         "prefilter_balanced_accuracy": s2["codes"]["model"]["prefilter_balanced_accuracy"],
                         "balanced_accuracy": s2["balanced_accuracy"], "map_at_k": s2["map_at_k"],
                         "roc_auc": report["stage1"]["roc_auc"], "bit_ones": ones, "n_queries": report["n_queries"],
                         "seconds": round(time.perf_counter() - started, 1)})
    result = {"study": "hash-weights", "options": {k: str(v) for k, v in asdict(options).items()}, "runs": runs}
    return finish("hash-weights", options, result, render(result, options))


def render(result: dict[str, Any], options: StudyOptions) -> str:
    runs = result["runs"]
    folds = sorted({r["fold"] for r in runs})
    lines = ["### Hash task: the loss weights (`cbir study hash-weights`)", "",
             f"{options.backbone} from scratch at {options.image_size} px, 64 bits, {options.epochs} epochs, "
             f"{len(folds)} of {options.folds} folds of `{options.data}`: each fold's validation patients "
             f"(about {int(np.mean([r['n_queries'] for r in runs]))} images) query its training images; test "
             "patients never loaded. Mean ± sd over folds.", "",
             "| pair / quant / balance | Hamming mAP@10 (learned codes) | Hamming mAP@10 (LSH of the same "
             "embedding) | cosine kNN balanced accuracy | cosine mAP@10 | stage-1 AUC | bits set, min–max |",
             "|---|---:|---:|---:|---:|---:|---|"]
    names = list(dict.fromkeys(r["name"] for r in runs))
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        ones = [r["bit_ones"] for r in mine if r["bit_ones"]]
        spread = (f"{min(o['min'] for o in ones):.2f}–{max(o['max'] for o in ones):.2f}" if ones else "n/a")
        lines.append(f"| {name.replace('-', ' / ')} | {fmt_mean_sd([r['hamming_map_at_k'] for r in mine])} | "
                     f"{fmt_mean_sd([r['lsh_hamming_map_at_k'] for r in mine])} | "
                     f"{fmt_mean_sd([r['balanced_accuracy'] for r in mine])} | "
                     f"{fmt_mean_sd([r['map_at_k'] for r in mine])} | {fmt_mean_sd([r['roc_auc'] for r in mine])} | "
                     f"{spread} |")
    default = DEFAULT_NAME if DEFAULT_NAME in names else names[0]
    lines += ["", f"Paired against the default {default.replace('-', ' / ')} (same fold), Hamming mAP@10 difference, "
              "mean ± sd over folds:", ""]
    by_option = {n: {r["fold"]: r["hamming_map_at_k"] for r in runs if r["name"] == n} for n in names}
    paired, verdict = paired_verdict(by_option, default, lambda n: n.replace("-", " / "))
    lines += paired
    lines += ["", f"Kept as the default: **{verdict.replace('-', ' / ')}**. {VERDICT_RULE}"]
    return "\n".join(lines)

