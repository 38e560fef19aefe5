"""Pure pixel steps in pydicom's style: each is `(arr, ds) -> arr`.

`ds.PhotometricInterpretation` must describe the decoded array (pydicom turns YBR into RGB while decoding;
`cbir.io.dicom` records that), not what the file stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)   # ITU-R BT.601, as JPEG's Y


class BlankImage(ValueError):
    """The image is one value everywhere once windowed: nothing to embed."""

    def __init__(self, value: float) -> None:
        self.value = value
        super().__init__(f"every pixel is {value:g}")


def photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper()


def is_monochrome(ds: Dataset) -> bool:
    return photometric(ds) in ("", "MONOCHROME1", "MONOCHROME2")


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Y of (…, 3) RGB samples."""
    return rgb[..., :3].astype(np.float32) @ LUMINANCE


def to_grey(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Colour to luminance by the decoded state: RGB → Y; still YCbCr → its Y plane; PALETTE COLOR → the
    palette's colours, then Y. Grey images pass through."""
    kind = photometric(ds)
    if kind == "PALETTE COLOR" and arr.ndim == 2:
        return luminance(apply_color_lut(arr, ds))
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if kind.startswith("YBR"):
            return arr[..., 0].astype(np.float32)
        return luminance(arr)
    return arr


def mask_padding(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Pixels at PixelPaddingValue (up to PixelPaddingRangeLimit, when given) lie outside the image: they take the
    darkest stored value of the image itself (the lowest, or for MONOCHROME1 the highest), so that they neither
    stretch the min-max scaling nor show as a bright frame (monochrome only)."""
    if arr.ndim != 2 or not is_monochrome(ds) or "PixelPaddingValue" not in ds:
        return arr
    try:
        first = int(ds.PixelPaddingValue)
        last = int(ds.get("PixelPaddingRangeLimit", first))
    except (TypeError, ValueError):
        return arr   # a malformed value is ignored, as a malformed window is
    low, high = min(first, last), max(first, last)
    padded = (arr >= low) & (arr <= high)
    if not padded.any() or padded.all():
        return arr
    kept = arr[~padded]
    out = arr.copy()
    out[padded] = kept.max() if photometric(ds) == "MONOCHROME1" else kept.min()
    return out


def modality_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Rescale slope/intercept or a Modality LUT (monochrome images only). A Modality LUT without a usable
    descriptor or data (a damaged header) is passed over for the rescale values, as a malformed window is:
    the min-max scaling that follows makes the image whole either way."""
    if arr.ndim != 2 or not is_monochrome(ds):
        return arr.astype(np.float32)
    if "ModalityLUTSequence" in ds and not _usable_lut(ds.ModalityLUTSequence):
        return _rescaled(arr, ds)
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)


def _usable_lut(sequence: Any) -> bool:
    """Whether a LUT sequence's first item has a three-value LUTDescriptor and LUTData."""
    try:
        item = sequence[0]
        descriptor = item.get("LUTDescriptor")
        data = item.get("LUTData")
        return descriptor is not None and len(descriptor) == 3 and data is not None and len(data) > 0
    except (IndexError, TypeError, AttributeError, KeyError, ValueError):
        return False


def _rescaled(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """RescaleSlope and RescaleIntercept (1 and 0 where missing or malformed)."""
    def number(keyword: str, default: float) -> float:
        try:
            value = float(ds.get(keyword, default))
        except (TypeError, ValueError):
            return default
        return value if np.isfinite(value) else default
    return arr.astype(np.float32) * number("RescaleSlope", 1.0) + number("RescaleIntercept", 0.0)


def voi_window(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """VOI LUT or the first window (monochrome only); without either, the image is left as is."""
    if arr.ndim != 2 or not is_monochrome(ds) or not ("VOILUTSequence" in ds or "WindowCenter" in ds):
        return arr
    try:
        return np.asarray(apply_voi_lut(arr, ds, index=0), dtype=np.float32)
    except (ValueError, IndexError, TypeError, KeyError):
        return arr  # a malformed window is ignored; min-max scaling still applies


def invert_monochrome1(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """MONOCHROME1 stores bright as low values: flip it so that bone is bright."""
    if photometric(ds) == "MONOCHROME1":
        return arr.max() + arr.min() - arr
    return arr


def refuse_blank(arr: np.ndarray, ds: Dataset | None = None) -> np.ndarray:
    """A constant image (all zeros, or a window wholly above or below the stored values) is refused."""
    finite = np.asarray(arr)[np.isfinite(arr)]
    if finite.size == 0:
        raise BlankImage(float("nan"))
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        raise BlankImage(low)
    return arr


def scale_unit(arr: np.ndarray, ds: Dataset | None = None) -> np.ndarray:
    """Min-max scale to float32 [0, 1] (non-finite values become the minimum)."""
    arr = np.asarray(arr, dtype=np.float32)
    low, high = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not np.isfinite(low) or not np.isfinite(high):
        finite = arr[np.isfinite(arr)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        arr = np.nan_to_num(arr, nan=low, posinf=high, neginf=low)
    if high <= low:
        return np.zeros_like(arr, dtype=np.float32)
    return (arr - low) / (high - low)


PIPELINE = (to_grey, mask_padding, modality_lut, voi_window, invert_monochrome1, refuse_blank, scale_unit)


def process(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Decoded first frame → display-ready grey float32 in [0, 1]; BlankImage for a constant image."""
    for step in PIPELINE:
        arr = step(arr, ds)
    return arr
