"""Pictures for people: the grey window of montages and the viewer, and the small thumbnails stored with points.

A thumbnail (`cbir ingest --thumbnails`) is made from the decoded grey pixels that the model sees too, never
from the file's headers: windowed to its 1st–99th percentile, resized so that its longer side is
`THUMBNAIL_SIZE` pixels, and encoded as WebP (quality `THUMBNAIL_QUALITY`; grey: WebP has no grey mode, and
its flat colour planes cost next to nothing) without any metadata, then
stored base64 in the payload field `thumbnail`. Measured on the real films in ../shared: 2.7–4.1 KB at 192 px
(JPEG at quality 80 is 1.6–2.1× as large; docs/performance.md). Text burned into the pixels stays.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

THUMBNAIL_SIZE = 192
THUMBNAIL_QUALITY = 75
THUMBNAIL_CODEC = "webp"


def window(pixels: np.ndarray) -> tuple[float, float]:
    """The 1st and 99th percentiles, from at most ~65k evenly spread pixels (a full sort of a 1024² image costs
    tens of milliseconds per picture)."""
    step = max(1, int(np.sqrt(pixels.size / 65536)))
    low, high = np.percentile(pixels[::step, ::step], [1, 99])
    return float(low), float(high)


def windowed(pixels: np.ndarray) -> np.ndarray:
    """The pixels stretched so that `window` spans [0, 1] (float32, clipped)."""
    low, high = window(pixels)
    return np.clip((pixels - low) / max(high - low, 1e-6), 0, 1).astype(np.float32)


def thumbnail_spec() -> dict[str, int | str]:
    """What a collection records about its thumbnails (metadata key `thumbnails`)."""
    return {"codec": THUMBNAIL_CODEC, "size": THUMBNAIL_SIZE, "quality": THUMBNAIL_QUALITY}


def make_thumbnail(pixels: np.ndarray) -> bytes:
    """WebP bytes of the windowed image, longer side `THUMBNAIL_SIZE`, grey, no metadata."""
    height, width = pixels.shape
    scale = THUMBNAIL_SIZE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey = Image.fromarray((windowed(pixels) * 255 + 0.5).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    grey.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0).save(
        buffer, format="WEBP", quality=THUMBNAIL_QUALITY, method=4)
    return buffer.getvalue()


def encode_thumbnail(pixels: np.ndarray) -> str:
    """`make_thumbnail` as the base64 text stored in a payload."""
    return base64.b64encode(make_thumbnail(pixels)).decode("ascii")


def thumbnail_bytes(text: str) -> bytes:
    """The image bytes of a payload's `thumbnail`; ValueError if it is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError) as exc:
        raise ValueError(f"stored thumbnail is not base64 ({exc})") from None


def thumbnail_pixels(text: str) -> np.ndarray:
    """A payload's `thumbnail` as grey float32 pixels in [0, 1]; ValueError if it does not decode."""
    try:
        with Image.open(io.BytesIO(thumbnail_bytes(text))) as picture:
            return np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"stored thumbnail does not decode ({exc})") from None
