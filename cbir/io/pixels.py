"""Pure pixel steps in pydicom's style: each is `(arr, ds) -> arr`."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut


def first_frame(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Multi-frame images keep their first frame."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1 and arr.ndim == (4 if samples > 1 else 3):
        return arr[0]
    return arr


def to_grey(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Colour (RGB or YBR) to luminance; grey images pass through."""
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        photometric = str(ds.get("PhotometricInterpretation", "RGB"))
        if photometric.startswith("YBR"):
            return arr[..., 0].astype(np.float32)
        rgb = arr[..., :3].astype(np.float32)
        return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return arr


def modality_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Rescale slope/intercept or a Modality LUT (grey images only)."""
    if arr.ndim != 2 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return arr.astype(np.float32)
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)


def voi_window(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """VOI LUT or the first window; without either, the image is left as is."""
    if arr.ndim != 2 or not ("VOILUTSequence" in ds or "WindowCenter" in ds):
        return arr
    try:
        return np.asarray(apply_voi_lut(arr, ds, index=0), dtype=np.float32)
    except (ValueError, IndexError, TypeError, KeyError):
        return arr  # a malformed window is ignored; min-max scaling still applies


def invert_monochrome1(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """MONOCHROME1 stores bright as low values: flip it so that bone is bright."""
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        return arr.max() + arr.min() - arr
    return arr


def scale_unit(arr: np.ndarray, ds: Dataset | None = None) -> np.ndarray:
    """Min-max scale to float32 [0, 1] (a constant image becomes all zeros)."""
    arr = np.asarray(arr, dtype=np.float32)
    low, high = float(np.min(arr)), float(np.max(arr))
    if not np.isfinite(low) or not np.isfinite(high):
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(arr.min()), float(arr.max())
    if high <= low:
        return np.zeros_like(arr, dtype=np.float32)
    return (arr - low) / (high - low)


PIPELINE = (first_frame, to_grey, modality_lut, voi_window, invert_monochrome1, scale_unit)


def process(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored pixels → display-ready grey float32 in [0, 1]."""
    for step in PIPELINE:
        arr = step(arr, ds)
    return arr
