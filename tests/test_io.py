"""Image IO on real files from ../shared and on DICOMs built here for the pixel paths real files lack."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cbir.errors import BadInputError
from cbir.io import ReaderPolicy, load_pseudonymizer, read_image
from cbir.io.phi import Pseudonymizer, age_band
from tests.badinputs import write_dicom
from tests.conftest import shared_path

RSNA_FILE = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def test_real_rsna_dicom_decodes_from_jpeg_baseline() -> None:
    path = shared_path("data", "real", "rsna", RSNA_FILE)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    image = read_image(path)
    assert image.shape == (1024, 1024)
    assert image.pixels.dtype == np.float32
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    assert image.meta.view == "PA" and image.meta.modality == "CR"


def test_monochrome1_variant_is_the_inverse() -> None:
    normal = read_image(shared_path("data", "real", "rsna", RSNA_FILE))
    inverted = read_image(shared_path("data", "real", "rsna", "monochrome1_variant.dcm"))
    raw_a = pydicom.dcmread(shared_path("data", "real", "rsna", RSNA_FILE)).pixel_array
    raw_b = pydicom.dcmread(shared_path("data", "real", "rsna", "monochrome1_variant.dcm")).pixel_array
    assert np.array_equal(raw_a, raw_b), "the two files store the same pixels"
    corr = np.corrcoef((1 - normal.pixels).ravel(), inverted.pixels.ravel())[0, 1]
    assert corr > 0.99
    assert normal.instance_key == inverted.instance_key  # same SOPInstanceUID → same dedup key


@pytest.mark.parametrize("name", ["nih/00000001_000.png", "nih/00027426_000.png", "padchest/16747_3_1.jpg",
                                  "tbx11k/h0001.png"])
def test_real_raster_images_read_as_grey(name: str) -> None:
    image = read_image(shared_path("data", "real", *name.split("/")))
    assert image.pixels.ndim == 2 and image.pixels.dtype == np.float32
    assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0
    assert image.colour < 0.01   # TBX11K and PadChest are RGB files with equal channels: still radiographs


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", preamble: bool = True,
                 **extra: object) -> Path:
    """An uncompressed DICOM with known fake PHI (the header values the tests below check)."""
    phi = {"PatientName": "DOE^JOHN", "PatientID": "MRN-12345", "PatientBirthDate": "19600101",
           "PatientSex": "F", "PatientAge": "047Y", "ViewPosition": "AP", "Modality": "DX"}
    return write_dicom(path, pixels, photometric=photometric, preamble=preamble, **{**phi, **extra})


def test_16bit_rescale_and_window(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))
    path = _write_dicom(tmp_path / "ct.dcm", ramp, BitsStored=12, RescaleSlope=2, RescaleIntercept=-1024,
                        WindowCenter=2048, WindowWidth=4096)
    image = read_image(path)
    assert image.pixels.shape == (64, 64)
    assert np.all(np.diff(image.pixels[0]) >= 0), "a monotonic ramp stays monotonic"
    assert image.pixels[0, 0] == 0.0 and image.pixels[0, -1] == 1.0


def test_rgb_dicom_becomes_grey(tmp_path: Path) -> None:
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[:, 16:] = 200
    image = read_image(_write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    assert image.pixels.shape == (32, 32)
    assert image.pixels[:, :16].max() == 0.0 and image.pixels[:, 16:].min() == 1.0


def test_dicom_without_preamble_is_read(tmp_path: Path) -> None:
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    path = _write_dicom(tmp_path / "raw.dcm", pixels, preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert read_image(path).shape == (64, 64)


def test_phi_never_leaves_the_reader(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "phi.dcm", np.ones((32, 32), dtype=np.uint16) * np.arange(32, dtype=np.uint16))
    pz = Pseudonymizer(b"k" * 32)
    image = read_image(path, pz)
    text = repr(image.meta) + repr(image.instance_key)
    for secret in ("DOE", "JOHN", "MRN-12345", "19600101"):
        assert secret not in text
    assert image.meta.pseudonym == pz("MRN-12345") and image.meta.pseudonym.startswith("p-")
    assert image.meta.age_band == "45-49" and image.meta.sex == "F" and image.meta.view == "AP"


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "empty file"),
    (os.urandom(2048), "not a DICOM file"),
])
def test_bad_dicom_files_raise_one_line(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.dcm"
    path.write_bytes(content)
    with pytest.raises(BadInputError) as info:
        read_image(path)
    assert str(path) in str(info.value) and reason in str(info.value) and "\n" not in str(info.value)


def test_dicom_without_pixels_is_refused(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "sr.dcm", np.zeros((8, 8), dtype=np.uint8))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(BadInputError, match="no pixel data"):
        read_image(path)


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    src = shared_path("data", "real", "nih", "00000001_000.png")
    path = tmp_path / "cut.png"
    path.write_bytes(src.read_bytes()[:500])
    with pytest.raises(BadInputError, match="cut.png"):
        read_image(path)


def test_pseudonym_key_file_is_private_and_stable(fresh_key: Path) -> None:
    first = load_pseudonymizer()
    assert stat.S_IMODE(fresh_key.stat().st_mode) == 0o600
    second = load_pseudonymizer()
    assert first("P1") == second("P1") != first("P2")
    assert first.fingerprint == second.fingerprint and len(first.fingerprint) == 16


def test_env_key_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from_file = load_pseudonymizer()
    monkeypatch.setenv("CBIR_PSEUDONYM_KEY", "a-shared-team-key-of-enough-length")
    assert load_pseudonymizer()("P1") != from_file("P1")


@pytest.mark.parametrize(("value", "band"), [("062Y", "60-64"), ("62", "60-64"), ("006M", "00-04"),
                                             ("095Y", "90+"), ("", None), ("abc", None)])
def test_age_bands(value: str, band: str | None) -> None:
    assert age_band(value) == band


def test_pixel_padding_is_masked_before_scaling(tmp_path: Path) -> None:
    """A padded frame (PixelPaddingValue 0) around a 1000–2000 image: without a window, the padding used to set the
    min-max scale's floor, so the image itself spanned only 0.5–1."""
    pixels = np.zeros((64, 64), dtype=np.uint16)
    pixels[8:56, 8:56] = np.tile(np.linspace(1000, 2000, 48).astype(np.uint16), (48, 1))
    for photometric, inside in (("MONOCHROME2", (0.0, 1.0)), ("MONOCHROME1", (1.0, 0.0))):
        image = read_image(_write_dicom(tmp_path / f"{photometric}.dcm", pixels, photometric, PixelPaddingValue=0))
        row = image.pixels[30, 8:56]
        assert (row[0], row[-1]) == inside, photometric                  # the image spans the whole range
        assert image.pixels[0, 0] == 0.0 and image.pixels[:8].max() == 0.0   # the padding is dark
    ranged = pixels.copy()
    ranged[:8] = 5                                                       # padding from 0 up to the range limit
    image = read_image(_write_dicom(tmp_path / "range.dcm", ranged, PixelPaddingValue=0, PixelPaddingRangeLimit=9))
    assert image.pixels[30, 8] == 0.0 and image.pixels[30, 55] == 1.0 and image.pixels[:8].max() == 0.0


@pytest.mark.parametrize("part", ["HAND", "PELVIS", "L SPINE", "KNEE"])
def test_a_radiograph_of_another_body_part_is_refused(tmp_path: Path, part: str) -> None:
    """BodyPartExamined was never checked: a CR hand was embedded as a chest film."""
    pixels = np.tile(np.arange(0, 64, dtype=np.uint16), (64, 1))
    path = _write_dicom(tmp_path / "x.dcm", pixels, Modality="CR", BodyPartExamined=part)
    with pytest.raises(BadInputError, match=f"not a chest radiograph \\(body part {part}; .*--any-modality"):
        read_image(path)
    for chest in ("CHEST", "THORAX", "TORAX", "PECHO", ""):              # and any other value, missing included
        assert read_image(_write_dicom(tmp_path / "c.dcm", pixels, Modality="CR", BodyPartExamined=chest))
    any_modality = ReaderPolicy(any_modality=True)                       # the same override as the modality's
    assert read_image(path, policy=any_modality).pixels.shape == (64, 64)


@pytest.mark.parametrize(("position", "view"), [("LAO", "OBL"), ("RPO", "OBL"), ("LL", "LL"), ("LATERAL", "LL"),
                                                ("PA", "PA"), ("AP", "AP"), ("XYZ", None)])
def test_an_oblique_view_is_not_a_lateral(tmp_path: Path, position: str, view: str | None) -> None:
    pixels = np.tile(np.arange(0, 64, dtype=np.uint16), (64, 1))
    assert read_image(_write_dicom(tmp_path / "v.dcm", pixels, ViewPosition=position)).meta.view == view


@pytest.mark.parametrize(("given", "shown"), [("../shared/data/rsna", "../shared/data/rsna"),
                                              ("/work/shared/data/kermany/train", "../shared/data/kermany/train"),
                                              ("runs/fold1", "runs/fold1"),
                                              ("/home/jdoe/MRN-12345/export", "…/export"),
                                              ("~/patients/doe", "…/doe")])
def test_written_files_name_folders_without_a_users_path(given: str, shown: str) -> None:
    from cbir.io.phi import shown_path
    assert shown_path(given) == shown


@pytest.mark.parametrize("item", [{"LUTDescriptor": [256, 0, 16], "ModalityLUTType": "US"},            # no data
                                  {"LUTDescriptor": [256, 0, 16], "LUTData": b"", "ModalityLUTType": "US"}])
def test_a_damaged_modality_lut_is_passed_over_for_the_rescale(tmp_path: Path, item: dict) -> None:
    """Before: `cannot apply the header's LUTs (KeyError: (0028,3006))` or `(TypeError: … 'NoneType' …)`, an
    internal error dressed as a reason. A Modality LUT without data is passed over, as a malformed window is."""
    from pydicom.dataset import Dataset
    lut = Dataset()
    for key, value in item.items():
        setattr(lut, key, value)
    ramp = np.tile(np.arange(0, 64, dtype=np.uint16), (64, 1))
    image = read_image(_write_dicom(tmp_path / "lut.dcm", ramp, ModalityLUTSequence=[lut], RescaleSlope=2))
    assert image.pixels[0, 0] == 0.0 and image.pixels[0, -1] == 1.0 and np.all(np.diff(image.pixels[0]) > 0)
