"""Synthetic chest X-ray datasets in the exact on-disk layouts of the real downloads (`cbir synth`).

Anyone can try cbir without the 30 GB downloads, and tests get data with a real, learnable signal:
anatomical phantoms (lungs, heart, ribs, clavicles, diaphragm, spine) with findings drawn where the
labels put them, and labels whose prevalence and co-occurrence follow the real label files.

    >>> summary = synth_dataset("rsna", n=400, size=128, out=Path("data/rsna-synth"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cbir.data.synth.labels import (
    SynthSummary,
    nih_cases_from_csv,
    rsna_cases_from_csv,
    sample_nih_cases,
    sample_rsna_cases,
)
from cbir.data.synth.nih import write_nih
from cbir.data.synth.rsna import write_rsna

__all__ = ["LAYOUTS", "SynthSummary", "synth_dataset"]

LAYOUTS = ("rsna", "nih")
MIN_SIZE, MAX_SIZE = 16, 2048


def synth_dataset(
    layout: str,
    n: int,
    size: int,
    out: Path,
    seed: int = 0,
    labels_csv: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write `n` synthetic size×size images of `layout` ("rsna" or "nih") and their label files to `out`.

    Labels are drawn from statistics of the real files, or, with `labels_csv`, taken from the first `n`
    patients (RSNA) or rows (NIH) of a real label file. The same `seed` gives byte-identical files.
    `progress` is called with 1 after each image.
    """
    layout = layout.strip().lower()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (choose {' or '.join(LAYOUTS)})")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE}, got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, LAYOUTS.index(layout) + 1, 0])
    if layout == "rsna":
        cases = rsna_cases_from_csv(Path(labels_csv), n, rng) if labels_csv else sample_rsna_cases(rng, n)
        return write_rsna(cases, size, out, seed, progress)
    nih = nih_cases_from_csv(Path(labels_csv), n) if labels_csv else sample_nih_cases(rng, n)
    return write_nih(nih, size, out, seed, progress)
