"""RSNA Pneumonia Detection Challenge (Kaggle) layout.

``root/stage_2_train_labels.csv`` (patientId,x,y,width,height,Target; one row per box, negatives with
empty box columns) and ``root/stage_2_train_images/<patientId>.dcm`` (or ``stage_2_test_images/``; when
neither folder exists, ``*.dcm`` anywhere under root). An optional
``root/stage_2_train_dicom_headers.csv(.gz)`` fills view/sex/age; otherwise they stay None and come
from each DICOM header at read time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cbir.data.files import check_root, file_map, make_meta, optional_int, optional_text, read_csv_checked
from cbir.data.records import Records
from cbir.data.splits import SplitSpec, split_names
from cbir.errors import DatasetError

LABELS_CSV = "stage_2_train_labels.csv"
IMAGE_DIRS = ("stage_2_train_images", "stage_2_test_images")
HEADERS_CSV = ("stage_2_train_dicom_headers.csv", "stage_2_train_dicom_headers.csv.gz")
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
BOX_COLUMNS = ("x", "y", "width", "height")
TARGET = "Pneumonia"


def read_rsna_labels(csv: Path) -> pd.DataFrame:
    """One row per patient, in first-seen order: ``patientId``, ``Target`` (0/1), ``boxes`` ([[x,y,w,h]…])."""
    rows = read_csv_checked(csv, COLUMNS, dtype={"patientId": str})
    ids = rows["patientId"].str.strip()
    if (ids.isna() | (ids == "")).any():
        raise DatasetError(f"{csv}: {int((ids.isna() | (ids == '')).sum())} rows have an empty patientId")
    target = pd.to_numeric(rows["Target"], errors="coerce")
    bad = ~target.isin([0, 1])
    if bad.any():
        raise DatasetError(f"{csv}: column 'Target' must be 0 or 1, found {rows['Target'][bad].iloc[0]!r}")
    coords = rows[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    has_box = coords.notna().all(axis=1).to_numpy()
    patients = pd.Index(pd.unique(ids))
    boxes: dict[str, list[list[float]]] = {}
    for pid, box in zip(ids[has_box], coords[has_box].to_numpy(np.float64).tolist(), strict=True):
        boxes.setdefault(pid, []).append(box)
    positive = target.groupby(ids.to_numpy(), sort=False).max().reindex(patients).astype(np.int64)
    return pd.DataFrame({
        "patientId": patients.to_numpy(dtype=object),
        "Target": positive.to_numpy(),
        "boxes": [boxes.get(pid, []) for pid in patients],
    })


def read_rsna_headers(path: Path) -> pd.DataFrame:
    """view/sex/age per patient (index ``patientId``) from a stage_2_train_dicom_headers CSV."""
    frame = read_csv_checked(path, ("PatientID",), dtype={"PatientID": str})
    frame = frame.assign(PatientID=frame["PatientID"].str.strip()).drop_duplicates("PatientID")
    empty = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    return pd.DataFrame({
        "view": optional_text(frame["ViewPosition"]) if "ViewPosition" in frame else empty,
        "sex": optional_text(frame["PatientSex"]) if "PatientSex" in frame else empty,
        "age": optional_int(frame["PatientAge"]) if "PatientAge" in frame else empty,
    }).set_axis(pd.Index(frame["PatientID"], name="patientId"))


def load_rsna(root: Path, split: SplitSpec | None = None) -> Records:
    """Read the RSNA layout: one row per patient, label ``Pneumonia``, boxes from the label CSV."""
    root = check_root(root)
    csv = root / LABELS_CSV
    if not csv.is_file():
        raise DatasetError(f"{root}: no {LABELS_CSV} (the RSNA layout expects it in the dataset root)")
    table = read_rsna_labels(csv)
    images, where = _find_images(root)
    found = table["patientId"].isin(images).to_numpy()
    if not found.any():
        raise DatasetError(f"{root}: none of the {len(table)} patients in {LABELS_CSV} has an image "
                           f"(looked for <patientId>.dcm in {where})")
    notes = [f"rsna layout: {int(found.sum())} patients, {int(table['Target'][found].sum())} positive"]
    if not found.all():
        notes.append(f"dropped {int((~found).sum())} of {len(table)} patients in {LABELS_CSV} "
                     f"with no image in {where}")
    expected_dir = next((name for name in IMAGE_DIRS if (root / name).is_dir()), IMAGE_DIRS[0])
    missing = [(f"{expected_dir}/{pid}.dcm", f"listed in {LABELS_CSV} but not found")
               for pid in table["patientId"][~found]]
    table = table[found].reset_index(drop=True)
    files = [images[pid] for pid in table["patientId"]]
    view, sex, age, header_note = _header_fields(root, table["patientId"])
    meta = make_meta(
        path=[f[0] for f in files], relpath=[f[1] for f in files], patient=table["patientId"],
        split=split_names(table["patientId"], split), boxes=table["boxes"], view=view, sex=sex, age=age,
    )
    return Records(root=root, dataset="rsna", layout="rsna", label_names=[TARGET],
                   labels=table["Target"].to_numpy(np.float32)[:, None], meta=meta, target=TARGET,
                   notes=[*notes, header_note], missing=missing, patient_rule=f"patientId of {LABELS_CSV}",
                   split_spec=split or SplitSpec())


def _find_images(root: Path) -> tuple[dict[str, tuple[str, str]], str]:
    """patientId → (path, relpath) of its .dcm, and a description of where they were looked for."""
    dirs = [root / name for name in IMAGE_DIRS if (root / name).is_dir()]
    where = " and ".join(f"{d.name}/" for d in dirs) if dirs else f"any folder (no {IMAGE_DIRS[0]}/ folder)"
    by_name = file_map(root, dirs or [root], (".dcm",))
    return {name[: -len(".dcm")]: entry for name, entry in by_name.items()}, where


def _header_fields(root: Path, patients: pd.Series) -> tuple[list | None, list | None, list | None, str]:
    """view, sex, age per patient from the optional headers CSV (None columns when it is absent)."""
    path = next((root / name for name in HEADERS_CSV if (root / name).is_file()), None)
    if path is None:
        return None, None, None, "view/sex/age: from each DICOM header at read time (no headers CSV)"
    headers = read_rsna_headers(path).reindex(patients.to_numpy())
    missing = int(headers["view"].isna().sum())
    note = f"view/sex/age: from {path.name}" + (f" ({missing} patients not in it)" if missing else "")
    view, sex, age = (headers[c].astype(object).where(headers[c].notna(), None).tolist() for c in headers)
    return view, sex, age, note
