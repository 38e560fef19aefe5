"""Patients from the DICOM header, not from file names (`cbir.data.patients`, `cbir.io.patient`): real DICOM
files written with pydicom, a real (random) timm model and real Qdrant Edge; no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cbir.app.ingest import ingest_records
from cbir.data.layout import load_dataset
from cbir.data.patients import FALLBACK_SOURCE, HEADER_SOURCE
from cbir.data.records import Records
from cbir.data.splits import SplitSpec
from cbir.data.synth import synth_dataset
from cbir.io import load_pseudonymizer
from cbir.io.dicom import peek_patient
from cbir.io.patient import usable_patient_id
from cbir.models import LoadedModel, ModelConfig, create_model, load_checkpoint, save_checkpoint
from cbir.store import open_index
from cbir.train.pretrain import load_sources
from tests.dicom_corpus import dataset, image, save

#: One patient's studies, exported under names that say nothing about who it is (as hospital exports do).
MANY = ("NORMAL/xr_20190312_a.dcm", "NORMAL/0007.dcm", "NORMAL/scan-final.dcm", "PNEUMONIA/IMG_5521.dcm",
        "PNEUMONIA/study_b/chest.dcm", "PNEUMONIA/zz.dcm")
RAW_ID = "MRN-004211"
#: Files whose PatientID names nobody: they fall back to the file rule and are counted.
PLACEHOLDERS = {"NORMAL/anon_1.dcm": "ANONYMOUS", "NORMAL/anon_2.dcm": "0000", "PNEUMONIA/anon_3.dcm": None}
SEEDS = range(5)


def write_export(root: Path) -> Path:
    """A folder-per-class DICOM export: patient RAW_ID under six unrelated names, 16 other patients with one or
    two files each, a PatientID "77" from two issuers (two patients), three placeholder IDs and one PNG."""
    files: dict[str, dict[str, object]] = {rel: {"PatientID": RAW_ID} for rel in MANY}
    for i in range(16):
        for j in range(1 + i % 2):
            files[f"{('NORMAL', 'PNEUMONIA')[i % 2]}/p{i:02d}_{j}.dcm"] = {"PatientID": f"PID{i:03d}"}
    files["NORMAL/issuer_a.dcm"] = {"PatientID": "77", "IssuerOfPatientID": "HOSPITAL_A"}
    files["PNEUMONIA/issuer_b.dcm"] = {"PatientID": "77", "IssuerOfPatientID": "HOSPITAL_B"}
    files.update({rel: {"PatientID": value} for rel, value in PLACEHOLDERS.items()})
    for n, (rel, value) in enumerate(sorted(files.items())):
        ds = dataset(image(48, seed=n))
        patient_id = value["PatientID"]
        if patient_id is None:
            del ds.PatientID
        else:
            ds.PatientID = patient_id
        if "IssuerOfPatientID" in value:
            ds.IssuerOfPatientID = value["IssuerOfPatientID"]
        save(ds, root / rel)
    Image.fromarray((np.random.default_rng(1).random((48, 48)) * 255).astype(np.uint8)).save(root / "NORMAL" /
                                                                                             "photo.png")
    return root


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_export(tmp_path_factory.mktemp("patients") / "export")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    out = tmp_path_factory.mktemp("patients") / "model"
    save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32,
                                             label_names=["NORMAL", "PNEUMONIA"], target="PNEUMONIA")), out)
    return load_checkpoint(out)


def _rows(records: Records, names: tuple[str, ...] | set[str]) -> Records:
    return records.subset(records.meta["relpath"].isin(list(names)).to_numpy())


def test_placeholder_ids_name_nobody() -> None:
    assert [usable_patient_id(v) for v in ("", "  ", None, "ANONYMOUS", "anonymized", "Unknown", "0", "0000", "-",
                                           "^^", "N/A")] == [None] * 11
    assert [usable_patient_id(v) for v in (" MRN-1 ", "00012", "A", "7")] == ["MRN-1", "00012", "A", "7"]


@pytest.mark.parametrize("layout", ["folder", "plain"])
def test_one_patient_under_unrelated_names_is_in_one_split(export: Path, layout: str) -> None:
    pseudonymize = load_pseudonymizer()
    for seed in SEEDS:
        records = load_dataset(export, layout, split=SplitSpec(seed=seed))
        many = _rows(records, MANY)
        assert len(many) == len(MANY) and many.meta["split"].nunique() == 1, (seed, many.meta["split"].tolist())
    assert set(many.meta["patient_source"]) == {HEADER_SOURCE}
    assert set(many.patient_pseudonyms(pseudonymize)) == {pseudonymize(RAW_ID)}   # the header's keyed pseudonym
    assert not records.meta["patient"].astype(str).str.contains("MRN|PID").any() and "77" not in set(
        records.meta["patient"])   # no raw ID is held at all
    issuers = _rows(records, {"NORMAL/issuer_a.dcm", "PNEUMONIA/issuer_b.dcm"}).meta["patient"]
    assert issuers.nunique() == 2     # one ID from two issuers is two patients
    fallback = _rows(records, set(PLACEHOLDERS))
    assert set(fallback.meta["patient_source"]) == {FALLBACK_SOURCE} and records.patient_fallbacks == 3
    assert fallback.meta["patient"].nunique() == 3    # each its own patient, by the file rule
    assert any("3 DICOM files have no usable PatientID" in note for note in records.notes)
    assert "DICOM PatientID (keyed pseudonym, key " in records.patient_rule
    assert RAW_ID not in json.dumps(records.split_record())


def test_an_explicit_regex_wins_over_the_header(export: Path) -> None:
    records = load_dataset(export, "folder", patient_regex=r"^(\w)")   # every file by its first letter
    assert records.patient_rule.startswith("patient regex") and records.patient_fallbacks == 0
    assert HEADER_SOURCE not in set(records.meta["patient_source"])
    assert records.meta["patient"].nunique() < 10


@pytest.mark.parametrize("layout", ["folder", "plain"])
def test_ingest_stores_the_patient_the_split_used(export: Path, model: LoadedModel, layout: str,
                                                  tmp_path: Path) -> None:
    pseudonymize = load_pseudonymizer()
    records = load_dataset(export, layout)
    with open_index(str(tmp_path / "index"), writable=True, create=True) as index:
        summary = ingest_records(records, model, index, "c", pseudonymize, batch_size=8, workers=0)
        points = list(index.scroll("c"))
        meta = index.get_meta("c")
    assert summary.ingested == len(records) == len(points) and summary.patient_fallbacks == 3
    assert "3 DICOM files without a usable PatientID" in summary.line
    by_file = {pseudonymize.file(records.dataset_id, rel): pseudonym
               for rel, pseudonym in zip(records.meta["relpath"], records.patient_pseudonyms(pseudonymize),
                                         strict=True)}
    assert all(p.payload["pseudonym"] == by_file[p.payload["file"]] for p in points)   # the split's patient
    many = {by_file[pseudonymize.file(records.dataset_id, rel)] for rel in MANY}
    stored = [p for p in points if p.payload["pseudonym"] in many]
    assert len(many) == 1 and len(stored) == len(MANY) and len({p.payload["split"] for p in stored}) == 1
    text = json.dumps([p.payload for p in points]) + json.dumps(meta)
    assert not any(raw in text for raw in (RAW_ID, "PID001", "HOSPITAL_A", "xr_20190312"))


def test_pretraining_pairs_a_patients_files(export: Path) -> None:
    (records,), keys = load_sources([export])
    by_rel = dict(zip(records.meta["relpath"], keys, strict=True))
    assert len({by_rel[rel] for rel in MANY}) == 1 and by_rel[MANY[0]] is not None
    assert all(by_rel[rel] is None for rel in PLACEHOLDERS)   # no usable patient: no partner
    assert by_rel["NORMAL/photo.png"] is None                  # its own patient (file stem)


def test_rsna_keeps_the_label_files_patient_and_counts_headers_that_differ(model: LoadedModel,
                                                                           tmp_path: Path) -> None:
    root = tmp_path / "rsna"
    synth_dataset("rsna", 12, 32, root, seed=3)
    changed = sorted((root / "stage_2_train_images").glob("*.dcm"))[0]
    ds = pydicom.dcmread(changed)
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(changed)
    pseudonymize = load_pseudonymizer()
    assert peek_patient(changed, pseudonymize) == pseudonymize("SOMEONE-ELSE")
    records = load_dataset(root, "rsna")
    with open_index(str(tmp_path / "index"), writable=True, create=True) as index:
        summary = ingest_records(records, model, index, "c", pseudonymize, batch_size=8, workers=0)
        stored = {p.payload["pseudonym"] for p in index.scroll("c")}
    assert summary.patient_mismatches == 1 and "1 DICOM headers name another patient" in summary.line
    assert stored == {pseudonymize(p) for p in records.meta["patient"]}   # the CSV's patientId wins
