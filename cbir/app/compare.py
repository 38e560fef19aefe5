"""Compare two runs on the queries they share: every evaluation (per_query.json) found under both folders, paired
query by query (`cbir.evaluation.paired`).

An evaluation is named by its folder below the run, without its `foldN` parts (and a "-foldN" ending), so the
folds of a `cbir reproduce` run pool into one row ("reports/fold3/binary" → "binary") and two runs match where
their names do: two `cbir reproduce` folders, two recipes' folders of `cbir study shift` (`reports/RECIPE`), or
two `cbir evaluate` folders.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cbir.errors import CbirError
from cbir.evaluation.paired import NotPaired, paired_difference
from cbir.io.phi import shown_path

PER_QUERY = "per_query.json"
#: A fold's part of a folder name: "fold3", or "multilabel-nih-fold3" (the name before it is kept).
_FOLD = re.compile(r"^(?:(.+)-)?fold(\d+)$")
#: The folder every `cbir reproduce` and study run writes its evaluations under; left out of names.
REPORTS = "reports"


def evaluations(run: Path) -> dict[str, list[Path]]:
    """Evaluation name → its per_query.json files under `run` (one per fold, in fold order). `CbirError` for a
    folder that is missing or holds none."""
    if not run.is_dir():
        raise CbirError(f"{run}: no such folder")
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(run.rglob(PER_QUERY)):
        folds, kept = [], []
        for part in path.parent.relative_to(run).parts:
            match = _FOLD.match(part)
            if match:
                folds.append(int(match.group(2)))
            if not match or match.group(1):
                kept.append(match.group(1) if match else part)
        if kept and kept[0] == REPORTS:
            kept = kept[1:]
        found.setdefault("/".join(kept) or ".", []).append((folds[-1] if folds else 0, path))
    if not found:
        raise CbirError(f"{run}: no evaluations ({PER_QUERY}) under it: give a `cbir reproduce`, `cbir study` or "
                        f"`cbir evaluate --out` folder")
    return {name: [path for _, path in sorted(files)] for name, files in sorted(found.items())}


def _read(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CbirError(f"{path}: not a readable {PER_QUERY} ({exc.__class__.__name__})") from None
    if not isinstance(body, dict) or not {"target", "probability", "vote", "ap", "group"} <= set(body):
        raise CbirError(f"{path}: not a {PER_QUERY} written by cbir evaluate (fields missing)")
    lengths = {len(body[key]) for key in ("target", "probability", "vote", "ap", "group", "weighted_vote")
               if isinstance(body.get(key), list)}
    if len(lengths) != 1:
        raise CbirError(f"{path}: its per-query lists differ in length (a damaged {PER_QUERY})")
    return body


def compare_runs(a: Path, b: Path, seed: int = 0) -> dict[str, Any]:
    """A − B with paired 95 % intervals for every evaluation both runs hold (`paired_difference`), in name order:
    {"a", "b", "evaluations": {name: {...}}, "only_a", "only_b"}. `CbirError` when they share none, or when a
    shared one does not hold the same queries in both (another split, dataset or seed)."""
    found_a, found_b = evaluations(a), evaluations(b)
    shared = [name for name in found_a if name in found_b]
    if not shared:
        raise CbirError(f"{a} and {b} share no evaluation (A has {', '.join(found_a)}; B has {', '.join(found_b)})")
    results = {}
    for name in shared:
        try:
            results[name] = paired_difference([_read(p) for p in found_a[name]], [_read(p) for p in found_b[name]],
                                              seed=seed)
        except NotPaired as exc:
            raise CbirError(f"{a} and {b}: evaluation {name!r} does not hold the same queries in both ({exc}); "
                            f"compare runs of one dataset, split and seed") from None
    return {"a": shown_path(a), "b": shown_path(b), "evaluations": results,
            "only_a": [n for n in found_a if n not in found_b], "only_b": [n for n in found_b if n not in found_a]}
