"""A corpus of bad (and merely unusual) inputs, written with real pydicom and Pillow, for tests/test_bad_inputs.py.

`write_folder_corpus(root)` makes a folder-layout dataset (`normal/`, `pneumonia/`) that mixes good images
with one file of every file-level kind; `KINDS` says what ingest must do with each.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.1"        # Computed Radiography Image Storage
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
MPEG2 = "1.2.840.10008.1.2.4.100"              # MPEG2 video: no decoder for it here


@dataclass(frozen=True)
class Kind:
    name: str
    relpath: str          # in the corpus
    outcome: str          # "ingested", "failed" or "skipped"
    message: str          # a fragment of the one line a user sees ("" when ingested)


def image(seed: int, size: int = 48) -> np.ndarray:
    """A smooth grey test image (uint8) that differs with the seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 100 + 80 * np.sin(6 * x + rng.uniform(0, 6)) * np.cos(5 * y + rng.uniform(0, 6)) + rng.normal(0, 5,
                                                                                                         (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dicom(path: Path, pixels: np.ndarray | None, *, sop_class: str = CT_IMAGE, uid: str | None = None,
                photometric: str = "MONOCHROME2", preamble: bool = True, syntax: str = ExplicitVRLittleEndian,
                frames: int = 1, **extra: object) -> Path:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid or generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "ROE^JANE", f"MRN-{path.stem}", "19710203"
    ds.PatientSex, ds.PatientAge, ds.ViewPosition, ds.Modality = "F", "052Y", "PA", "CR"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
        ds.PhotometricInterpretation = photometric
        bits = pixels.dtype.itemsize * 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, extra.pop("BitsStored", bits), bits - 1
        ds.PixelRepresentation = 0
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = b"".join([pixels.tobytes()] * frames)
        if pydicom.uid.UID(syntax).is_compressed:  # encapsulated fragments of a codec nobody here decodes
            ds.PixelData = encapsulate([pixels.tobytes()] * frames)
            ds["PixelData"].is_undefined_length = True
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=preamble, implicit_vr=False, little_endian=True)
    return path


def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def write_good(root: Path, count: int = 8) -> list[Path]:
    """`count` good images per class: DICOMs and PNGs."""
    written = []
    for c, cls in enumerate(("normal", "pneumonia")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            seed = 100 * c + i
            if i % 2:
                written.append(write_png(root / cls / f"good{i}.png", image(seed)))
            else:
                written.append(write_dicom(root / cls / f"good{i}.dcm", image(seed)))
    return written


def write_folder_corpus(root: Path) -> list[Kind]:
    """Good images plus one file of each file-level kind; returns the kinds."""
    write_good(root)
    d = root / "pneumonia"
    kinds = []

    def add(name: str, relpath: str, outcome: str, message: str = "") -> None:
        kinds.append(Kind(name, relpath, outcome, message))

    full = write_dicom(d / "full.dcm", image(7)).read_bytes()
    (d / "truncated.dcm").write_bytes(full[: len(full) * 2 // 3])
    add("truncated DICOM", "pneumonia/truncated.dcm", "failed", "corrupt pixel data")
    write_dicom(d / "nopreamble.dcm", image(8), preamble=False)
    add("DICOM without a preamble (accepted: read with force)", "pneumonia/nopreamble.dcm", "ingested")
    write_dicom(d / "report_sr.dcm", None, sop_class=BASIC_TEXT_SR)
    add("DICOM with no Pixel Data (SR)", "pneumonia/report_sr.dcm", "failed", "no pixel data (Basic Text SR")
    write_dicom(d / "rtplan.dcm", None, sop_class=RT_PLAN)
    add("DICOM with no Pixel Data (RT Plan)", "pneumonia/rtplan.dcm", "failed", "no pixel data (RT Plan")
    write_dicom(d / "mpeg2.dcm", image(9), syntax=MPEG2)
    add("unsupported transfer syntax (MPEG2, no decoder)", "pneumonia/mpeg2.dcm", "failed",
        "unsupported transfer syntax MPEG2 Main Profile / Main Level")
    (d / "empty.dcm").write_bytes(b"")
    add("zero-byte file", "pneumonia/empty.dcm", "failed", "empty file (0 bytes)")
    (d / "noise.dcm").write_bytes(np.random.default_rng(1).bytes(4096))
    add("random bytes named .dcm", "pneumonia/noise.dcm", "failed", "not a DICOM file")
    (d / "noise.png").write_bytes(np.random.default_rng(2).bytes(4096))
    add("random bytes named .png", "pneumonia/noise.png", "failed", "not a readable image")
    png = write_png(d / "whole.png", image(10)).read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "whole.png").unlink()
    add("truncated PNG", "pneumonia/truncated.png", "failed", "not a readable image")
    (d / "full.dcm").unlink()
    rgb = np.stack([image(11)] * 3, axis=-1)
    write_dicom(d / "rgb.dcm", rgb, photometric="RGB")
    add("RGB DICOM (accepted: converted to grey)", "pneumonia/rgb.dcm", "ingested")
    write_dicom(d / "multiframe.dcm", image(12), frames=3)
    add("multi-frame DICOM (accepted: first frame)", "pneumonia/multiframe.dcm", "ingested")
    ramp = (image(13).astype(np.uint16) * 16)
    write_dicom(d / "rescaled16.dcm", ramp, BitsStored=12, RescaleSlope=2, RescaleIntercept=-1024)
    add("16-bit with rescale slope and intercept (accepted)", "pneumonia/rescaled16.dcm", "ingested")
    write_dicom(d / "huge.dcm", image(14, size=120))
    add("image above the pixel limit (--max-pixels 10000)", "pneumonia/huge.dcm", "failed", "image too large")
    write_dicom(d / "onepixel.dcm", np.array([[128]], dtype=np.uint8))
    add("1×1 image", "pneumonia/onepixel.dcm", "failed", "image too small (1×1 pixels)")
    uid = generate_uid()
    write_dicom(d / "dup_a.dcm", image(15), uid=uid)
    shutil.copy(d / "dup_a.dcm", d / "dup_b.dcm")
    add("duplicate SOPInstanceUID, same pixels (skipped)", "pneumonia/dup_b.dcm", "skipped",
        "same SOPInstanceUID and pixels")
    write_dicom(d / "dup_c.dcm", image(16), uid=uid)
    add("duplicate SOPInstanceUID, other pixels (first kept)", "pneumonia/dup_c.dcm", "failed",
        "SOPInstanceUID conflict")
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 byte that is not UTF-8
    write_png(d / name, image(17))
    add("non-UTF-8 file name (accepted)", f"pneumonia/{name}", "ingested")
    os.symlink("..", d / "loop")              # a symlinked folder back up: not followed
    os.symlink("self.png", d / "self.png")    # a file link to itself
    add("symlink loop (folder link not followed; self-link reported)", "pneumonia/self.png", "failed",
        "unreadable")
    return kinds


def corpus_files(root: Path) -> int:
    """How many files ingest sees: every image-named entry, links included, hidden and linked folders not."""
    count = 0
    for _, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        count += sum(1 for f in filenames if f.lower().endswith((".png", ".jpg", ".jpeg", ".dcm")))
    return count


def write_rsna_missing(root: Path, present: int = 6, missing: int = 3) -> list[str]:
    """An RSNA-layout dataset whose label CSV lists `missing` patients without an image file."""
    images = root / "stage_2_train_images"
    images.mkdir(parents=True)
    rows, absent = ["patientId,x,y,width,height,Target"], []
    for i in range(present + missing):
        pid = f"pat{i:03d}"
        rows.append(f"{pid},,,,,{i % 2}")
        if i < present:
            write_dicom(images / f"{pid}.dcm", image(200 + i), PatientID=pid)
        else:
            absent.append(pid)
    (root / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    return absent


def dicom_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
