"""PNG and JPEG reading through Pillow, as grey float32 in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cbir.errors import BadInputError
from cbir.io.header import MAX_PIXELS
from cbir.io.jpeg_draft import draft_grey
from cbir.io.pixels import BlankImage, refuse_blank, scale_unit


def read_raster(path: str | Path, limit: int | None = None, reduce_to: int | None = None
                ) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Any Pillow-readable image → grey (16-bit PNGs keep their range before scaling), the file's colourfulness
    (the mean over pixels of max − min of R, G, B, in [0, 1]; 0 for a grey file, and for the many radiographs
    stored as RGB with equal channels) and its (height, width). With `reduce_to`, a grey 8-bit JPEG is decoded at
    the smallest DCT scale whose longer side is still ≥ `reduce_to` (`cbir.io.jpeg_draft`)."""
    limit = MAX_PIXELS if limit is None else limit
    try:
        with Image.open(path) as img:
            if img.width * img.height > limit:
                raise BadInputError(path, f"image too large ({img.width}×{img.height} pixels, limit {limit}; "
                                          "see --max-pixels)")
            if img.width < 2 or img.height < 2:
                raise BadInputError(path, f"image too small ({img.width}×{img.height} pixels)")
            shape = img.height, img.width
            if reduce_to:
                draft_grey(img, reduce_to)
            img.load()
            arr = _grey_array(img)
            colour = _colourfulness(img)
    except BadInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip(" :")[:120]
        raise BadInputError(path, f"not a readable image ({type(exc).__name__}{': ' + detail if detail else ''})"
                            ) from None
    try:
        return scale_unit(refuse_blank(arr)), colour, shape
    except BlankImage as exc:
        raise BadInputError(path, f"blank image ({exc})") from None


def _grey_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.asarray(img, dtype=np.float32)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32)


def _colourfulness(img: Image.Image) -> float:
    if img.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV", "PA"):
        return 0.0
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    return float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean() / 255.0)
