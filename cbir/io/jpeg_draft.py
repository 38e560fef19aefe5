"""Reduced-resolution JPEG decoding: libjpeg's DCT scaling (Pillow's `Image.draft`) decodes an 8-bit grey JPEG
at 1/2, 1/4 or 1/8 of its size for a fraction of the full decode's cost.

The pixels differ from a full decode followed by a resize (the DCT scaling is its own low-pass filter), so a
model decodes this way only when its checkpoint says so (`ModelConfig.decode == "reduced"`), and then for every
image it sees: training, ingest and query. It applies to grey 8-bit JPEG files and to single-frame monochrome
JPEG Baseline (1.2.840.10008.1.2.4.50) DICOMs, whose pixel data is one plain JPEG stream; anything else (colour,
12-bit, other syntaxes, multi-frame, an image too small to reduce) is decoded in full as before.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from cbir.io.header import Geometry

#: DCT scale denominators libjpeg offers, largest first.
SCALES = (8, 4, 2)


def draft_scale(height: int, width: int, need: int) -> int:
    """The largest DCT denominator that leaves the longer side ≥ `need` pixels (1: no reduction)."""
    longer = max(height, width)
    return next((s for s in SCALES if -(-longer // s) >= need), 1)


def draft_grey(img: Image.Image, need: int) -> int:
    """Set an opened, not yet loaded 8-bit grey JPEG to decode at the largest scale that still leaves its longer
    side ≥ `need`; returns the denominator (1: left as is: not a grey JPEG, or too small to reduce)."""
    if img.format != "JPEG" or img.mode != "L":
        return 1
    scale = draft_scale(img.height, img.width, need)
    if scale > 1:
        img.draft("L", (img.width // scale, img.height // scale))
    return scale


def reducible_dicom(ds: Dataset, syntax: uid.UID, shape: Geometry) -> bool:
    """Whether a DICOM's first frame can be decoded reduced: single-frame, monochrome, 8-bit JPEG Baseline."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    return (syntax == uid.JPEGBaseline8Bit and shape.frames == 1 and shape.samples == 1
            and photometric in ("MONOCHROME1", "MONOCHROME2")
            and ds.get("BitsAllocated") == 8 and ds.get("BitsStored", 8) == 8)


def decode_dicom_reduced(ds: Dataset, shape: Geometry, need: int) -> np.ndarray | None:
    """The stored values (uint8) of a `reducible_dicom`'s frame at reduced resolution, or None when its JPEG
    stream is not an 8-bit grey image of the header's size or is too small to reduce (decode it in full)."""
    if draft_scale(shape.rows, shape.columns, need) == 1:
        return None
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    with Image.open(io.BytesIO(frame)) as img:
        if img.size != (shape.columns, shape.rows) or draft_grey(img, need) == 1:
            return None
        img.load()
        return np.asarray(img)
