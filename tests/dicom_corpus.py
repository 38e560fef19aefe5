"""A corpus of real-world DICOMs for tests/test_dicom_corpus.py: pydicom's own test files (those its wheel ships),
files written here in each transfer syntax through real encoders (pydicom's RLE, GDCM's RLE, OpenJPEG through
pylibjpeg, libjpeg-turbo and CharLS through imagecodecs), colour and palette files, a float parametric map, and
malformed headers. `reference_pixels` is what pydicom itself makes of a file (pixel_array, modality and VOI LUT,
colour), written independently of cbir's reader.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import UID, generate_uid

CR = "1.2.840.10008.5.1.4.1.1.1"                 # Computed Radiography Image Storage
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
#: The test files that pydicom's wheel itself ships (get_testdata_files() would download others: never here).
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
RADIOGRAPHS = {"", "CR", "DX", "DR", "RG", "OT", "SC"}
LOSSY = {pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEGExtended12Bit, pydicom.uid.JPEG2000,
         pydicom.uid.JPEGLSNearLossless}


@dataclass(frozen=True)
class Entry:
    relpath: str
    kind: str             # what the file is, for the counts
    expect: str           # "decoded", or a fragment of the one line that refuses it
    any_modality: str = ""  # with --any-modality: "decoded" or a fragment ("" = same as `expect`)


# -- the reference ----------------------------------------------------------------------------------------


def reference_pixels(path: Path) -> np.ndarray:
    """pydicom's own reading of the first frame, grey in [0, 1]: pixel_array (which gives RGB for YBR and
    ICT/RCT), the palette, or the modality LUT, VOI LUT (first window) and MONOCHROME1 inversion."""
    ds = pydicom.dcmread(path, force=True)
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    kind = str(ds.get("PhotometricInterpretation", "")).strip()
    weights = np.array([0.299, 0.587, 0.114])
    if kind == "PALETTE COLOR":
        grey = apply_color_lut(arr, ds)[..., :3].astype(np.float64) @ weights
    elif arr.ndim == 3:
        grey = arr[..., :3].astype(np.float64) @ weights      # pixel_array is RGB here
    else:
        grey = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            grey = np.asarray(apply_voi_lut(grey, ds, index=0), dtype=np.float64)
        if kind == "MONOCHROME1":
            grey = grey.max() + grey.min() - grey
    low, high = float(grey.min()), float(grey.max())
    return ((grey - low) / (high - low)) if high > low else np.zeros_like(grey)


def tolerance(path: Path) -> float:
    """Lossy codecs may differ by a grey level between decoders; lossless ones not at all."""
    syntax = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.get("TransferSyntaxUID")
    return 2.5e-2 if syntax in LOSSY else 1e-5


# -- writing -----------------------------------------------------------------------------------------------


def image(size: int = 64, seed: int = 0, bits: int = 12) -> np.ndarray:
    """A smooth uint16 test image with `bits` stored bits."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.5 + 0.35 * np.sin(7 * x + rng.uniform(0, 6)) * np.cos(5 * y + rng.uniform(0, 6))
    return np.clip(img * (2**bits - 1), 0, 2**bits - 1).astype(np.uint16)


def colour(size: int = 64) -> np.ndarray:
    """uint8 RGB where red and luminance differ: red rises left to right, green top to bottom."""
    y, x = np.mgrid[0:size, 0:size] * (255 // (size - 1))
    return np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)


def dataset(pixels: np.ndarray | None, *, modality: str = "CR", sop_class: str = CR,
            syntax: str = pydicom.uid.ExplicitVRLittleEndian, photometric: str = "MONOCHROME2",
            bits_stored: int | None = None, **extra: object) -> Dataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientSex, ds.PatientAge, ds.ViewPosition, ds.Modality = "C-1", "M", "061Y", "PA", modality
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.PixelData = pixels.tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax.is_implicit_VR,
               little_endian=syntax.is_little_endian)
    return path


def encapsulated(ds: Dataset, syntax: str, frames: list[bytes]) -> Dataset:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def deep_sequence(path: Path, depth: int = 5000) -> Path:
    """A CR whose (0040,A730) Content Sequence nests `depth` levels deep, then a valid Pixel Data element."""
    ds = dataset(image(), syntax=pydicom.uid.ImplicitVRLittleEndian, bits_stored=12)
    pixel_bytes = ds.PixelData
    del ds.PixelData
    save(ds, path)
    open_level = struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close_level = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    pixel = struct.pack("<HHI", 0x7FE0, 0x0010, len(pixel_bytes)) + pixel_bytes
    with open(path, "ab") as fh:
        fh.write(open_level * depth + close_level * depth + pixel)
    return path


def write_written(root: Path) -> list[Entry]:
    """Files made here: every syntax through a real encoder, colour, palettes, floats and malformed headers."""
    import imagecodecs

    d = root / "written"
    entries: list[Entry] = []

    def add(name: str, kind: str, expect: str = "decoded", any_modality: str = "") -> None:
        entries.append(Entry(f"written/{name}", kind, expect, any_modality))

    base = image()
    save(dataset(base, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=2000,
                 WindowWidth=3000), d / "native_window.dcm")
    add("native_window.dcm", "uncompressed, rescale + window")
    save(dataset(base, bits_stored=12, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096),
         d / "monochrome1.dcm")
    add("monochrome1.dcm", "uncompressed MONOCHROME1")
    save(dataset(base, syntax=pydicom.uid.ExplicitVRBigEndian, bits_stored=12), d / "big_endian.dcm")
    add("big_endian.dcm", "Explicit VR Big Endian")
    save(dataset(base, syntax=pydicom.uid.DeflatedExplicitVRLittleEndian, bits_stored=12), d / "deflated.dcm")
    add("deflated.dcm", "Deflated Explicit VR Little Endian")
    for plugin in ("pydicom", "gdcm"):
        ds = dataset(base, bits_stored=12)
        ds.compress(pydicom.uid.RLELossless, encoding_plugin=plugin)
        save(ds, d / f"rle_{plugin}.dcm")
        add(f"rle_{plugin}.dcm", f"RLE Lossless (encoded by {plugin})")
    ds = dataset(base, bits_stored=12)
    ds.compress(pydicom.uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
    save(ds, d / "j2k_lossless.dcm")
    add("j2k_lossless.dcm", "JPEG 2000 Lossless (OpenJPEG)")
    ds = dataset(base, bits_stored=12)
    ds.compress(pydicom.uid.JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[10])
    save(ds, d / "j2k_lossy.dcm")
    add("j2k_lossy.dcm", "JPEG 2000 lossy (OpenJPEG)")
    eight = (base >> 4).astype(np.uint8)
    save(encapsulated(dataset(eight), pydicom.uid.JPEGBaseline8Bit, [imagecodecs.jpeg8_encode(eight, level=95)]),
         d / "jpeg_baseline.dcm")
    add("jpeg_baseline.dcm", "JPEG Baseline 8-bit (libjpeg-turbo)")
    stream = imagecodecs.jpeg8_encode((image(256) >> 4).astype(np.uint8), level=90)
    middle = len(stream) // 2                                # libjpeg (in GDCM) prints about both on fd 2
    for name, junk, expect in (("jpeg_restart_markers.dcm", b"\xff\xd0" * 20, "corrupt pixel data"),
                               ("jpeg_garbled.dcm", bytes(range(40)), "decoded")):
        broken = stream[:middle] + junk + stream[middle + 40:]
        save(encapsulated(dataset(np.zeros((256, 256), np.uint8)), pydicom.uid.JPEGBaseline8Bit, [broken]), d / name)
        add(name, "JPEG Baseline, damaged scan (the decoder complains)", expect)
    save(encapsulated(dataset(base, bits_stored=12), pydicom.uid.JPEGExtended12Bit,
                      [imagecodecs.jpeg8_encode(base, level=95, bitspersample=12)]), d / "jpeg_extended12.dcm")
    add("jpeg_extended12.dcm", "JPEG Extended 12-bit (libjpeg-turbo)")
    save(encapsulated(dataset(base, bits_stored=12), pydicom.uid.JPEGLosslessSV1,
                      [imagecodecs.jpeg8_encode(base, lossless=True, predictor=1, bitspersample=12)]),
         d / "jpeg_lossless.dcm")
    add("jpeg_lossless.dcm", "JPEG Lossless SV1 (libjpeg-turbo)")
    save(encapsulated(dataset(base, bits_stored=12), pydicom.uid.JPEGLSLossless, [imagecodecs.jpegls_encode(base)]),
         d / "jpegls_lossless.dcm")
    add("jpegls_lossless.dcm", "JPEG-LS Lossless (CharLS)")
    frames = np.stack([image(seed=i) for i in range(12)])
    save(dataset(frames[0], bits_stored=12, NumberOfFrames=12, PixelData=frames.tobytes()), d / "multiframe.dcm")
    add("multiframe.dcm", "uncompressed, 12 frames")
    ds = dataset(frames[0], bits_stored=12, NumberOfFrames=12)
    ds.compress(pydicom.uid.RLELossless, frames, encoding_plugin="pydicom")
    save(ds, d / "multiframe_rle.dcm")
    add("multiframe_rle.dcm", "RLE, 12 frames")
    rgb = colour()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    save(dataset(ybr, modality="OT", sop_class=SECONDARY_CAPTURE, photometric="YBR_FULL"), d / "ybr_full.dcm")
    add("ybr_full.dcm", "YBR_FULL colour (uncompressed)")
    save(dataset(rgb, modality="OT", sop_class=SECONDARY_CAPTURE, photometric="RGB"), d / "rgb.dcm")
    add("rgb.dcm", "RGB colour (uncompressed)")
    ds = dataset(rgb, modality="OT", sop_class=SECONDARY_CAPTURE, photometric="RGB")
    ds.compress(pydicom.uid.RLELossless, encoding_plugin="pydicom")
    save(ds, d / "rgb_rle.dcm")
    add("rgb_rle.dcm", "RGB colour, RLE")
    palette = pydicom.dcmread(TEST_FILES / "examples_palette.dcm")
    palette.Modality = "OT"
    palette.SOPInstanceUID = palette.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    palette.save_as(d / "palette_ot.dcm")
    add("palette_ot.dcm", "PALETTE COLOR (secondary capture)")
    floats = (image().astype(np.float32) / 4095.0 - 0.25) * 3.0
    ds = dataset(None, modality="MR", sop_class=PARAMETRIC_MAP)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *floats.shape, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.NumberOfFrames = 32, 1
    ds.FloatPixelData = floats.tobytes()
    save(ds, d / "parametric_map.dcm")
    add("parametric_map.dcm", "float parametric map (MR)", "not a radiograph (modality MR", "decoded")

    save(dataset(base + 2000, bits_stored=13, WindowCenter=500, WindowWidth=200), d / "blank_window.dcm")
    add("blank_window.dcm", "blank: window wholly below the stored values", "blank image")
    save(dataset(np.zeros((64, 64), np.uint16), bits_stored=12), d / "blank_zero.dcm")
    add("blank_zero.dcm", "blank: all-zero pixels", "blank image")
    huge = dataset(np.zeros((4, 4), np.uint8))
    huge.Rows = huge.Columns = 20_000
    save(huge, d / "huge_header.dcm")
    add("huge_header.dcm", "20,000 × 20,000 header", "image too large (20000×20000 pixels")
    rows = dataset(base, bits_stored=12)
    rows.Rows = [32768, 0]
    save(rows, d / "multi_rows.dcm")
    add("multi_rows.dcm", "multi-valued Rows", "malformed header: Rows has 2 values [32768, 0]")
    frames_1a = dataset(base, bits_stored=12)
    frames_1a.NumberOfFrames = "99"                       # pydicom will not set '1A': patch the bytes
    raw = save(frames_1a, d / "frames_1a.dcm").read_bytes()
    element = struct.pack("<HH", 0x0028, 0x0008) + b"IS" + struct.pack("<H", 2)
    assert raw.count(element + b"99") == 1
    (d / "frames_1a.dcm").write_bytes(raw.replace(element + b"99", element + b"1A"))
    add("frames_1a.dcm", "NumberOfFrames '1A'", "malformed header: NumberOfFrames is '1A'")
    unknown = dataset(base, bits_stored=12)
    unknown.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.10.999.1"
    unknown.save_as(d / "unknown_syntax.dcm", enforce_file_format=True, implicit_vr=False, little_endian=True)
    add("unknown_syntax.dcm", "unknown transfer syntax UID", "unknown transfer syntax 1.2.826.0.1.3680043.10.999.1")
    deep_sequence(d / "deep_sequence.dcm")
    add("deep_sequence.dcm", "sequence nested 5,000 deep", "RecursionError")
    return entries


def write_pydicom_files(root: Path) -> list[Entry]:
    """Every *.dcm that pydicom's wheel ships in its test-file folder (nothing downloaded); a SOPInstanceUID
    seen before is replaced, so that ingest does not take variants of one image for duplicates. Expectations
    follow from pydicom's own reading: what pydicom cannot decode must be refused, a non-radiograph modality
    is refused, a constant image is blank; everything else must decode as pydicom does."""
    d = root / "pydicom"
    d.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    entries = []
    sources = sorted(TEST_FILES.glob("*.dcm"))
    for src in sources:
        dst = d / src.name
        shutil.copyfile(src, dst)
        try:
            ds = pydicom.dcmread(dst, force=True)
            uid = str(ds.get("SOPInstanceUID", "") or "")
            if uid and uid in seen:
                ds.SOPInstanceUID = generate_uid()
                if "MediaStorageSOPInstanceUID" in ds.file_meta:
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(dst)
            seen.add(str(ds.get("SOPInstanceUID", "") or ""))
        except Exception:  # noqa: BLE001 - an unreadable file is copied as it is
            pass
        entries.append(pydicom_entry(dst))
    return entries


def pydicom_entry(path: Path) -> Entry:
    kind = f"pydicom {path.name}"
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        modality = str(header.get("Modality", "") or "").strip().upper()
    except Exception:  # noqa: BLE001
        return Entry(f"pydicom/{path.name}", kind, "refused")
    try:
        reference = reference_pixels(path)
    except Exception:  # noqa: BLE001 - pydicom cannot decode it: cbir must refuse it in one line
        return Entry(f"pydicom/{path.name}", kind, "refused")
    decoded = "blank image" if np.ptp(reference) == 0 else "decoded"
    if modality not in RADIOGRAPHS:
        return Entry(f"pydicom/{path.name}", kind, f"not a radiograph (modality {modality}", decoded)
    return Entry(f"pydicom/{path.name}", kind, decoded)


def write_corpus(root: Path) -> list[Entry]:
    """The whole corpus under `root` (a folder layout: the class folders `written` and `pydicom`)."""
    return write_written(root) + write_pydicom_files(root)
