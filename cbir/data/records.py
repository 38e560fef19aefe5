"""The dataset contract shared by every layout reader.

A `Records` holds one row per image: `meta` (a DataFrame) and `labels` (an N×C float32 multi-hot
array) are aligned row by row, like torchxrayvision's datasets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

#: Columns every layout reader puts in `Records.meta`.
#:   path     absolute path of the image file (str)
#:   relpath  path relative to the dataset root, POSIX separators (str); stored in payloads
#:   patient  raw patient key used for splitting; internal only, it never reaches a payload
#:   split    "train", "val" or "test"
#:   boxes    list of [x, y, w, h] boxes in original pixel coordinates (empty list when none)
#:   view, sex, age   optional header-like fields from the label file (None when unknown)
META_COLUMNS = ("path", "relpath", "patient", "split", "boxes", "view", "sex", "age")

SPLITS = ("train", "val", "test")


@dataclass
class Records:
    """Images of one dataset with their labels.

    `target` names the class that the binary task predicts (e.g. "Pneumonia"); it is one of
    `label_names`.
    """

    root: Path
    dataset: str
    layout: str
    label_names: list[str]
    labels: np.ndarray
    meta: pd.DataFrame
    target: str
    notes: list[str] = field(default_factory=list)
    #: Files the label table lists but the folder lacks, as (expected relative path, reason). Ingest reports
    #: each one and counts it; splits leave them out.
    missing: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.float32).reshape(len(self.meta), -1)
        if self.labels.shape[1] != len(self.label_names):
            raise ValueError(f"labels has {self.labels.shape[1]} columns for {len(self.label_names)} names")
        if self.target not in self.label_names:
            raise ValueError(f"target {self.target!r} is not one of {self.label_names}")
        self.meta = self.meta.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def target_index(self) -> int:
        return self.label_names.index(self.target)

    @property
    def y(self) -> np.ndarray:
        """Binary target (0/1 int) for the binary task."""
        return (self.labels[:, self.target_index] > 0.5).astype(np.int64)

    def subset(self, mask: np.ndarray | pd.Series) -> Records:
        """Rows where `mask` is true (or the given integer positions)."""
        index = np.flatnonzero(np.asarray(mask)) if np.asarray(mask).dtype == bool else np.asarray(mask)
        return Records(
            root=self.root, dataset=self.dataset, layout=self.layout, label_names=list(self.label_names),
            labels=self.labels[index], meta=self.meta.iloc[index].reset_index(drop=True),
            target=self.target, notes=list(self.notes),
        )

    def part(self, i: int, n: int) -> Records:
        """The i-th of n deterministic slices (1-based), by a hash of each image's relative path."""
        from cbir.data.splits import part_mask
        sliced = self.subset(part_mask(self.meta["relpath"].astype(str), i, n))
        if self.missing:
            keep = part_mask(pd.Series([rel for rel, _ in self.missing]), i, n)
            sliced.missing = [m for m, k in zip(self.missing, keep, strict=True) if k]
        return sliced

    def split(self, name: str) -> Records:
        return self.subset((self.meta["split"] == name).to_numpy())

    def label_lists(self) -> list[list[str]]:
        """Per row, the names of the positive labels (empty list means no finding)."""
        names = np.asarray(self.label_names)
        return [list(names[row > 0.5]) for row in self.labels]
