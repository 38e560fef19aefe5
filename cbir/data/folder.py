"""Folder-per-class layout.

Layout: ``root/<class>/**/*.{png,jpg,jpeg,dcm}`` (extensions case-insensitive, any depth inside a class
folder, symlinked sub-folders are not followed). Class names are the sorted sub-folder names.

Patients: with `patient_regex`, the patient key is the first capture group (or the whole match) of
``re.search(patient_regex, file_name)``. Without it, the Kermany et al. naming is recognised:

  * ``person1_bacteria_1.jpeg``, ``person1_virus_6.jpeg``    → patient ``person1``
  * ``IM-0115-0001.jpeg``, ``IM-0429-0001-0002.jpeg``        → patient ``IM-0115`` / ``IM-0429``
  * ``NORMAL2-IM-1427-0001.jpeg``                            → patient ``NORMAL2-IM-1427`` (a second
    series whose numbers overlap the plain ``IM-`` ones, so the prefix is kept)

Any other file is its own patient (its file stem); that can put one patient's images in two splits,
which the notes say (the CLI's ``--patient-regex`` fixes it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cbir.data.files import IMAGE_EXTENSIONS, FileEntry, check_root, iter_files, make_meta
from cbir.data.records import Records
from cbir.data.splits import SplitSpec, split_names
from cbir.errors import DatasetError

KERMANY_PATIENT = re.compile(r"^(person\d+|(?:NORMAL\d*-)?IM-\d+)", re.IGNORECASE)
_NORMAL_NAME = re.compile(r"(^| )(normal|no finding|nofinding|negative|healthy)( |$)")
_SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}

def load_folder(root: Path, split: SplitSpec | None = None, patient_regex: str | None = None) -> Records:
    """Read a folder-per-class dataset: one-hot labels, patient-grouped splits."""
    root = check_root(root)
    classes, notes = _class_files(root)
    label_names = sorted(classes)
    target, target_note = choose_target(label_names)
    files = [(cls, entry) for cls in label_names for entry in classes[cls]]
    names = [entry[0] for _, entry in files]
    patients, patient_note, rule = folder_patients(names, patient_regex)
    labels = np.zeros((len(files), len(label_names)), dtype=np.float32)
    labels[np.arange(len(files)), [label_names.index(cls) for cls, _ in files]] = 1.0
    meta = make_meta(
        path=[entry[1] for _, entry in files],
        relpath=[entry[2] for _, entry in files],
        patient=patients,
        split=split_names(patients, split),
    )
    counts = ", ".join(f"{cls} {len(classes[cls])}" for cls in label_names)
    notes = [f"folder layout: {len(files)} images in {len(label_names)} classes ({counts})", target_note,
             patient_note, *notes]
    return Records(root=root, dataset=folder_dataset_name(root), layout="folder", label_names=label_names,
                   labels=labels, meta=meta, target=target, notes=notes, patient_rule=rule,
                   split_spec=split or SplitSpec())


def folder_dataset_name(root: Path) -> str:
    """The root folder's name, or its parent's when the root is a split folder such as ``train``."""
    if root.name.lower() in _SPLIT_NAMES and root.parent.name:
        return root.parent.name
    return root.name or "folder"


def choose_target(label_names: Sequence[str]) -> tuple[str, str]:
    """The positive class and a note saying why it was chosen.

    Two classes: the one not named like normal / no finding / negative / healthy (else the second in
    sorted order). More classes: the first non-normal one in sorted order.
    """
    abnormal = [name for name in label_names if not is_normal_name(name)]
    if len(label_names) == 2 and len(abnormal) == 1:
        target, why = abnormal[0], "the class not named like normal"
    elif len(label_names) == 2:
        target, why = label_names[1], "the second class in sorted order; neither or both look normal"
    elif abnormal:
        target, why = abnormal[0], "the first class, in sorted order, not named like normal"
    else:
        target, why = label_names[0], "the first class in sorted order; all look normal"
    return target, f"binary target {target!r}: {why}"


def is_normal_name(name: str) -> bool:
    """Whether a class name reads as normal / no finding / negative / healthy (any case or separator)."""
    words = " ".join(re.sub(r"[^0-9a-z]+", " ", name.lower()).split())
    return bool(_NORMAL_NAME.search(words))


def folder_patients(names: Sequence[str], patient_regex: str | None = None) -> tuple[list[str], str, str]:
    """Patient key per file name, a note on how the keys were made (see the module docstring) and the rule."""
    if patient_regex is not None:
        try:
            pattern = re.compile(patient_regex)
        except re.error as exc:
            raise DatasetError(f"invalid patient regex {patient_regex!r}: {exc}") from None
        rule = f"patient regex {patient_regex!r}"
    else:
        pattern, rule = KERMANY_PATIENT, "the Kermany naming rule (personN / [NORMALk-]IM-NNNN)"
    keys = [_patient_key(pattern, name) for name in names]
    unmatched = sum(key is None for key in keys)
    patients = [key if key is not None else _stem(name) for key, name in zip(keys, names, strict=True)]
    n_patients = len(set(patients))
    if unmatched == 0:
        return patients, f"patients: {n_patients} from {len(names)} file names by {rule}", rule
    if unmatched == len(names) and patient_regex is None:
        return patients, ("patients: each image is its own patient (file stem); one patient's images can "
                          "land in two splits; pass --patient-regex to group them"), "file stem"
    return patients, (f"patients: {n_patients} from {len(names)} file names by {rule}; {unmatched} names did "
                      f"not match and are their own patient (file stem), so they may share a patient across "
                      f"splits; pass --patient-regex to group them"), f"{rule}, else file stem"


def _patient_key(pattern: re.Pattern[str], name: str) -> str | None:
    match = pattern.search(name)
    if match is None:
        return None
    key = match.group(1) if pattern.groups else match.group(0)
    return key or None


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _class_files(root: Path) -> tuple[dict[str, list[FileEntry]], list[str]]:
    """Images per class sub-folder, and notes on what was ignored; DatasetError if < 2 classes."""
    with os.scandir(root) as entries:
        subdirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    classes = {name: list(iter_files(root, root / name)) for name in subdirs}
    empty = [name for name, files in classes.items() if not files]
    classes = {name: files for name, files in classes.items() if files}
    if len(classes) < 2:
        raise DatasetError(_too_few_classes(root, subdirs, classes))
    if all(name.lower() in _SPLIT_NAMES for name in classes):
        raise DatasetError(f"{root}: the sub-folders {', '.join(classes)} look like splits, not classes; "
                           f"point at one of them, e.g. {root / next(iter(classes))}")
    notes = [f"ignored sub-folders without images: {', '.join(empty)}"] if empty else []
    with os.scandir(root) as entries:
        loose = sum(1 for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if loose:
        notes.append(f"ignored {loose} images directly under {root} (the folder layout wants class folders)")
    return classes, notes


def _too_few_classes(root: Path, subdirs: list[str], classes: dict[str, list[FileEntry]]) -> str:
    expected = "at least 2 class sub-folders holding png/jpg/jpeg/dcm images"
    found = f"{len(classes)} with images" + (f" ({', '.join(classes)})" if classes else "")
    hint = ""
    if subdirs and all(name.lower() in _SPLIT_NAMES for name in subdirs):
        hint = f"; these look like split folders, point at one of them, e.g. {root / subdirs[0]}"
    return f"{root}: expected {expected}, found {len(subdirs)} sub-folders, {found}{hint}"
