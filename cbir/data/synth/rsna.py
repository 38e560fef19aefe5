"""Synthetic RSNA Pneumonia Detection Challenge dataset, in the Kaggle layout.

``out/stage_2_train_labels.csv`` (patientId,x,y,width,height,Target; one row per box, a negative as one
row with empty box columns) and ``out/stage_2_train_images/<patientId>.dcm``: CR DICOM files, 8-bit
MONOCHROME2, JPEG Baseline, like the real download. The boxes are in the pixel coordinates of the
written images (the real file's 1024-pixel boxes scaled by size/1024), and each box holds a patchy
opacity. The headers carry fake PHI (name, birth date, MRN, accession, institution, physician, study
date/time, a private tag) so that readers can be tested for stripping it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ComputedRadiographyImageStorage, JPEGBaseline8Bit, generate_uid

from cbir.data.synth import phantom
from cbir.data.synth.labels import (
    RSNA_IMAGE_SIZE,
    RSNA_PIXEL_SPACING,
    RsnaCase,
    SynthSummary,
)

LABELS_CSV = "stage_2_train_labels.csv"
IMAGE_DIR = "stage_2_train_images"
LAYOUT_ID = 1  # separates the random streams of the two layouts
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "CBIRSYNTH"

_FIRST = ("JANE", "JOHN", "MARIA", "WEI", "AMIR", "OLGA", "KOFI", "SAOIRSE", "HIROSHI", "LUCIA", "PRIYA",
          "TOMASZ", "AIKO", "NADIA", "ESTEBAN", "GRETA", "IBRAHIM", "MEI", "RAFAEL", "INGRID")
_LAST = ("DOE", "ROE", "QUILLFEATHER", "BRAMBLEWOOD", "TESTPERSON", "MOCKINGTON", "FAKESON", "PLACEHOLDER",
         "SYNTHEWICZ", "NOBODY", "EXAMPLEMAN", "DUMMYSTEIN", "FICTORIA", "PSEUDONIK", "LOREMIPSUM")
_INSTITUTIONS = ("Saint Nowhere General Hospital", "Fictional Valley Medical Center",
                 "Mockford University Hospital", "Synthetic County Infirmary")
_STREETS = ("Imaginary Lane", "Placeholder Avenue", "Nonexistent Road", "Fabricated Street")
_CITIES = ("Springfield", "Shelbyville", "Ogdenville", "North Haverbrook")


def fake_phi(rng: np.random.Generator, age: int) -> dict[str, str]:
    """Identifying header values for one patient; all invented, all distinctive strings."""
    year = int(rng.integers(2009, 2018))
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    hour, minute, second = int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    birth_month, birth_day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    street = f"{int(rng.integers(10, 9999))} {rng.choice(_STREETS)}, {rng.choice(_CITIES)}"
    return {
        "PatientName": f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}^{chr(65 + int(rng.integers(26)))}",
        "PatientBirthDate": f"{year - age - 1:04d}{birth_month:02d}{birth_day:02d}",
        "OtherPatientIDs": f"MRN{int(rng.integers(10**7, 10**8))}",
        "AccessionNumber": f"ACC{int(rng.integers(10**8, 10**9))}",
        "InstitutionName": str(rng.choice(_INSTITUTIONS)),
        "InstitutionAddress": street,
        "ReferringPhysicianName": f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}^^DR",
        "StudyDate": f"{year:04d}{month:02d}{day:02d}",
        "StudyTime": f"{hour:02d}{minute:02d}{second:02d}",
        PRIVATE_CREATOR: f"SYNTH-PATIENT-KEY-{int(rng.integers(10**9, 10**10))}",
    }


def jpeg_baseline(pixels: np.ndarray, quality: int = 95) -> bytes:
    """8-bit greyscale JPEG (baseline, one component) of a uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def dicom_file(pixels: np.ndarray, case: RsnaCase, phi: dict[str, str], seed: int, spacing: float) -> FileDataset:
    """A CR DICOM file (with preamble) holding `pixels` as encapsulated JPEG Baseline."""
    entropy = [str(seed), case.patient_id]
    sop = generate_uid(entropy_srcs=[*entropy, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyDate, ds.StudyTime = phi["StudyDate"], phi["StudyTime"]
    ds.AccessionNumber = phi["AccessionNumber"]
    ds.Modality = "CR"
    ds.InstitutionName, ds.InstitutionAddress = phi["InstitutionName"], phi["InstitutionAddress"]
    ds.ReferringPhysicianName = phi["ReferringPhysicianName"]
    ds.SeriesDescription = f"view: {case.view}"
    ds.PatientName = phi["PatientName"]
    ds.PatientID = case.patient_id
    ds.PatientBirthDate = phi["PatientBirthDate"]
    ds.PatientSex = case.sex
    # RSNA writes the age as a bare number ("62"), which is not a valid AS value: keep it verbatim.
    ds.add(DataElement(0x00101010, "AS", str(case.age), validation_mode=config.IGNORE))
    ds.OtherPatientIDs = phi["OtherPatientIDs"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = case.view
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    ds.StudyID = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.PatientOrientation = ""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", phi[PRIVATE_CREATOR])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg_baseline(pixels)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def scaled_boxes(case: RsnaCase, size: int) -> list[tuple[float, float, float, float]]:
    """The case's 1024-pixel boxes in the pixels of a size×size image (whole pixels, inside the image)."""
    s = size / RSNA_IMAGE_SIZE
    out = []
    for x, y, w, h in case.boxes:
        x0, y0 = min(max(round(x * s), 0), size - 1), min(max(round(y * s), 0), size - 1)
        out.append((float(x0), float(y0), float(max(1, min(round(w * s), size - x0))),
                    float(max(1, min(round(h * s), size - y0)))))
    return out


def render_case(case: RsnaCase, boxes: list[tuple[float, float, float, float]], size: int,
                rng: np.random.Generator) -> np.ndarray:
    """The phantom of one patient (uint8), with an opacity in each box (given in image pixels)."""
    anatomy = phantom.sample_pose(phantom.sample_anatomy(rng, case.sex, case.age), rng, ap=case.view == "AP")
    fractions = [(x / size, y / size, w / size, h / size) for x, y, w, h in boxes]
    return phantom.to_uint8(phantom.render(anatomy, size, rng, boxes=fractions))


def _csv_rows(case: RsnaCase, boxes: list[tuple[float, float, float, float]]) -> list[list[str]]:
    if not boxes:
        return [[case.patient_id, "", "", "", "", "0"]]
    return [[case.patient_id, *(f"{v:.1f}" for v in box), "1"] for box in boxes]


def write_rsna(cases: list[RsnaCase], size: int, out: Path, seed: int,
               progress: Callable[[int], None] | None = None) -> SynthSummary:
    """Render and write `cases` in the RSNA layout under `out`."""
    images = out / IMAGE_DIR
    images.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    phi_seen: dict[str, set[str]] = {}
    spacings = np.asarray([v for v, _ in RSNA_PIXEL_SPACING])
    weights = np.asarray([c for _, c in RSNA_PIXEL_SPACING], dtype=float)
    for index, case in enumerate(cases):
        rng = np.random.default_rng([seed, LAYOUT_ID, 1, index])
        boxes = scaled_boxes(case, size)
        pixels = render_case(case, boxes, size, rng)
        phi = fake_phi(rng, case.age)
        spacing = float(rng.choice(spacings, p=weights / weights.sum())) * RSNA_IMAGE_SIZE / size
        dicom_file(pixels, case, phi, seed, spacing).save_as(images / f"{case.patient_id}.dcm",
                                                             enforce_file_format=True)
        for key, value in phi.items():
            phi_seen.setdefault(key, set()).add(value)
        rows.extend(_csv_rows(case, boxes))
        if progress is not None:
            progress(1)
    with open(out / LABELS_CSV, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
        writer.writerows(rows)
    n_pos = sum(case.target for case in cases)
    return SynthSummary(
        layout="rsna", out=out, n_images=len(cases), n_patients=len({c.patient_id for c in cases}),
        n_positive=n_pos, findings={"Pneumonia": n_pos}, n_boxes=sum(len(c.boxes) for c in cases),
        phi={key: sorted(values) for key, values in phi_seen.items()},
    )
