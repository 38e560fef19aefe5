"""NIH ChestX-ray14 layout.

``root/Data_Entry_2017*.csv(.gz)`` and images under ``root/images*/`` (``images_001/images/…`` …
``images_012/images/…`` as NIH ships them, or a flat ``images/``). Optional: ``train_val_list.txt`` +
``test_list.txt`` (the official patient-wise test split) and ``BBox_List_2017.csv`` (boxes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cbir.data.files import check_root, file_map, make_meta, optional_int, optional_text, read_csv_checked
from cbir.data.records import Records
from cbir.data.splits import SplitSpec, split_names
from cbir.errors import DatasetError

#: The 14 findings in the official order.
FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]
NO_FINDING = "No Finding"
TARGET = "Pneumonia"
REQUIRED = ("Image Index", "Finding Labels", "Patient ID")
CSV_PATTERNS = ("Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz")
BBOX_CSV = "BBox_List_2017.csv"
LISTS = ("train_val_list.txt", "test_list.txt")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def find_nih_csv(root: Path) -> Path | None:
    """The Data_Entry_2017*.csv(.gz) in `root` (the last in sorted order, e.g. the v2020 file), if any."""
    found = sorted({p for pattern in CSV_PATTERNS for p in root.glob(pattern) if p.is_file()})
    return found[-1] if found else None


def read_nih_labels(csv: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The Data_Entry CSV (one row per image) and its N×14 float32 multi-hot labels in `FINDINGS` order."""
    frame = read_csv_checked(csv, REQUIRED, dtype={"Image Index": str, "Patient ID": str})
    labels, _ = finding_matrix(frame["Finding Labels"])
    return frame, labels


def finding_matrix(findings: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Multi-hot labels for ``A|B|C`` strings ("No Finding" → all zeros) and the unknown names seen.

    Vectorised over the distinct label strings (a few hundred in 112k NIH rows).
    """
    codes, uniques = pd.factorize(findings.fillna("").astype(str))
    table = np.zeros((len(uniques), len(FINDINGS)), dtype=np.float32)
    column = {name.lower(): i for i, name in enumerate(FINDINGS)}
    unknown: set[str] = set()
    for row, text in enumerate(uniques):
        for name in (part.strip() for part in text.split("|")):
            if name.lower() in column:
                table[row, column[name.lower()]] = 1.0
            elif name and name.lower() != NO_FINDING.lower():
                unknown.add(name)
    return table[codes], sorted(unknown)


def load_nih(root: Path, split: SplitSpec | None = None) -> Records:
    """Read the NIH layout: 14 multi-hot findings, target ``Pneumonia``, official test split if listed."""
    root = check_root(root)
    csv = find_nih_csv(root)
    if csv is None:
        raise DatasetError(f"{root}: no Data_Entry_2017*.csv(.gz) (the NIH layout expects it in the root)")
    frame = read_csv_checked(csv, REQUIRED, dtype={"Image Index": str, "Patient ID": str})
    frame, notes = _clean_rows(frame, csv)
    labels, unknown = finding_matrix(frame["Finding Labels"])
    if unknown:
        notes.append(f"ignored findings outside the 14 NIH classes: {', '.join(unknown[:10])}")
    names = frame["Image Index"]
    images, where = _find_images(root)
    found = names.isin(images).to_numpy()
    if not found.any():
        raise DatasetError(f"{root}: none of the {len(frame)} images in {csv.name} was found under {where}")
    if not found.all():
        notes.append(f"dropped {int((~found).sum())} of {len(frame)} rows of {csv.name} "
                     f"with no image under {where}")
    missing = [(f"images/{name}", f"listed in {csv.name} but not found") for name in names[~found]]
    frame, labels = frame[found].reset_index(drop=True), labels[found]
    names = frame["Image Index"]
    spec = split or SplitSpec()
    official, split_note = _official_test(root, names)
    split_column = split_names(frame["Patient ID"], spec, official)
    files = [images[name] for name in names.tolist()]
    meta = make_meta(
        path=[f[0] for f in files], relpath=[f[1] for f in files], patient=frame["Patient ID"], split=split_column,
        boxes=_boxes(root, names),
        view=_optional(frame, "View Position", optional_text),
        sex=_optional(frame, "Patient Gender", optional_text),
        age=_optional(frame, "Patient Age", optional_int),
    )
    notes = [f"nih layout: {len(frame)} images of {frame['Patient ID'].nunique()} patients from {csv.name}",
             *notes, split_note]
    return Records(root=root, dataset="nih", layout="nih", label_names=list(FINDINGS), labels=labels,
                   meta=meta, target=TARGET, notes=notes, missing=missing, patient_rule=f"Patient ID of {csv.name}",
                   official_test=official, split_spec=spec)


def _clean_rows(frame: pd.DataFrame, csv: Path) -> tuple[pd.DataFrame, list[str]]:
    """Strip names and ids, drop rows without an image name and duplicate image names."""
    notes: list[str] = []
    names = frame["Image Index"].str.strip()
    patients = frame["Patient ID"].str.strip()
    patients = patients.where(patients.notna() & (patients != ""), names)
    frame = frame.assign(**{"Image Index": names, "Patient ID": patients})
    keep = (names.notna() & (names != "") & ~names.duplicated()).to_numpy()
    if not keep.all():
        notes.append(f"skipped {int((~keep).sum())} rows of {csv.name} with an empty or repeated Image Index")
    return frame[keep].reset_index(drop=True), notes


def _find_images(root: Path) -> tuple[dict[str, tuple[str, str]], str]:
    """Image name → (path, relpath) from every ``images*`` folder of root, scanned once."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("images"))
    if not dirs:
        raise DatasetError(f"{root}: no images*/ folder (the NIH layout keeps images in images/ or "
                           f"images_001/images/ …)")
    return file_map(root, dirs, IMAGE_EXTENSIONS), f"{root}/images*/"


def _official_test(root: Path, names: pd.Series) -> tuple[np.ndarray | None, str]:
    """The rows of the official test list when both list files exist (else None), and a note."""
    train_val, test = (root / name for name in LISTS)
    if not (train_val.is_file() and test.is_file()):
        return None, "splits: by patient (seeded hash), no official lists"
    in_test = names.isin(_read_list(test)).to_numpy()
    unlisted = int((~in_test & ~names.isin(_read_list(train_val)).to_numpy()).sum())
    note = "splits: test from test_list.txt (unless --folds), train/val by patient (seeded hash)"
    if unlisted:
        note += f"; {unlisted} images in neither list were treated as train/val"
    return in_test, note


def _read_list(path: Path) -> set[str]:
    with path.open(encoding="utf-8") as handle:
        return {line.strip() for line in handle if line.strip()}


def _boxes(root: Path, names: pd.Series) -> list[list[list[float]]]:
    """Per image, the [x, y, w, h] boxes of BBox_List_2017.csv (empty lists when the file is absent)."""
    path = root / BBOX_CSV
    if not path.is_file():
        return [[] for _ in range(len(names))]
    table = read_csv_checked(path, ("Image Index",), dtype={"Image Index": str})
    start = next((i for i, c in enumerate(table.columns) if c.lower().startswith("bbox")), None)
    if start is None or start + 4 > len(table.columns):
        raise DatasetError(f"{path}: missing column 'Bbox [x' (expected Image Index, Finding Label, "
                           "Bbox [x,y,w,h])")
    coords = table.iloc[:, start:start + 4].apply(pd.to_numeric, errors="coerce")
    valid = coords.notna().all(axis=1).to_numpy()
    by_name: dict[str, list[list[float]]] = {}
    names_with_box = table["Image Index"].str.strip()[valid]
    for name, box in zip(names_with_box, coords[valid].to_numpy(np.float64).tolist(), strict=True):
        by_name.setdefault(name, []).append(box)
    return [list(by_name.get(name, [])) for name in names.tolist()]


def _optional(
    frame: pd.DataFrame, column: str, convert: Callable[[pd.Series], pd.Series]
) -> pd.Series | None:
    return convert(frame[column]) if column in frame.columns else None
