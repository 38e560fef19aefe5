"""Pick a dataset layout (given or detected) and load it as `Records`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cbir.data.files import check_root, has_image
from cbir.data.folder import load_folder, load_plain
from cbir.data.identity import check_dataset_id, fingerprint
from cbir.data.nih import find_nih_csv, load_nih
from cbir.data.records import Records
from cbir.data.rsna import LABELS_CSV, load_rsna
from cbir.data.splits import SplitSpec, check_same_split, resolve_spec
from cbir.errors import DatasetError
from cbir.io.phi import Pseudonymizer, load_pseudonymizer

LAYOUTS = ("rsna", "nih", "folder", "plain")
_EXPECTED = (
    f"rsna: {LABELS_CSV}; nih: Data_Entry_2017*.csv(.gz); "
    "folder: at least 2 class sub-folders with png/jpg/jpeg/dcm images"
)
#: Layouts whose images may have unknown labels are never detected: `--layout folder` or `plain` says so.
_UNLABELLED_HINT = "; images without labels: pass --layout plain (or --layout folder for one sub-folder)"


def detect_layout(root: Path) -> str:
    """"rsna", "nih" or "folder" from the files in `root`; DatasetError saying what each layout expects.
    The plain layout (labels unknown) is never detected: it must be asked for."""
    root = check_root(root)
    labelled = label_file(root)
    if labelled is not None:
        return labelled[0]
    with os.scandir(root) as entries:
        subdirs = [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
    with_images = sum(1 for d in subdirs if has_image(d))
    if with_images >= 2:
        return "folder"
    hint = _UNLABELLED_HINT if with_images or has_image(root) else ""
    raise DatasetError(f"{root}: cannot tell the dataset layout (expected {_EXPECTED}; found "
                       f"{len(subdirs)} sub-folders, {with_images} with images{hint})")


def label_file(root: Path) -> tuple[str, Path] | None:
    """("rsna" or "nih", the label file) when `root` holds one of those layouts' label files."""
    if (root / LABELS_CSV).is_file():
        return "rsna", root / LABELS_CSV
    nih = find_nih_csv(root)
    return ("nih", nih) if nih is not None else None


def load_dataset(
    root: Path, layout: str | None = None, split: SplitSpec | None = None, patient_regex: str | None = None,
    pseudonymize: Pseudonymizer | None = None, dataset_id: str | None = None,
) -> Records:
    """Load `root` with `layout` ("rsna", "nih", "folder", "plain"; None or "auto" detects all but plain),
    split by `split` (default `SplitSpec()`), under its dataset id: `dataset_id` when given (`--dataset-id`,
    checked), else the keyed id of its fingerprint (`cbir.data.identity`).

    Patients: `cbir.data.patients` (the rsna and nih label files name them; in the folder and plain layouts a
    DICOM header's PatientID, unless `patient_regex`, which applies to those two layouts only). `pseudonymize`
    keys header patients and the dataset id (default: this machine's key, `load_pseudonymizer`).
    """
    name = (layout or "auto").strip().lower()
    if name not in (*LAYOUTS, "auto"):
        raise DatasetError(f"unknown layout {layout!r} (choose auto, {', '.join(LAYOUTS)})")
    given = check_dataset_id(dataset_id) if dataset_id is not None else None
    root = check_root(root)
    if name == "auto":
        name = detect_layout(root)
    pseudonymize = pseudonymize or load_pseudonymizer()
    if name in ("folder", "plain"):
        records = _load_unlabelled_or_folder(root, name, split, patient_regex, pseudonymize)
    else:
        records = load_rsna(root, split=split) if name == "rsna" else load_nih(root, split=split)
        if patient_regex is not None:
            records.notes.append(f"patient regex ignored: the {name} label file names the patients")
    files = fingerprint(records.layout, records.meta)
    if given is not None:
        return records.with_dataset_id(given, given=True, fingerprint=files)
    return records.with_dataset_id(pseudonymize.dataset(files), given=False, fingerprint=files)


def _load_unlabelled_or_folder(root: Path, layout: str, split: SplitSpec | None,
                               patient_regex: str | None, pseudonymize: Pseudonymizer) -> Records:
    """The folder or plain layout; a folder read without labels beside an rsna/nih label file is refused (that
    label file has the labels), and the plain layout notes that it ignores one."""
    records = (load_plain(root, split, patient_regex, pseudonymize) if layout == "plain"
               else load_folder(root, split, patient_regex, pseudonymize))
    labelled = label_file(root) if not records.has_labels else None
    if labelled is not None and layout == "folder":
        raise DatasetError(f"{root}: one image sub-folder beside the {labelled[0]} label file {labelled[1].name}: use "
                           f"--layout {labelled[0]} for its labels (or --layout plain to ignore them)")
    if labelled is not None:
        records.notes.append(f"labels ignored: {labelled[1].name} has them (--layout {labelled[0]})")
    return records


def load_dataset_for_model(root: Path, layout: str | None, model_split: dict[str, Any] | None,
                           given: dict[str, Any], allow_other: bool, model_name: str,
                           patient_regex: str | None = None, dataset_id: str | None = None,
                           pseudonymize: Pseudonymizer | None = None) -> tuple[Records, list[str]]:
    """Load `root` split as the model's training data was (`model_split`, its checkpoint's split record).

    `given` holds the split options the user gave explicitly (None = not given); one that differs from the
    model's split, or a dataset whose patients land elsewhere than in training (another patient rule), is
    refused unless `allow_other` (`cbir.data.splits.resolve_spec`). `dataset_id`, `pseudonymize`: see
    `load_dataset`. Returns (records, notes).
    """
    spec, notes = resolve_spec(model_split, given, allow_other, model_name)
    records = load_dataset(root, layout, split=spec, patient_regex=patient_regex, pseudonymize=pseudonymize,
                           dataset_id=dataset_id)
    notes += check_same_split(model_split, records.split_record(), allow_other, model_name)
    return records, notes
