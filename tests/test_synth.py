"""Synthetic datasets: real layouts, real DICOM, labels that match the real files, findings in place."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEGBaseline8Bit

from cbir.data.synth import SynthSummary, phantom, synth_dataset
from cbir.data.synth import labels as L
from tests.conftest import SHARED, needs_shared

RSNA_CSV = SHARED / "data" / "labels" / "rsna" / "stage_2_train_labels.csv"
RSNA_HEADERS = SHARED / "data" / "labels" / "rsna" / "stage_2_train_dicom_headers.csv.gz"
NIH_CSV = SHARED / "data" / "labels" / "nih" / "Data_Entry_2017_v2020.csv.gz"
needs_rsna = needs_shared(RSNA_CSV)
needs_nih = needs_shared(NIH_CSV)

SIZE = 64


@pytest.fixture(scope="module")
def rsna(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return synth_dataset("rsna", n=36, size=SIZE, out=tmp_path_factory.mktemp("rsna"), seed=3)


@pytest.fixture(scope="module")
def nih(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return synth_dataset("nih", n=40, size=48, out=tmp_path_factory.mktemp("nih"), seed=5)


def _rsna_table(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "stage_2_train_labels.csv", dtype={"patientId": str})


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- RSNA


def test_rsna_layout_and_dicom(rsna: SynthSummary) -> None:
    root = rsna.out
    table = _rsna_table(root)
    assert list(table.columns) == ["patientId", "x", "y", "width", "height", "Target"]
    patients = table.groupby("patientId", sort=False)["Target"].max()
    assert len(patients) == rsna.n_patients == rsna.n_images == 36
    assert int(patients.sum()) == rsna.n_positive == round(36 * L.RSNA_POSITIVE_RATE)
    assert int((table["Target"] == 1).sum()) == rsna.n_boxes
    negatives = table[table["Target"] == 0]
    assert negatives[["x", "y", "width", "height"]].isna().all().all()
    assert negatives["patientId"].is_unique  # a negative is exactly one row
    files = sorted((root / "stage_2_train_images").glob("*.dcm"))
    assert {f.stem for f in files} == set(patients.index)
    for path in files[:8]:
        assert path.read_bytes()[128:132] == b"DICM"
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert (ds.Modality, ds.PhotometricInterpretation, ds.BodyPartExamined) == ("CR", "MONOCHROME2", "CHEST")
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel) == (SIZE, SIZE, 8, 8, 1)
        assert ds.PatientID == path.stem and ds.ViewPosition in ("PA", "AP") and ds.PatientSex in ("M", "F")
        assert str(ds["PatientAge"].value).isdigit()  # a bare number, as RSNA writes it
        pixels = ds.pixel_array
        assert pixels.shape == (SIZE, SIZE) and pixels.dtype == np.uint8 and pixels.std() > 10


def test_rsna_fake_phi_is_in_the_headers(rsna: SynthSummary) -> None:
    keys = {"PatientName", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber", "InstitutionName",
            "InstitutionAddress", "ReferringPhysicianName", "StudyDate", "StudyTime", "CBIRSYNTH"}
    assert keys <= set(rsna.phi)
    seen: dict[str, set[str]] = {key: set() for key in keys}
    for path in (rsna.out / "stage_2_train_images").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        for key in keys - {"CBIRSYNTH"}:
            seen[key].add(str(ds[key].value))
        seen["CBIRSYNTH"].add(str(ds.private_block(0x0011, "CBIRSYNTH")[0x01].value))
    for key in keys:
        assert seen[key] == set(rsna.phi[key]), key
    assert len(rsna.phi["PatientName"]) > 1  # drawn per image


def test_rsna_opacity_is_inside_the_boxes(rsna: SynthSummary) -> None:
    table = _rsna_table(rsna.out)
    images = {p.stem: pydicom.dcmread(p).pixel_array.astype(float)
              for p in (rsna.out / "stage_2_train_images").glob("*.dcm")}
    negatives = np.stack([images[p] for p in table.loc[table["Target"] == 0, "patientId"]])
    excess = []
    for row in table[table["Target"] == 1].itertuples():
        x, y, w, h = (int(v) for v in (row.x, row.y, row.width, row.height))
        region = (slice(y + h // 4, y + h - h // 4), slice(x + w // 4, x + w - w // 4))  # the box's core
        excess.append(images[row.patientId][region].mean() - negatives[(slice(None), *region)].mean())
    assert np.mean(excess) > 5.0, excess


def test_box_opacity_stays_in_its_box() -> None:
    rng = np.random.default_rng(0)
    anatomy = phantom.sample_pose(phantom.sample_anatomy(rng), rng, ap=False)
    box = (0.2, 0.35, 0.22, 0.3)
    with_box = phantom.density_map(anatomy, SIZE, np.random.default_rng(1), boxes=[box])
    without = phantom.density_map(anatomy, SIZE, np.random.default_rng(1))
    added = with_box - without
    x0, y0 = int(box[0] * SIZE), int(box[1] * SIZE)
    x1, y1 = int(np.ceil((box[0] + box[2]) * SIZE)), int(np.ceil((box[1] + box[3]) * SIZE))
    outside = added.copy()
    outside[y0:y1, x0:x1] = 0.0
    assert np.abs(outside).max() < 1e-6
    assert added.min() >= -1e-6 and added[y0:y1, x0:x1].mean() > 0.02


@pytest.mark.parametrize("name", sorted(phantom.FINDINGS))
def test_every_nih_finding_changes_the_image(name: str) -> None:
    rng = np.random.default_rng(11)
    anatomy = phantom.sample_pose(phantom.sample_anatomy(rng), rng, ap=False)  # PA: no ECG leads
    plain = phantom.density_map(anatomy, SIZE, np.random.default_rng(2))
    sick_anatomy = phantom.adjust_for_findings(anatomy, [name], np.random.default_rng(2))
    sick = phantom.density_map(sick_anatomy, SIZE, np.random.default_rng(3), findings=[name])
    assert np.abs(sick - plain).max() > 0.1, name  # noise-free densities: only the finding differs
    image = phantom.render(anatomy, SIZE, np.random.default_rng(2), findings=[name])
    assert image.shape == (SIZE, SIZE) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0


# ---------------------------------------------------------------- NIH


def test_nih_layout(nih: SynthSummary) -> None:
    root = nih.out
    csv = root / "Data_Entry_2017_v2020.csv"
    header = csv.read_text().splitlines()[0]
    assert header == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                      "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    table = pd.read_csv(csv)
    assert list(table.columns) == ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                                   "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                                   "OriginalImagePixelSpacing[x", "y]"]
    assert len(table) == nih.n_images == 40
    assert table["Image Index"].str.fullmatch(r"\d{8}_\d{3}\.png").all()
    assert (table["Image Index"].str[:8].astype(int) == table["Patient ID"]).all()
    assert (table["Image Index"].str[9:12].astype(int) == table["Follow-up #"]).all()
    assert table.groupby("Patient ID").size().max() > 1  # some patients have follow-ups
    names = {n for labels in table["Finding Labels"] for n in labels.split("|")}
    assert names <= {*L.NIH_FINDINGS, L.NO_FINDING}
    assert (table["Finding Labels"] != L.NO_FINDING).sum() == nih.n_positive
    for name in table["Image Index"][:10]:
        with Image.open(root / "images" / name) as im:
            assert im.mode == "L" and im.size == (48, 48) and im.format == "PNG"


def test_nih_split_files_partition_patients(nih: SynthSummary) -> None:
    table = pd.read_csv(nih.out / "Data_Entry_2017_v2020.csv")
    train = (nih.out / "train_val_list.txt").read_text().split()
    test = (nih.out / "test_list.txt").read_text().split()
    assert sorted(train + test) == sorted(table["Image Index"]) and train and test
    patient = dict(zip(table["Image Index"], table["Patient ID"], strict=True))
    assert not {patient[n] for n in train} & {patient[n] for n in test}


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("layout", ["rsna", "nih"])
def test_same_seed_same_bytes(tmp_path: Path, layout: str) -> None:
    def run(name: str, seed: int) -> str:
        out = tmp_path / name
        synth_dataset(layout, n=6, size=32, out=out, seed=seed)
        return _digest(sorted(p for p in out.rglob("*") if p.is_file()))

    first = run("a", 1)
    assert run("b", 1) == first
    assert run("c", 2) != first


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout"):
        synth_dataset("padchest", 2, 32, tmp_path)
    with pytest.raises(ValueError, match="size"):
        synth_dataset("rsna", 2, 8, tmp_path)


def test_progress_is_called_per_image(tmp_path: Path) -> None:
    calls: list[int] = []
    synth_dataset("nih", n=3, size=32, out=tmp_path, progress=calls.append)
    assert calls == [1, 1, 1]


# ---------------------------------------------------------------- against the real label files


@needs_rsna
def test_embedded_rsna_statistics_match_the_real_file() -> None:
    table = pd.read_csv(RSNA_CSV)
    target = table.groupby("patientId")["Target"].max()
    assert (len(target), int(target.sum())) == (L.RSNA_N_PATIENTS, L.RSNA_N_POSITIVE)
    boxes = table[table["Target"] == 1].copy()
    boxes["cx"], boxes["cy"] = boxes.x + boxes.width / 2, boxes.y + boxes.height / 2
    boxes["half"] = np.where(boxes.cx >= 512, "R", "L")
    patterns = boxes.sort_values(["patientId", "half"]).groupby("patientId")["half"].sum().value_counts()
    assert patterns.to_dict() == L.RSNA_BOX_PATTERNS
    for half, group in boxes.groupby("half"):
        for column, expected in L.RSNA_BOX_MARGINALS[str(half)].items():
            actual = group[column].quantile(list(L.RSNA_BOX_LEVELS)).round().astype(int).tolist()
            assert actual == list(expected), (half, column)
    if RSNA_HEADERS.is_file():
        headers = pd.read_csv(RSNA_HEADERS)
        headers["t"] = headers["PatientID"].map(target)
        ap = headers.groupby("t")["ViewPosition"].apply(lambda v: (v == "AP").mean())
        male = headers.groupby("t")["PatientSex"].apply(lambda v: (v == "M").mean())
        assert np.allclose(ap.to_numpy(), L.RSNA_AP_RATE, atol=1e-4)
        assert np.allclose(male.to_numpy(), L.RSNA_MALE_RATE, atol=1e-4)
        ages = headers["PatientAge"].clip(upper=100).quantile(list(L.AGE_LEVELS)).astype(int).tolist()
        assert ages == list(L.RSNA_AGE_QUANTILES)


@needs_nih
def test_embedded_nih_statistics_match_the_real_file() -> None:
    table = pd.read_csv(NIH_CSV)
    assert (len(table), table["Patient ID"].nunique()) == (L.NIH_N_IMAGES, L.NIH_N_PATIENTS)
    combos = table["Finding Labels"].value_counts()
    assert tuple(combos.head(60).items()) == L.NIH_TOP_COMBINATIONS
    other = table[~table["Finding Labels"].isin(combos.head(60).index)]["Finding Labels"]
    assert other.str.count(r"\|").add(1).value_counts().to_dict() == L.NIH_OTHER_SIZES
    assert other.str.get_dummies("|").sum().to_dict() == L.NIH_OTHER_WEIGHTS
    prevalence = table["Finding Labels"].str.get_dummies("|").mean()
    for name, value in L.NIH_PREVALENCE.items():
        assert abs(prevalence[name] - value) < 1e-4, name
    per_patient = table.groupby("Patient ID").size()
    for lo, hi, count in L.NIH_IMAGES_PER_PATIENT:
        assert int(per_patient.between(lo, hi).sum()) == count, (lo, hi)
    nofind = table["Finding Labels"] == L.NO_FINDING
    ap = [(table.loc[mask, "View Position"] == "AP").mean() for mask in (nofind, ~nofind)]
    assert np.allclose(ap, L.NIH_AP_RATE, atol=1e-4)
    assert abs((table["Patient Gender"] == "M").mean() - L.NIH_MALE_RATE) < 1e-4
    assert table["Patient Age"].quantile(list(L.AGE_LEVELS)).astype(int).tolist() == list(L.NIH_AGE_QUANTILES)
    with gzip.open(NIH_CSV, "rt") as fh:
        geometry = pd.Series([",".join(line.rstrip("\n").split(",")[7:11]) for line in fh][1:]).value_counts()
    assert [(*g.split(","), c) for g, c in geometry.head(10).items()] == [tuple(g) for g in L.NIH_GEOMETRY]


def test_sampled_labels_follow_the_embedded_statistics() -> None:
    cases = L.sample_nih_cases(np.random.default_rng(0), 20_000)
    for name in ("Infiltration", "Effusion", "Atelectasis", "Nodule"):
        rate = np.mean([name in c.findings for c in cases])
        assert abs(rate - L.NIH_PREVALENCE[name]) < 0.012, name
    assert abs(np.mean([not c.findings for c in cases]) - L.NIH_PREVALENCE[L.NO_FINDING]) < 0.015
    rsna = L.sample_rsna_cases(np.random.default_rng(0), 2_000)
    boxes = [len(c.boxes) for c in rsna if c.boxes]
    assert abs(np.mean([b == 2 for b in boxes]) - 3266 / 6012) < 0.04
    ap = np.mean([c.view == "AP" for c in rsna if c.boxes])
    assert abs(ap - L.RSNA_AP_RATE[1]) < 0.05


# ---------------------------------------------------------------- driven by a real label file


@needs_rsna
def test_rsna_labels_csv_reproduces_targets_and_boxes(tmp_path: Path) -> None:
    n = 25
    summary = synth_dataset("rsna", n=n, size=SIZE, out=tmp_path, labels_csv=RSNA_CSV)
    real = pd.read_csv(RSNA_CSV, dtype={"patientId": str})
    first = list(dict.fromkeys(real["patientId"]))[:n]
    real = real[real["patientId"].isin(first)].reset_index(drop=True)
    ours = _rsna_table(tmp_path)
    assert list(ours["patientId"]) == list(real["patientId"])
    assert list(ours["Target"]) == list(real["Target"])
    assert summary.n_positive == real.groupby("patientId")["Target"].max().sum() > 0
    scale = SIZE / 1024
    boxes = real[["x", "y", "width", "height"]].to_numpy() * scale
    assert np.allclose(ours[["x", "y", "width", "height"]].to_numpy(), np.round(boxes), equal_nan=True, atol=1)
    assert {p.stem for p in (tmp_path / "stage_2_train_images").glob("*.dcm")} == set(first)


@needs_nih
def test_nih_labels_csv_rows_are_copied_verbatim(tmp_path: Path) -> None:
    synth_dataset("nih", n=12, size=32, out=tmp_path, labels_csv=NIH_CSV)
    with gzip.open(NIH_CSV, "rt") as fh:
        real = [next(fh).rstrip("\n") for _ in range(13)]
    assert (tmp_path / "Data_Entry_2017_v2020.csv").read_text().splitlines() == real
