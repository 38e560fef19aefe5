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

DICOM files: without `patient_regex`, a DICOM's patient is the keyed pseudonym of its header's PatientID (with
IssuerOfPatientID when given), and the rules above apply only to PNG/JPEG files and to DICOM files without a
usable PatientID, which the notes count (`cbir.data.patients`). An explicit `patient_regex` applies to every file.

Images with unknown labels get no label names, an N×0 `labels` array and no target (`Records.has_labels`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cbir.data.files import (
    IMAGE_EXTENSIONS,
    FileEntry,
    check_root,
    describe_skipped,
    has_image,
    iter_files,
    make_meta,
)
from cbir.data.patients import FALLBACK_SOURCE, FILE_SOURCE, HEADER_SOURCE, NAME_SOURCE, NO_PATIENT_ID
from cbir.data.records import Records
from cbir.data.splits import SplitSpec, split_names
from cbir.errors import DatasetError, printable
from cbir.io.dicom import peek_patient
from cbir.io.phi import Pseudonymizer, load_pseudonymizer
from cbir.labels import is_normal_name

KERMANY_PATIENT = re.compile(r"^(person\d+|(?:NORMAL\d*-)?IM-\d+)", re.IGNORECASE)
RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}

def load_folder(root: Path, split: SplitSpec | None = None, patient_regex: str | None = None,
                pseudonymize: Pseudonymizer | None = None) -> Records:
    """Read a folder-per-class dataset: one-hot labels, patient-grouped splits (a single sub-folder: labels
    unknown). `pseudonymize` keys DICOM headers' patients (default: this machine's key)."""
    root = check_root(root)
    classes, notes, left_out = _class_files(root)
    if len(classes) == 1:
        (name, entries), = classes.items()
        patients = _patients(entries, [entry[0] for entry in entries], patient_regex, KERMANY_PATIENT, pseudonymize)
        notes = [f"folder layout: {len(entries)} images in one sub-folder ({name}): labels unknown (give one "
                 "sub-folder per class for labels)", patients.note, *notes]
        return replace(unlabelled_records(root, "folder", entries, patients, notes, split), left_out=left_out)
    label_names = sorted(classes)
    target, target_note = choose_target(label_names)
    files = [(cls, entry) for cls in label_names for entry in classes[cls]]
    patients = _patients([entry for _, entry in files], [entry[0] for _, entry in files], patient_regex,
                         KERMANY_PATIENT, pseudonymize)
    labels = np.zeros((len(files), len(label_names)), dtype=np.float32)
    labels[np.arange(len(files)), [label_names.index(cls) for cls, _ in files]] = 1.0
    meta = make_meta(
        path=[entry[1] for _, entry in files],
        relpath=[entry[2] for _, entry in files],
        patient=patients.keys,
        split=split_names(patients.keys, split),
        patient_source=patients.sources,
    )
    counts = ", ".join(f"{cls} {len(classes[cls])}" for cls in label_names)
    notes = [f"folder layout: {len(files)} images in {len(label_names)} classes ({counts})", target_note,
             patients.note, *notes]
    return Records(root=root, dataset=folder_dataset_name(root), layout="folder", label_names=label_names,
                   labels=labels, meta=meta, target=target, notes=notes, patient_rule=patients.rule,
                   split_spec=split or SplitSpec(), left_out=left_out)


def load_plain(root: Path, split: SplitSpec | None = None, patient_regex: str | None = None,
               pseudonymize: Pseudonymizer | None = None) -> Records:
    """Every image under `root` (any depth), labels unknown; a DICOM's patient from its header (unless
    `patient_regex`), else patients by `patient_regex` on the relative path, else each file its own patient."""
    root = check_root(root)
    left_out: list[tuple[str, str]] = []
    entries = list(iter_files(root, root, skipped=left_out))
    if not entries:
        raise DatasetError(f"{root}: no png/jpg/jpeg/dcm images in this folder or below")
    patients = _patients(entries, [entry[2] for entry in entries], patient_regex, None, pseudonymize)
    notes = [f"plain layout: {len(entries)} images, labels unknown", patients.note,
             *([describe_skipped(left_out)] if left_out else [])]
    return replace(unlabelled_records(root, "plain", entries, patients, notes, split), left_out=left_out)


@dataclass
class Patients:
    """Patient key and source per file (`cbir.data.patients`), the note on how they were made and the rule."""

    keys: list[str]
    sources: list[str]
    note: str
    rule: str


def unlabelled_records(root: Path, layout: str, entries: Sequence[FileEntry], patients: Patients,
                       notes: list[str], split: SplitSpec | None) -> Records:
    """Records of images whose labels are unknown: no label names, an N×0 label array, no target."""
    meta = make_meta(path=[entry[1] for entry in entries], relpath=[entry[2] for entry in entries],
                     patient=patients.keys, split=split_names(patients.keys, split), patient_source=patients.sources)
    return Records(root=root, dataset=folder_dataset_name(root), layout=layout, label_names=[],
                   labels=np.zeros((len(entries), 0), dtype=np.float32), meta=meta, target="", notes=notes,
                   patient_rule=patients.rule, split_spec=split or SplitSpec())


def _patients(entries: Sequence[FileEntry], names: Sequence[str], patient_regex: str | None,
              default: re.Pattern[str] | None, pseudonymize: Pseudonymizer | None) -> Patients:
    """Patients of the folder and plain layouts (see the module docstring): DICOM headers first unless
    `patient_regex`, then the file rule (`folder_patients` on `names`) for every other file."""
    is_dicom = [not entry[1].lower().endswith(RASTER_EXTENSIONS) for entry in entries]   # .dcm, or sniffed
    header: list[str | None] = [None] * len(entries)
    if patient_regex is None and any(is_dicom):
        key = pseudonymize or load_pseudonymizer()
        header = [peek_patient(entry[1], key) if dicom else None
                  for entry, dicom in zip(entries, is_dicom, strict=True)]
    rest = [i for i, h in enumerate(header) if h is None]
    keys, matched, note, rule = _file_rule([names[i] for i in rest], patient_regex, default) if rest else \
        ([], [], "", "")
    fallback = patient_regex is None and any(is_dicom)
    by_row: dict[int, tuple[str, str]] = {
        i: (k, FALLBACK_SOURCE if fallback and is_dicom[i] else NAME_SOURCE if m else FILE_SOURCE)
        for i, k, m in zip(rest, keys, matched, strict=True)}
    n_fallback = sum(source == FALLBACK_SOURCE for _, source in by_row.values())
    without = f"; {n_fallback} DICOM files have {NO_PATIENT_ID}, so their patients come from the file names" \
        if n_fallback else ""
    n_header = len(entries) - len(rest)
    if not n_header:
        return Patients(keys, [by_row[i][1] for i in range(len(entries))], note + without, rule)
    fingerprint = (pseudonymize or load_pseudonymizer()).fingerprint
    header_rule = f"DICOM PatientID (keyed pseudonym, key {fingerprint})"
    rows = [(h, HEADER_SOURCE) if h is not None else by_row[i] for i, h in enumerate(header)]
    n_patients = len({h for h in header if h is not None})
    note = (f"patients: {n_patients} from the PatientID of {n_header} DICOM headers (keyed)"
            + (f"; the other {len(rest)} images by the file rule ({note.removeprefix('patients: ')})" if rest else "")
            + without)
    return Patients([k for k, _ in rows], [s for _, s in rows], note,
                    f"{header_rule}, else {rule}" if rest else header_rule)


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


def folder_patients(names: Sequence[str], patient_regex: str | None = None,
                    default: re.Pattern[str] | None = KERMANY_PATIENT) -> tuple[list[str], str, str]:
    """Patient key per file name (or relative path), a note on how the keys were made (see the module
    docstring) and the rule. Without `patient_regex`, the `default` rule applies; with neither, every file is
    its own patient. (The file rule only: the layouts read DICOM headers first, `_patients`.)"""
    patients, _, note, rule = _file_rule(names, patient_regex, default)
    return patients, note, rule


def _file_rule(names: Sequence[str], patient_regex: str | None,
               default: re.Pattern[str] | None) -> tuple[list[str], list[bool], str, str]:
    """`folder_patients`, with per name whether the rule matched it (its key groups images)."""
    if patient_regex is not None:
        try:
            pattern = re.compile(patient_regex)
        except re.error as exc:
            raise DatasetError(f"invalid patient regex {patient_regex!r}: {exc}") from None
        rule = f"patient regex {patient_regex!r}"
    elif default is None:
        return [_stem(name) for name in names], [False] * len(names), \
            ("patients: each image is its own patient; one patient's images can land in two splits; pass "
             "--patient-regex to group them"), "each file its own patient"
    else:
        pattern, rule = default, "the Kermany naming rule (personN / [NORMALk-]IM-NNNN)"
    keys = [_patient_key(pattern, name) for name in names]
    matched = [key is not None for key in keys]
    unmatched = matched.count(False)
    patients = [key if key is not None else _stem(name) for key, name in zip(keys, names, strict=True)]
    n_patients = len(set(patients))
    if unmatched == 0:
        return patients, matched, f"patients: {n_patients} from {len(names)} file names by {rule}", rule
    if unmatched == len(names) and patient_regex is None:
        return patients, matched, ("patients: each image is its own patient (file stem); one patient's images can "
                                   "land in two splits; pass --patient-regex to group them"), "file stem"
    return patients, matched, (f"patients: {n_patients} from {len(names)} file names by {rule}; {unmatched} names "
                               f"did not match and are their own patient (file stem), so they may share a patient "
                               f"across splits; pass --patient-regex to group them"), f"{rule}, else file stem"


def _patient_key(pattern: re.Pattern[str], name: str) -> str | None:
    match = pattern.search(name)
    if match is None:
        return None
    key = match.group(1) if pattern.groups else match.group(0)
    return key or None


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _class_files(root: Path) -> tuple[dict[str, list[FileEntry]], list[str], list[tuple[str, str]]]:
    """Images per class sub-folder, notes on what was ignored, and every file left out with the reason;
    DatasetError if no sub-folder holds images."""
    with os.scandir(root) as entries:
        subdirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    left_out: list[tuple[str, str]] = []
    classes = {name: list(iter_files(root, root / name, skipped=left_out)) for name in subdirs}
    empty = [name for name, files in classes.items() if not files]
    classes = {name: files for name, files in classes.items() if files}
    if not classes:
        raise DatasetError(_too_few_classes(root, subdirs, classes))
    if all(name.lower() in _SPLIT_NAMES for name in classes):
        raise DatasetError(f"{root}: the sub-folders {', '.join(classes)} look like splits, not classes; "
                           f"point at one of them, e.g. {root / next(iter(classes))}")
    notes = [f"ignored sub-folders without images: {', '.join(empty)}"] if empty else []
    with os.scandir(root) as entries:
        files = sorted(e.name for e in entries if e.is_file())
    loose = [name for name in files if name.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:
        notes.append(f"ignored {len(loose)} images directly under {root} (the folder layout wants class folders; "
                     "--layout plain reads every image, labels unknown)")
    left_out += [(printable(name), "an image directly under the root (the folder layout wants class folders)"
                  if name in loose else "a file directly under the root (the folder layout reads class folders)")
                 for name in files]
    if left_out:
        notes.append(describe_skipped(left_out))
    return classes, notes, left_out


def _too_few_classes(root: Path, subdirs: list[str], classes: dict[str, list[FileEntry]]) -> str:
    expected = "one sub-folder per class holding png/jpg/jpeg/dcm images (a single one: labels unknown)"
    found = f"{len(classes)} with images" + (f" ({', '.join(classes)})" if classes else "")
    hint = ""
    if subdirs and all(name.lower() in _SPLIT_NAMES for name in subdirs):
        hint = f"; these look like split folders, point at one of them, e.g. {root / subdirs[0]}"
    elif has_image(root):
        hint = "; for images without labels use --layout plain"
    return f"{root}: expected {expected}, found {len(subdirs)} sub-folders, {found}{hint}"
