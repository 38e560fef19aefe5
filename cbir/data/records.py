"""The dataset contract shared by every layout reader.

A `Records` holds one row per image: `meta` (a DataFrame) and `labels` (an N×C float32 multi-hot
array) are aligned row by row, like torchxrayvision's datasets. A dataset whose labels are unknown (the
plain layout, a folder layout with a single sub-folder) has no label names, an N×0 `labels` and no target.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbir.data.patients import LABEL_SOURCE, fallback_count, grouped_patients, patient_pseudonyms
from cbir.data.splits import SPLITS, SplitSpec, part_mask, split_names, split_record
from cbir.errors import DatasetError
from cbir.io.phi import Pseudonymizer
from cbir.labels import LabelSpace

#: Columns every layout reader puts in `Records.meta`.
#:   path     absolute path of the image file (str)
#:   relpath  path relative to the dataset root, POSIX separators (str); stored in payloads
#:   patient  patient key used for splitting (`cbir.data.patients`); internal only, it never reaches a payload
#:            (a DICOM header's patient is held as its keyed pseudonym already, never as the raw PatientID)
#:   split    "train", "val" or "test"
#:   boxes    list of [x, y, w, h] boxes in original pixel coordinates (empty list when none)
#:   view, sex, age   optional header-like fields from the label file (None when unknown)
#:   patient_source   where `patient` comes from: "label", "header", "name", "file" or "fallback"
#:            (`cbir.data.patients.PATIENT_SOURCES`)
META_COLUMNS = ("path", "relpath", "patient", "split", "boxes", "view", "sex", "age", "patient_source")

__all__ = ["META_COLUMNS", "SPLITS", "Records"]


@dataclass
class Records:
    """Images of one dataset with their labels.

    `target` names the class that the binary task predicts (e.g. "Pneumonia"); it is one of
    `label_names`, or "" when the labels are unknown (`label_names` empty; see `has_labels`). `dataset` is a
    display name (the folder's, or the layout's) for this machine's messages; `dataset_id` is what collections,
    payloads, point IDs and split records name the dataset by (`cbir.data.identity`).
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
    #: Files under the root that are not images, as (relative path, reason) (`cbir.data.files.iter_files`):
    #: never read; ingest counts them and says why.
    left_out: list[tuple[str, str]] = field(default_factory=list)
    #: How the `patient` keys were made (recorded with the split, never the keys themselves).
    patient_rule: str = ""
    #: The layout's own test list (NIH test_list.txt), per row; None when it has none.
    official_test: np.ndarray | None = None
    #: The split the `split` column was made with.
    split_spec: SplitSpec = field(default_factory=SplitSpec)
    #: The dataset's id (`cbir.data.identity`; set by `cbir.data.layout.load_dataset`, "" until then).
    dataset_id: str = ""
    #: Whether the user gave `dataset_id` (`--dataset-id`), rather than it being the fingerprint's.
    dataset_id_given: bool = False
    #: The dataset's unkeyed fingerprint (`cbir.data.identity.fingerprint`; "" until `load_dataset` sets it).
    fingerprint: str = ""

    def __post_init__(self) -> None:
        width = -1 if len(self.meta) and self.label_names else len(self.label_names)
        self.labels = np.asarray(self.labels, dtype=np.float32).reshape(len(self.meta), width)
        if self.labels.shape[1] != len(self.label_names):
            raise ValueError(f"labels has {self.labels.shape[1]} columns for {len(self.label_names)} names")
        if self.target not in self.label_names and (self.label_names or self.target):
            raise ValueError(f"target {self.target!r} is not one of {self.label_names}")
        self.meta = self.meta.reset_index(drop=True)
        if "patient_source" not in self.meta.columns:
            self.meta["patient_source"] = LABEL_SOURCE

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def has_labels(self) -> bool:
        """False for a dataset whose labels are unknown (the plain layout, a folder with one sub-folder)."""
        return bool(self.label_names)

    def require_labels(self, purpose: str) -> None:
        """DatasetError (one line) when the labels are unknown: `purpose` (e.g. "training") needs them."""
        if not self.has_labels:
            raise DatasetError(f"{self.root}: the labels of these {len(self)} images are unknown ({self.layout} "
                               f"layout), so there is no supervised target for {purpose}; use a labelled dataset "
                               "(rsna, nih, or a folder with one sub-folder per class)")

    @property
    def target_index(self) -> int:
        self.require_labels("a binary target")
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
            target=self.target, notes=list(self.notes), patient_rule=self.patient_rule,
            official_test=None if self.official_test is None else self.official_test[index],
            split_spec=self.split_spec, dataset_id=self.dataset_id, dataset_id_given=self.dataset_id_given,
            fingerprint=self.fingerprint,
        )

    def with_split(self, spec: SplitSpec) -> Records:
        """The same images with the `split` column made by `spec` (`cbir.data.splits.split_names`)."""
        meta = self.meta.assign(split=split_names(self.meta["patient"], spec, self.official_test))
        return Records(root=self.root, dataset=self.dataset, layout=self.layout,
                       label_names=list(self.label_names), labels=self.labels, meta=meta, target=self.target,
                       notes=list(self.notes), missing=list(self.missing), left_out=list(self.left_out),
                       patient_rule=self.patient_rule,
                       official_test=self.official_test, split_spec=spec, dataset_id=self.dataset_id,
                       dataset_id_given=self.dataset_id_given, fingerprint=self.fingerprint)

    def with_dataset_id(self, dataset_id: str, given: bool | None = None, fingerprint: str | None = None) -> Records:
        """The same images under another dataset id (`given`: whether the user named it; `fingerprint`: the
        dataset's; each default unchanged)."""
        return replace(self, dataset_id=dataset_id,
                       dataset_id_given=self.dataset_id_given if given is None else given,
                       fingerprint=self.fingerprint if fingerprint is None else fingerprint)

    def split_record(self) -> dict[str, Any]:
        """The record of this split that checkpoints and collections keep (`cbir.data.splits.split_record`),
        under the dataset's id (its display name only for records built by hand, which have none)."""
        return split_record(self.meta, self.dataset_id or self.dataset, self.layout, self.split_spec,
                            self.patient_rule, self.fingerprint)

    def patient_pseudonyms(self, pseudonymize: Pseudonymizer) -> list[str | None]:
        """Per row, the keyed pseudonym of its patient: what payloads store as `pseudonym` and what evaluation and
        calibration compare to leave a query's own patient out (`cbir.data.patients.patient_pseudonyms`)."""
        return patient_pseudonyms(self.meta, pseudonymize)

    @property
    def patient_fallbacks(self) -> int:
        """DICOM files whose header has no usable PatientID, so their patient comes from the file rule."""
        return fallback_count(self.meta)

    def grouped_patients(self) -> np.ndarray:
        """Per row, whether its patient key really groups images (label file, header, or a matched name rule)."""
        return grouped_patients(self.meta)

    def part(self, i: int, n: int) -> Records:
        """The i-th of n deterministic slices (1-based), by a hash of each image's relative path."""
        sliced = self.subset(part_mask(self.meta["relpath"].astype(str), i, n))
        for name in ("missing", "left_out"):
            files = getattr(self, name)
            if files:
                keep = part_mask(pd.Series([rel for rel, _ in files]), i, n)
                setattr(sliced, name, [m for m, k in zip(files, keep, strict=True) if k])
        return sliced

    def split(self, name: str) -> Records:
        return self.subset((self.meta["split"] == name).to_numpy())

    def relabelled(self, mapping: dict[str, str], target: str) -> Records:
        """The same images with each label name renamed by `mapping` (names mapped to one name are merged: an
        image has it when it had any of them) and `target` as the target (`cbir.labels.LabelSpace`)."""
        names = list(dict.fromkeys(mapping.get(name, name) for name in self.label_names))
        if names == self.label_names and target == self.target:
            return self
        labels = np.zeros((len(self), len(names)), dtype=np.float32)
        for column, name in enumerate(self.label_names):
            new = names.index(mapping.get(name, name))
            labels[:, new] = np.maximum(labels[:, new], self.labels[:, column])
        return replace(self, label_names=names, labels=labels, target=target)

    def label_lists(self) -> list[list[str]]:
        """Per row, the names of the positive labels (empty list means no finding)."""
        names = np.asarray(self.label_names)
        return [list(names[row > 0.5]) for row in self.labels]


def reconcile_records(space: LabelSpace, records: Records, label_map: dict[str, str] | None = None) -> Records:
    """`records` in `space`'s names, with its target (records whose labels are unknown pass as they are)."""
    if not records.has_labels:
        return records
    mapping = space.reconcile(records.label_names, str(records.root), label_map)
    return records.relabelled(mapping, space.target)


def payload_labels(records: Records, names: list[str], negative: str) -> list[str]:
    """The payload's `labels` for an image whose positive labels are `names`.

    With nothing positive, NIH says "No Finding" and a one-label set (RSNA) says the negative label
    ("No Pneumonia"); folder datasets always have their class, and images with unknown labels get [].
    """
    if records.layout == "folder" or names or not records.has_labels:
        return names
    return ["No Finding" if len(records.label_names) > 1 else negative]
