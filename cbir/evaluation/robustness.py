"""`cbir evaluate --robustness`: does a re-encoded query still find its own original, and still vote right?

Every query image is read once, re-encoded each way of `cbir.evaluation.reencode` into a scratch folder (file
names carry only a running number), and read back through the normal reader. The rank of the original is
its exact-cosine rank among the reference archive plus every original query (so the archive holds the
originals, and each re-encoding competes with every other case); rank 1 means it came first. The stage-2
change compares the re-encoded queries' kNN metrics with the originals', both embedded afresh in one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbir import metrics
from cbir.console import Reporter
from cbir.errors import BadInputError, failure_reasons
from cbir.evaluation.reencode import REENCODINGS, reencode_all
from cbir.io import DEFAULT_READER, Pseudonymizer, ReaderPolicy, read_image
from cbir.metrics_ci import Bootstrap, weighted_mean

STAGE2_KEYS = ("knn_accuracy", "balanced_accuracy", "map_at_k")


@dataclass
class Reencoded:
    """Per re-encoding, the file of every query row that could be written (row → path)."""

    files: dict[str, dict[int, Path]]
    failures: list[str]


def write_reencodings(paths: list[str], folder: Path, pseudonymize: Pseudonymizer | None,
                      reporter: Reporter, names: list[str] | None = None,
                      policy: ReaderPolicy = DEFAULT_READER) -> Reencoded:
    """Read every query once and write its re-encodings under `folder` as `q<row>.<name>.<ext>`."""
    chosen = names or list(REENCODINGS)
    files: dict[str, dict[int, Path]] = {name: {} for name in chosen}
    failures: list[str] = []
    with reporter.task("re-encode queries", len(paths)) as bar:
        for row, path in enumerate(paths):
            try:
                pixels = read_image(path, pseudonymize, policy=policy).pixels
            except BadInputError as exc:
                failures.append(str(exc))
            else:
                for name, written in reencode_all(pixels, folder, f"q{row}", chosen).items():
                    files[name][row] = written
            bar.advance()
    return Reencoded(files, failures)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ranks_of_originals(archive: np.ndarray, originals: np.ndarray, copies: np.ndarray, rows: np.ndarray,
                       hidden: np.ndarray | None = None) -> np.ndarray:
    """1-based cosine rank of original `rows[i]` (a row of `originals`) for copy i, among `archive` plus all
    `originals`; ties with the original count against it (a tie is not a hit). `hidden` (copies × archive,
    bool) leaves archive points out of a copy's competition: its own patient's, which may be the original
    itself when the queries are ingested too."""
    pool = unit(np.concatenate([archive, originals]) if len(archive) else originals)
    sims = unit(copies) @ pool.T
    picked = np.arange(len(rows)), len(archive) + np.asarray(rows)
    own = sims[picked]
    sims[picked] = -np.inf
    if hidden is not None and len(archive):
        sims[:, :len(archive)][hidden] = -np.inf
    return 1 + (sims >= own[:, None]).sum(axis=1)


def rank_summary(ranks: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    hit = (ranks == 1).astype(np.float64)
    boot = Bootstrap.by_group(groups)
    return {"n": int(ranks.size), "rank1": float(hit.mean()) if ranks.size else None,
            "rank1_ci": boot.interval(lambda w: weighted_mean(hit, w)) if ranks.size else None,
            "median_rank": float(np.median(ranks)) if ranks.size else None,
            "worst_rank": int(ranks.max()) if ranks.size else None}


def stage_metrics(y: np.ndarray, prob: np.ndarray, neighbour_y: np.ndarray, relevant: np.ndarray, k: int,
                  n_relevant: np.ndarray) -> dict[str, Any]:
    """Stage 1 AUC and the stage-2 figures that the robustness table compares."""
    vote, _ = metrics.knn_vote(neighbour_y, k)
    return {"roc_auc": metrics.roc_auc(y, prob), "knn_accuracy": float(np.mean(vote == y)),
            "balanced_accuracy": metrics.balanced_accuracy(y, vote),
            "map_at_k": metrics.map_at_k(relevant, k, n_relevant)}


def changes(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """other − base for every shared figure (None where either is undefined)."""
    out = {}
    for key, value in other.items():
        ref = base.get(key)
        ok = isinstance(value, float) and isinstance(ref, float) and np.isfinite(value) and np.isfinite(ref)
        out[key] = float(value - ref) if ok else None
    return out


def robustness_section(per_name: dict[str, dict[str, Any]], original: dict[str, Any], archive_size: int,
                       failures: list[str], paths: list[str]) -> dict[str, Any]:
    """The `robustness` block of report.json; `failures` ("PATH: reason" lines about `paths`) are counted by
    reason, never with a file name (`cbir.errors.failure_reasons`)."""
    return {"reencodings": per_name, "original": original, "archive_size": archive_size,
            "ranked_among": "reference archive + every original query (exact cosine)",
            "failures": len(failures), "failure_reasons": failure_reasons(failures, paths),
            "description": {name: (fn.__doc__ or "").strip() or name for name, fn in REENCODINGS.items()}}

