"""Re-encodings of a query that a real archive brings: what `cbir evaluate --robustness` feeds back in.

Each re-encoding takes the decoded grey image (float32 in [0, 1]) and writes a new file that the normal
reader must open again, so that the check covers decoding as well as the embedding:

- `jpeg60`: 8-bit JPEG at quality 60, the longer side reduced to 400 px (or 3/4 of it when smaller);
- `crop-dicom12`: 3 % cropped from every side, written as a 12-bit MONOCHROME1 DX DICOM;
- `blur-gamma`: Gaussian blur (σ = 1 % of the longer side) and gamma 0.8, as a 16-bit PNG;
- `rotate5`: a 5° rotation about the centre, black corners, as a 16-bit PNG.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

REENCODINGS: dict[str, Callable[[np.ndarray, Path], Path]] = {}


def reencoding(name: str) -> Callable[[Callable[[np.ndarray, Path], Path]], Callable[[np.ndarray, Path], Path]]:
    def register(fn: Callable[[np.ndarray, Path], Path]) -> Callable[[np.ndarray, Path], Path]:
        REENCODINGS[name] = fn
        return fn
    return register


def _uint(pixels: np.ndarray, top: int) -> np.ndarray:
    return np.round(np.clip(pixels, 0.0, 1.0) * top).astype(np.uint16 if top > 255 else np.uint8)


def _png16(pixels: np.ndarray, stem: Path) -> Path:
    path = Path(f"{stem}.png")
    Image.fromarray(_uint(pixels, 65535)).save(path)
    return path


@reencoding("jpeg60")
def jpeg60(pixels: np.ndarray, stem: Path) -> Path:
    """8-bit JPEG q60, longer side 400 px (3/4 of it when smaller)"""
    height, width = pixels.shape
    longer = max(height, width)
    target = 400 if longer > 400 / 0.75 else round(0.75 * longer)
    scale = target / longer
    image = Image.fromarray(_uint(pixels, 255)).resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    path = Path(f"{stem}.jpg")
    image.save(path, format="JPEG", quality=60)
    return path


@reencoding("crop-dicom12")
def crop_dicom12(pixels: np.ndarray, stem: Path) -> Path:
    """3 % cropped per side, 12-bit MONOCHROME1 DX DICOM"""
    height, width = pixels.shape
    dy, dx = round(0.03 * height), round(0.03 * width)
    cropped = pixels[dy:height - dy, dx:width - dx]
    stored = (4095 - _uint(cropped, 4095).astype(np.int32)).astype(np.uint16)   # MONOCHROME1: white is 0
    path = Path(f"{stem}.dcm")
    write_monochrome1(stored, path)
    return path


@reencoding("blur-gamma")
def blur_gamma(pixels: np.ndarray, stem: Path) -> Path:
    """Gaussian blur σ = 1 % of the longer side, then gamma 0.8, 16-bit PNG"""
    import torch

    from cbir.data.transforms import gaussian_blur
    blurred = gaussian_blur(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None],
                            0.01 * max(pixels.shape))[0].numpy()
    return _png16(np.clip(blurred, 0.0, 1.0) ** 0.8, stem)


@reencoding("rotate5")
def rotate5(pixels: np.ndarray, stem: Path) -> Path:
    """5° rotation about the centre, black corners, 16-bit PNG"""
    rotated = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F").rotate(
        5.0, resample=Image.Resampling.BILINEAR, fillcolor=0.0)
    return _png16(np.asarray(rotated, dtype=np.float32), stem)


def write_monochrome1(stored: np.ndarray, path: Path) -> None:
    """An uncompressed 12-bit MONOCHROME1 DX image with no patient data at all."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, sop
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def reencode_all(pixels: np.ndarray, folder: Path, stem: str, names: list[str] | None = None) -> dict[str, Path]:
    """Every (or the named) re-encoding of one image, written under `folder` as `<stem>.<name>.<ext>`."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: REENCODINGS[name](pixels, folder / f"{stem}.{name}") for name in (names or list(REENCODINGS))}
