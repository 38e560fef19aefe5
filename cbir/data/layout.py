"""Pick a dataset layout (given or detected) and load it as `Records`."""

from __future__ import annotations

import os
from pathlib import Path

from cbir.data.files import check_root, has_image
from cbir.data.folder import load_folder
from cbir.data.nih import find_nih_csv, load_nih
from cbir.data.records import Records
from cbir.data.rsna import LABELS_CSV, load_rsna
from cbir.errors import DatasetError

LAYOUTS = ("rsna", "nih", "folder")
_EXPECTED = (
    f"rsna: {LABELS_CSV}; nih: Data_Entry_2017*.csv(.gz); "
    "folder: at least 2 class sub-folders with png/jpg/jpeg/dcm images"
)


def detect_layout(root: Path) -> str:
    """"rsna", "nih" or "folder" from the files in `root`; DatasetError saying what each layout expects."""
    root = check_root(root)
    if (root / LABELS_CSV).is_file():
        return "rsna"
    if find_nih_csv(root) is not None:
        return "nih"
    with os.scandir(root) as entries:
        subdirs = [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
    with_images = sum(1 for d in subdirs if has_image(d))
    if with_images >= 2:
        return "folder"
    raise DatasetError(f"{root}: cannot tell the dataset layout (expected {_EXPECTED}; found "
                       f"{len(subdirs)} sub-folders, {with_images} with images)")


def load_dataset(
    root: Path, layout: str | None = None, seed: int = 0, patient_regex: str | None = None
) -> Records:
    """Load `root` with `layout` ("rsna", "nih", "folder"; None or "auto" detects it).

    `patient_regex` applies to the folder layout only; the rsna and nih label files name the patients.
    """
    name = (layout or "auto").strip().lower()
    if name not in (*LAYOUTS, "auto"):
        raise DatasetError(f"unknown layout {layout!r} (choose auto, {', '.join(LAYOUTS)})")
    root = check_root(root)
    if name == "auto":
        name = detect_layout(root)
    if name == "folder":
        return load_folder(root, seed=seed, patient_regex=patient_regex)
    records = load_rsna(root, seed=seed) if name == "rsna" else load_nih(root, seed=seed)
    if patient_regex is not None:
        records.notes.append(f"patient regex ignored: the {name} label file names the patients")
    return records
