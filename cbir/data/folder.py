"""Folder-per-class layout, and the plain layout of images without labels.

Layout: ``root/<class>/**/*.{png,jpg,jpeg,dcm}`` (extensions case-insensitive, any depth inside a class
folder, symlinked sub-folders are not followed). Class names are the sorted sub-folder names. A folder with a
single sub-folder of images holds one class, which says nothing: its images are read with unknown labels.

Plain layout (`load_plain`): every image under ``root``, at any depth, label unknown; each file is its own
patient unless `patient_regex` is given, which is searched in the path relative to the root (so a patient
folder can be the key).

Patients: with `patient_regex`, the patient key is the first capture group (or the whole match) of
``re.search(patient_regex, file_name)``. Without it, the Kermany et al. naming is recognised:

  * ``person1_bacteria_1.jpeg``, ``person1_virus_6.jpeg``    → patient ``person1``
  * ``IM-0115-0001.jpeg``, ``IM-0429-0001-0002.jpeg``        → patient ``IM-0115`` / ``IM-0429``
  * ``NORMAL2-IM-1427-0001.jpeg``                            → patient ``NORMAL2-IM-1427`` (a second
    series whose numbers overlap the plain ``IM-`` ones, so the prefix is kept)

Any other file is its own patient (its file stem); that can put one patient's images in two splits,
which the notes say (the CLI's ``--patient-regex`` fixes it).

Images with unknown labels get no label names, an N×0 `labels` array and no target (`Records.has_labels`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cbir.data.files import IMAGE_EXTENSIONS, FileEntry, check_root, has_image, iter_files, make_meta
from cbir.data.records import Records
from cbir.data.splits import SplitSpec, split_names
from cbir.errors import DatasetError

KERMANY_PATIENT = re.compile(r"^(person\d+|(?:NORMAL\d*-)?IM-\d+)", re.IGNORECASE)
_NORMAL_NAME = re.compile(r"(^| )(normal|no finding|nofinding|negative|healthy)( |$)")
_SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}

def load_folder(root: Path, split: SplitSpec | None = None, patient_regex: str | None = None) -> Records:
    """Read a folder-per-class dataset: one-hot labels, patient-grouped splits (a single sub-folder: labels
    unknown)."""
    root = check_root(root)
    classes, notes = _class_files(root)
    if len(classes) == 1:
        (name, entries), = classes.items()
        patients, patient_note, rule = folder_patients([entry[0] for entry in entries], patient_regex)
        notes = [f"folder layout: {len(entries)} images in one sub-folder ({name}): labels unknown (give one "
                 "sub-folder per class for labels)", patient_note, *notes]
        return unlabelled_records(root, "folder", entries, patients, rule, notes, split)
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


def load_plain(root: Path, split: SplitSpec | None = None, patient_regex: str | None = None) -> Records:
    """Every image under `root` (any depth), labels unknown; patients by `patient_regex` on the relative path,
    else each file its own patient."""
    root = check_root(root)
    entries = list(iter_files(root, root))
    if not entries:
        raise DatasetError(f"{root}: no png/jpg/jpeg/dcm images in this folder or below")
    patients, patient_note, rule = folder_patients([entry[2] for entry in entries], patient_regex, default=None)
    notes = [f"plain layout: {len(entries)} images, labels unknown", patient_note]
    return unlabelled_records(root, "plain", entries, patients, rule, notes, split)


def unlabelled_records(root: Path, layout: str, entries: Sequence[FileEntry], patients: Sequence[str], rule: str,
                       notes: list[str], split: SplitSpec | None) -> Records:
    """Records of images whose labels are unknown: no label names, an N×0 label array, no target."""
    meta = make_meta(path=[entry[1] for entry in entries], relpath=[entry[2] for entry in entries],
                     patient=patients, split=split_names(patients, split))
    return Records(root=root, dataset=folder_dataset_name(root), layout=layout, label_names=[],
                   labels=np.zeros((len(entries), 0), dtype=np.float32), meta=meta, target="", notes=notes,
                   patient_rule=rule, split_spec=split or SplitSpec())


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


def folder_patients(names: Sequence[str], patient_regex: str | None = None,
                    default: re.Pattern[str] | None = KERMANY_PATIENT) -> tuple[list[str], str, str]:
    """Patient key per file name (or relative path), a note on how the keys were made (see the module
    docstring) and the rule. Without `patient_regex`, the `default` rule applies; with neither, every file is
    its own patient."""
    if patient_regex is not None:
        try:
            pattern = re.compile(patient_regex)
        except re.error as exc:
            raise DatasetError(f"invalid patient regex {patient_regex!r}: {exc}") from None
        rule = f"patient regex {patient_regex!r}"
    elif default is None:
        return [_stem(name) for name in names], ("patients: each image is its own patient; one patient's images "
                                                  "can land in two splits; pass --patient-regex to group them"), \
            "each file its own patient"
    else:
        pattern, rule = default, "the Kermany naming rule (personN / [NORMALk-]IM-NNNN)"
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
    """Images per class sub-folder, and notes on what was ignored; DatasetError if none holds images."""
    with os.scandir(root) as entries:
        subdirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    classes = {name: list(iter_files(root, root / name)) for name in subdirs}
    empty = [name for name, files in classes.items() if not files]
    classes = {name: files for name, files in classes.items() if files}
    if not classes:
        raise DatasetError(_too_few_classes(root, subdirs, classes))
    if all(name.lower() in _SPLIT_NAMES for name in classes):
        raise DatasetError(f"{root}: the sub-folders {', '.join(classes)} look like splits, not classes; "
                           f"point at one of them, e.g. {root / next(iter(classes))}")
    notes = [f"ignored sub-folders without images: {', '.join(empty)}"] if empty else []
    with os.scandir(root) as entries:
        loose = sum(1 for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if loose:
        notes.append(f"ignored {loose} images directly under {root} (the folder layout wants class folders; "
                     "--layout plain reads every image, labels unknown)")
    return classes, notes


def _too_few_classes(root: Path, subdirs: list[str], classes: dict[str, list[FileEntry]]) -> str:
    expected = "one sub-folder per class holding png/jpg/jpeg/dcm images (a single one: labels unknown)"
    found = f"{len(classes)} with images" + (f" ({', '.join(classes)})" if classes else "")
    hint = ""
    if subdirs and all(name.lower() in _SPLIT_NAMES for name in subdirs):
        hint = f"; these look like split folders, point at one of them, e.g. {root / subdirs[0]}"
    elif has_image(root):
        hint = "; for images without labels use --layout plain"
    return f"{root}: expected {expected}, found {len(subdirs)} sub-folders, {found}{hint}"
