"""Dataset layout readers: real label files from ../shared, plus tiny layouts built in tmp_path."""

from __future__ import annotations

import contextlib
import gzip
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cbir.data.folder import choose_target, folder_patients, load_folder
from cbir.data.layout import detect_layout, load_dataset
from cbir.data.nih import FINDINGS, load_nih, read_nih_labels
from cbir.data.records import META_COLUMNS, SPLITS, Records
from cbir.data.rsna import load_rsna, read_rsna_headers, read_rsna_labels
from cbir.data.splits import SplitSpec, assign_splits, train_val_splits
from cbir.errors import DatasetError
from tests.conftest import SHARED, shared_path

DATA = SHARED / "data"
RSNA_CSV = DATA / "labels" / "rsna" / "stage_2_train_labels.csv"
RSNA_HEADERS = DATA / "labels" / "rsna" / "stage_2_train_dicom_headers.csv.gz"
NIH_CSV = DATA / "labels" / "nih" / "Data_Entry_2017_v2020.csv.gz"
KERMANY = DATA / "kermany" / "train"


def need(path: Path) -> Path:
    return shared_path(*path.relative_to(SHARED).parts)


def check_records(records: Records) -> None:
    """The `Records` contract every reader must meet."""
    meta = records.meta
    assert list(meta.columns[: len(META_COLUMNS)]) == list(META_COLUMNS)
    assert len(records) > 0 and records.labels.shape == (len(meta), len(records.label_names))
    assert set(meta["split"]) <= set(SPLITS)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in meta["path"])
    for path, rel in zip(meta["path"], meta["relpath"], strict=True):
        assert "\\" not in rel and Path(path) == records.root / rel
    assert all(isinstance(b, list) for b in meta["boxes"])
    assert all(isinstance(p, str) and p for p in meta["patient"])
    assert (meta.groupby("patient")["split"].nunique() == 1).all(), "a patient is in two splits"


def error_text(excinfo: pytest.ExceptionInfo[DatasetError]) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def write_png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)


def write_dcm(path: Path, patient: str) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    ds.save_as(path, enforce_file_format=True)


# --- tiny layouts ---------------------------------------------------------------------------------


def make_rsna(root: Path, missing: tuple[str, ...] = ("p3",), headers: bool = False) -> Path:
    rows = [
        "patientId,x,y,width,height,Target",
        "p1,10,20,30,40,1",
        "p1,100.5,200,50,60,1",
        "p2,,,,,0",
        "p3,,,,,0",
        "p4,5,6,7,8,1",
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    for pid in ("p1", "p2", "p3", "p4"):
        if pid not in missing:
            write_dcm(root / "stage_2_train_images" / f"{pid}.dcm", pid)
    if headers:
        text = "PatientID,PatientAge,PatientSex,ViewPosition\np1,43,F,AP\np2,51,M,PA\n"
        (root / "stage_2_train_dicom_headers.csv.gz").write_bytes(gzip.compress(text.encode()))
    return root


NIH_ROWS = [
    ("00000001_000.png", "Cardiomegaly", 1, 57, "M", "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 58, "M", "PA"),
    ("00000002_000.png", "No Finding", 2, 81, "F", "AP"),
    ("00000003_000.png", "Pneumonia|Infiltration", 3, 74, "F", "PA"),
    ("00000004_000.png", "Hernia", 4, 12, "M", "AP"),
]


def make_nih(root: Path, missing: tuple[str, ...] = ("00000004_000.png",), gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(NIH_ROWS, columns=["Image Index", "Finding Labels", "Patient ID", "Patient Age",
                                            "Patient Gender", "View Position"])
    frame.insert(2, "Follow-up #", 0)
    name = "Data_Entry_2017_v2020.csv.gz" if gz else "Data_Entry_2017.csv"
    frame.to_csv(root / name, index=False)
    for i, image in enumerate(frame["Image Index"]):
        if image not in missing:
            write_png(root / f"images_00{1 + i % 2}" / "images" / image)
    return root


def make_folder(root: Path, classes: dict[str, list[str]]) -> Path:
    for cls, names in classes.items():
        for name in names:
            write_png(root / cls / name)
    return root


# --- real label files -----------------------------------------------------------------------------


def test_real_rsna_labels() -> None:
    raw = pd.read_csv(need(RSNA_CSV))
    table = read_rsna_labels(RSNA_CSV)
    assert len(table) == 26_684 and int(table["Target"].sum()) == 6_012
    assert table["patientId"].is_unique
    n_boxes = table["boxes"].map(len)
    assert n_boxes.sum() == raw["x"].notna().sum() and n_boxes.sum() + (n_boxes == 0).sum() == len(raw)
    assert ((n_boxes > 0) == (table["Target"] == 1)).all()
    boxes = [box for boxes in table["boxes"] for box in boxes]
    assert all(len(box) == 4 and all(isinstance(v, float) for v in box) for box in boxes)


def test_real_rsna_headers() -> None:
    headers = read_rsna_headers(need(RSNA_HEADERS))
    assert len(headers) == 26_684
    assert set(headers["view"]) == {"PA", "AP"} and set(headers["sex"]) == {"M", "F"}
    assert all(isinstance(a, int) for a in headers["age"])


def test_real_nih_labels() -> None:
    start = time.perf_counter()
    frame, labels = read_nih_labels(need(NIH_CSV))
    assert time.perf_counter() - start < 3.0
    assert len(frame) == 112_120 and labels.shape == (112_120, 14) and labels.dtype == np.float32
    no_finding = (frame["Finding Labels"] == "No Finding").to_numpy()
    assert labels[no_finding].sum() == 0 and (labels[~no_finding].sum(axis=1) >= 1).all()
    prevalence = labels.mean(axis=0)
    assert FINDINGS[int(prevalence.argmax())] == "Infiltration"
    assert FINDINGS[int(prevalence.argmin())] == "Hernia"
    assert 0.01 < prevalence[FINDINGS.index("Pneumonia")] < 0.02


def test_real_nih_splits_by_patient() -> None:
    frame, _ = read_nih_labels(need(NIH_CSV))
    patients = frame["Patient ID"].drop_duplicates()
    split = assign_splits(patients)
    shares = pd.Series(split).value_counts(normalize=True)
    for name, expected in zip(SPLITS, (0.7, 0.1, 0.2), strict=True):
        assert abs(shares[name] - expected) < 0.015


def test_real_kermany_folder() -> None:
    records = load_dataset(need(KERMANY))
    check_records(records)
    assert records.layout == "folder" and records.dataset == "kermany"
    assert len(records) == 5_216 and records.label_names == ["NORMAL", "PNEUMONIA"]
    assert records.target == "PNEUMONIA" and int(records.y.sum()) == 3_875
    meta = records.meta
    assert set(meta["split"]) == set(SPLITS)
    assert meta["patient"].nunique() < 0.6 * len(meta)
    assert meta.loc[meta["relpath"] == "PNEUMONIA/person1_bacteria_1.jpeg", "patient"].item() == "person1"


# --- splits ---------------------------------------------------------------------------------------


def test_splits_deterministic_by_patient_and_stable() -> None:
    patients = pd.Series([f"p{i % 3000}" for i in range(9000)])
    first = assign_splits(patients, seed=3)
    assert (first == assign_splits(patients, seed=3)).all()
    assert (first != assign_splits(patients, seed=4)).any()
    assert (pd.Series(first).groupby(patients).nunique() == 1).all()
    keep = np.arange(len(patients)) % 7 != 0
    assert (assign_splits(patients[keep], seed=3) == first[keep]).all()
    shares = pd.Series(first[:3000]).value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.03 and abs(shares["val"] - 0.1) < 0.03
    assert abs(shares["test"] - 0.2) < 0.03
    assert set(assign_splits([1, 2, 3], fractions=(1, 0, 0))) == {"train"}
    assert set(train_val_splits(patients)) == {"train", "val"}
    with pytest.raises(ValueError):
        assign_splits(patients, fractions=(0.5, -0.1, 0.6))


# --- rsna -----------------------------------------------------------------------------------------


def test_rsna_layout(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "rsna")
    assert detect_layout(root) == "rsna"
    records = load_dataset(root)
    check_records(records)
    assert (records.dataset, records.layout, records.label_names, records.target) == (
        "rsna", "rsna", ["Pneumonia"], "Pneumonia")
    meta = records.meta.set_index("patient")
    assert list(meta.index) == ["p1", "p2", "p4"] and records.y.tolist() == [1, 0, 1]
    assert meta.loc["p1", "boxes"] == [[10.0, 20.0, 30.0, 40.0], [100.5, 200.0, 50.0, 60.0]]
    assert meta.loc["p2", "boxes"] == [] and meta.loc["p1", "relpath"] == "stage_2_train_images/p1.dcm"
    assert meta["view"].isna().all() and meta.loc["p1", "view"] is None
    assert any("dropped 1 of 4 patients" in note for note in records.notes)


def test_rsna_headers_and_recursive_images(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "rsna", missing=("p1", "p2", "p3", "p4"), headers=True)
    for pid in ("p1", "p2"):
        write_dcm(root / "dicoms" / "batch" / f"{pid}.DCM", pid)
    records = load_rsna(root)
    check_records(records)
    meta = records.meta.set_index("patient")
    assert list(meta.index) == ["p1", "p2"] and meta.loc["p1", "relpath"] == "dicoms/batch/p1.DCM"
    assert (meta.loc["p1", "view"], meta.loc["p1", "sex"], meta.loc["p1", "age"]) == ("AP", "F", 43)
    assert isinstance(meta.loc["p2", "age"], int)


def test_rsna_errors(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "all_missing", missing=("p1", "p2", "p3", "p4"))
    (root / "stage_2_train_images").mkdir()
    with pytest.raises(DatasetError) as excinfo:
        load_rsna(root)
    assert "none of the 4 patients" in error_text(excinfo) and "stage_2_train_images" in error_text(excinfo)

    root = make_rsna(tmp_path / "bad_column")
    csv = root / "stage_2_train_labels.csv"
    csv.write_text(csv.read_text().replace("Target", "Label"))
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(root)
    assert "'Target'" in error_text(excinfo) and str(csv) in error_text(excinfo)

    csv.write_text("")
    with pytest.raises(DatasetError, match="empty"):
        read_rsna_labels(csv)


# --- nih ------------------------------------------------------------------------------------------


def test_nih_layout(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih")
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000003_000.png,Pneumonia,1.5,2,3,4\n"
    )
    assert detect_layout(root) == "nih"
    records = load_dataset(root, layout="NIH")
    check_records(records)
    assert (records.dataset, records.label_names, records.target) == ("nih", FINDINGS, "Pneumonia")
    meta = records.meta.set_index(records.meta["relpath"].str.rsplit("/", n=1).str[1])
    assert len(meta) == 4 and any("dropped 1 of 5 rows" in note for note in records.notes)
    assert meta.loc["00000001_000.png", "relpath"] == "images_001/images/00000001_000.png"
    assert meta.loc["00000001_001.png", "relpath"] == "images_002/images/00000001_001.png"
    assert meta.loc["00000001_000.png", "patient"] == "1"
    assert tuple(meta.loc["00000001_001.png", ["view", "sex", "age"]]) == ("PA", "M", 58)
    assert isinstance(meta.loc["00000001_001.png", "age"], int)
    assert meta.loc["00000003_000.png", "boxes"] == [[1.5, 2.0, 3.0, 4.0]]
    assert meta.loc["00000002_000.png", "boxes"] == []
    labels = pd.DataFrame(records.labels, columns=FINDINGS, index=meta.index)
    assert labels.loc["00000001_001.png"].to_dict() == {
        name: float(name in ("Cardiomegaly", "Emphysema")) for name in FINDINGS}
    assert labels.loc["00000003_000.png", ["Pneumonia", "Infiltration"]].tolist() == [1, 1]
    assert labels.loc["00000002_000.png"].sum() == 0


def test_nih_official_lists_and_gz(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih", missing=(), gz=True)
    (root / "test_list.txt").write_text("00000003_000.png\n")
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    records = load_nih(root)
    check_records(records)
    split = records.meta.set_index(records.meta["relpath"].str.rsplit("/", n=1).str[1])["split"]
    assert split["00000003_000.png"] == "test"
    assert set(split.drop("00000003_000.png")) <= {"train", "val"}
    assert any("1 images in neither list" in note for note in records.notes)


def test_nih_errors(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "no_column")
    csv = root / "Data_Entry_2017.csv"
    csv.write_text(csv.read_text().replace("Finding Labels", "Findings"))
    with pytest.raises(DatasetError) as excinfo:
        load_nih(root)
    assert "'Finding Labels'" in error_text(excinfo) and str(csv) in error_text(excinfo)

    root = make_nih(tmp_path / "all_missing", missing=tuple(row[0] for row in NIH_ROWS))
    (root / "images").mkdir()
    with pytest.raises(DatasetError) as excinfo:
        load_nih(root)
    assert "none of the 5 images" in error_text(excinfo)

    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "Data_Entry_2017.csv").write_text((root / "Data_Entry_2017.csv").read_text())
    with pytest.raises(DatasetError, match=r"no images\*/ folder"):
        load_dataset(tmp_path / "no_images")


# --- folder ---------------------------------------------------------------------------------------


def test_folder_layout(tmp_path: Path) -> None:
    classes = {"normal": ["a.png", "deep/b.PNG"], "Pneumonia": ["c.jpg", "d.JPEG"]}
    root = make_folder(tmp_path / "xrays", classes)
    (root / "normal" / "notes.txt").write_text("not an image")
    write_png(root / "normal" / ".hidden.png")
    (root / "empty_class").mkdir()
    with contextlib.suppress(OSError):  # a symlink loop must not be followed
        os.symlink(root / "normal", root / "normal" / "deep" / "loop")
    assert detect_layout(root) == "folder"
    records = load_dataset(root)
    check_records(records)
    assert (records.dataset, records.layout) == ("xrays", "folder")
    assert records.label_names == ["Pneumonia", "normal"] and records.target == "Pneumonia"
    assert sorted(records.meta["relpath"]) == ["Pneumonia/c.jpg", "Pneumonia/d.JPEG", "normal/a.png",
                                               "normal/deep/b.PNG"]
    assert (records.labels.sum(axis=1) == 1).all() and records.y.sum() == 2
    assert any("--patient-regex" in note for note in records.notes)
    assert any("empty_class" in note for note in records.notes)


def test_folder_patient_regex_keeps_patients_together(tmp_path: Path) -> None:
    names = {"NEG": [f"pat{i}_img{j}.png" for i in range(40) for j in range(2)],
             "POS": [f"scan_pat{i}_{j}.png" for i in range(40, 80) for j in range(3)]}
    root = make_folder(tmp_path / "set", names)
    records = load_folder(root, SplitSpec(seed=1), patient_regex=r"(pat\d+)")
    check_records(records)
    assert records.meta["patient"].nunique() == 80 and set(records.meta["split"]) == set(SPLITS)
    by_stem = load_folder(root, SplitSpec(seed=1))
    assert by_stem.meta["patient"].nunique() == len(by_stem)
    with pytest.raises(DatasetError, match="invalid patient regex"):
        load_folder(root, patient_regex="(")


def test_folder_kermany_rule_and_targets() -> None:
    names = ["IM-0115-0001.jpeg", "IM-0429-0001-0002.jpeg", "NORMAL2-IM-1427-0001.jpeg",
             "person1_bacteria_1.jpeg", "person1_virus_6.jpeg", "person447_virus_921_1.jpeg", "other.png"]
    patients, note, _ = folder_patients(names)
    assert patients == ["IM-0115", "IM-0429", "NORMAL2-IM-1427", "person1", "person1", "person447", "other"]
    assert "1 names did not match" in note
    assert choose_target(["NORMAL", "PNEUMONIA"])[0] == "PNEUMONIA"
    assert choose_target(["abnormal", "No_Finding"])[0] == "abnormal"
    assert choose_target(["cats", "dogs"])[0] == "dogs"
    assert choose_target(["COVID", "Healthy", "Pneumonia"])[0] == "COVID"


def test_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(empty)
    text = error_text(excinfo)
    assert "cannot tell the dataset layout" in text and "stage_2_train_labels.csv" in text
    assert "Data_Entry_2017" in text and "class sub-folders" in text
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(empty, layout="folder")
    assert "one sub-folder per class" in error_text(excinfo)
    write_png(tmp_path / "loose" / "a.png")
    with pytest.raises(DatasetError, match="for images without labels use --layout plain"):
        load_dataset(tmp_path / "loose", layout="folder")

    one_class = make_folder(tmp_path / "one", {"NORMAL": ["a.png"]})
    with pytest.raises(DatasetError, match="found 1 sub-folders, 1 with images; images without labels: pass "
                                           "--layout plain"):
        load_dataset(one_class)                      # auto never reads images as unlabelled

    splits = make_folder(tmp_path / "kermany", {"train/NORMAL": ["a.png"], "test/NORMAL": ["b.png"]})
    with pytest.raises(DatasetError, match="look like splits, not classes"):
        load_dataset(splits)
    with pytest.raises(DatasetError, match="look like splits, not classes"):  # one split folder: not a class
        load_folder(make_folder(tmp_path / "only_train", {"train/NORMAL": ["a.png"]}))


def test_folder_with_one_sub_folder_has_unknown_labels(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "archive", {"scans": ["person1_a.png", "person1_b.png", "deep/other.png"]})
    records = load_dataset(root, layout="folder")
    check_records(records)
    assert (records.layout, records.label_names, records.target, records.labels.shape) == ("folder", [], "", (3, 0))
    assert not records.has_labels and records.label_lists() == [[], [], []]
    assert records.meta["patient"].tolist() == ["person1", "person1", "other"]  # the folder layout's naming rule
    assert any("labels unknown" in note for note in records.notes)
    with pytest.raises(DatasetError, match="labels of these 3 images are unknown .*no supervised target for "
                                           "training") as excinfo:
        records.require_labels("training")
    error_text(excinfo)


def test_plain_layout(tmp_path: Path) -> None:
    root = tmp_path / "unlabelled"
    for i in range(60):
        for name in (f"patient_{i:03d}/study1/view.png", f"patient_{i:03d}/study2/view.PNG"):
            write_png(root / name)
    write_png(root / ".hidden" / "x.png")
    (root / "patient_000" / "notes.txt").write_text("not an image")
    assert detect_layout(root) == "folder"     # patient folders look like classes: plain must be asked for
    records = load_dataset(root, layout="plain")
    check_records(records)
    assert (records.dataset, records.layout, records.labels.shape) == ("unlabelled", "plain", (120, 0))
    assert not records.has_labels and records.label_names == [] and records.target == ""
    assert records.meta["patient"].nunique() == 120            # each file its own patient: view.png twice is two
    assert any("each image is its own patient" in note for note in records.notes)
    assert set(records.meta["split"]) == set(SPLITS)
    grouped = load_dataset(root, layout="plain", split=SplitSpec(seed=2), patient_regex=r"(patient_\d+)/")
    check_records(grouped)                                     # every patient in one split
    assert grouped.meta["patient"].nunique() == 60 and set(grouped.meta["split"]) == set(SPLITS)
    assert grouped.split_record()["patient_rule"].startswith("patient regex")
    assert grouped.with_split(SplitSpec(seed=3)).meta["split"].tolist() != grouped.meta["split"].tolist()
    assert len(grouped.part(1, 2)) + len(grouped.part(2, 2)) == 120
    with pytest.raises(DatasetError, match="no png/jpg/jpeg/dcm images"):
        load_dataset(_empty(tmp_path / "nothing"), layout="plain")


def _empty(path: Path) -> Path:
    path.mkdir()
    (path / "readme.txt").write_text("no images")
    return path


# --- layout selection -----------------------------------------------------------------------------


def test_layout_errors(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "xrays", {"NORMAL": ["a.png"], "PNEUMONIA": ["b.png"]})
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(root, layout="rsna")
    assert "stage_2_train_labels.csv" in error_text(excinfo)
    with pytest.raises(DatasetError, match=r"Data_Entry_2017\*\.csv"):
        load_dataset(root, layout="nih")
    with pytest.raises(DatasetError, match="unknown layout 'coco'"):
        load_dataset(root, layout="coco")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset(root / "NORMAL" / "a.png")
    rsna = make_rsna(tmp_path / "rsna")
    assert any("patient regex ignored" in n for n in load_dataset(rsna, "auto", patient_regex="x").notes)
    with pytest.raises(DatasetError, match="beside the rsna label file stage_2_train_labels.csv: use --layout rsna"):
        load_dataset(rsna, layout="folder")          # its one sub-folder is not a class: the CSV has the labels
    plain = load_dataset(rsna, layout="plain")
    assert not plain.has_labels and any("labels ignored" in n for n in plain.notes)


def test_every_file_under_the_root_is_looked_at(tmp_path: Path) -> None:
    """A hospital export: DICOM files without an extension (as under a DICOMDIR), one without a preamble, the
    DICOMDIR itself (which lists one file that is gone), a text file and a hidden file. Before, the extensionless
    DICOMs were never listed, and nothing said that any file had been left out (230 of 1,025 files of a real
    corpus, silently)."""
    from pydicom.dataset import Dataset

    from cbir.app.ingest import ingest_records
    from cbir.console import QUIET
    from cbir.io import load_pseudonymizer
    from cbir.models import ModelConfig, create_model, load_checkpoint, save_checkpoint
    from cbir.store import open_index
    from tests.badinputs import write_dicom
    pixels = (np.add.outer(np.arange(48), np.arange(48)) * 2).astype(np.uint16)
    root = tmp_path / "export"
    for cls in ("NORMAL", "PNEUMONIA"):
        folder = root / cls / "IMAGES"
        folder.mkdir(parents=True)
        for i in range(3):
            write_dicom(folder / f"IM{i:06d}", pixels + i, PatientID=f"{cls}-{i}")     # no extension
        write_dicom(folder / "raw0001", pixels + 7, preamble=False, PatientID=f"{cls}-raw")   # nor a preamble
        write_dicom(root / cls / "x.dcm", pixels + 9, PatientID=f"{cls}-x")
        listed = []
        for ref in (["IMAGES", "IM000000"], ["IMAGES", "IM000001"], ["IMAGES", "IM000099"]):   # the last is gone
            entry = Dataset()
            entry.DirectoryRecordType, entry.ReferencedFileID = "IMAGE", ref
            listed.append(entry)
        write_dicom(root / cls / "DICOMDIR", None, DirectoryRecordSequence=listed)
        (root / cls / "README.txt").write_text("export notes")
        (root / cls / ".DS_Store").write_bytes(b"\0" * 64)
    (root / "labels.csv").write_text("id,label\n")
    records = load_folder(root)
    assert len(records) == 10 and sorted(records.label_names) == ["NORMAL", "PNEUMONIA"]
    assert {r.rsplit("/", 1)[-1] for r in records.meta["relpath"]} == {"IM000000", "IM000001", "IM000002",
                                                                       "raw0001", "x.dcm"}
    reasons = dict(records.left_out)
    assert len(records.left_out) == 9
    assert reasons["NORMAL/IMAGES/IM000099"] == "listed in the DICOMDIR but absent"
    assert reasons["NORMAL/README.txt"] == "not an image (extension .txt, and no DICOM marker)"
    assert reasons["NORMAL/.DS_Store"] == "hidden file" and reasons["labels.csv"].startswith("a file directly")
    assert reasons["PNEUMONIA/DICOMDIR"].startswith("a DICOMDIR (an index")
    assert any("9 files left out: " in note for note in records.notes)
    # the patients of extensionless DICOMs come from their headers, as for .dcm files
    assert set(records.meta["patient_source"]) == {"header"}
    model = tmp_path / "model"
    save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32)), model)
    with open_index(str(tmp_path / "index"), writable=True, create=True) as index:
        summary = ingest_records(records, load_checkpoint(model), index, "c", load_pseudonymizer(), workers=0,
                                 reporter=QUIET)
    assert summary.ingested == 10 and summary.failed == 0 and summary.total == 19 and summary.left_out == 9
    assert "19 files: 10 ingested" in summary.line and "9 left out" in summary.line
    assert "2 listed in the DICOMDIR but absent" in summary.line
    assert "2 hidden file" in summary.line and "2 a DICOMDIR" in summary.line
