"""One entry point for every supported image file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir.errors import BadInputError
from cbir.io.dicom import describe, looks_like_raw_dicom, read_dicom
from cbir.io.header import DEFAULT_READER, ReaderPolicy
from cbir.io.phi import Pseudonymizer, SafeMeta
from cbir.io.raster import read_raster

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class XrayImage:
    pixels: np.ndarray            # float32 (H, W) in [0, 1]
    meta: SafeMeta
    instance_key: str | None      # one-way key of the SOPInstanceUID (DICOM only)
    kind: str                     # "dicom" or "raster"
    #: Mean chroma of a colour file (`cbir.io.raster.read_raster`); 0 for grey pixels and for DICOM.
    colour: float = 0.0
    #: (height, width) of the stored image when `pixels` were decoded at reduced resolution
    #: (`cbir.io.jpeg_draft`); None when `pixels` have the stored size.
    full_shape: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in the stored image's pixels (boxes and regions are given in these)."""
        if self.full_shape is not None:
            return self.full_shape
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


def is_dicom_file(path: str | Path) -> bool:
    """Whether a file without an image extension is a DICOM file, as `sniff` tells it: the DICM marker, or (no
    extension, or .dicom) a valid leading element. An unreadable file is not."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return _dicom_head(head, Path(path).suffix.lower())


def _dicom_head(head: bytes, suffix: str) -> bool:
    """The first 132 bytes say DICOM: the DICM marker, or (no extension, .dcm or .dicom) a valid leading element."""
    return head[128:132] == b"DICM" or (suffix in (".dcm", ".dicom", "") and looks_like_raw_dicom(head))


def sniff(path: str | Path) -> str:
    """'dicom', 'raster', or a BadInputError for files that are neither."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except IsADirectoryError:
        raise BadInputError(path, "is a directory, not an image") from None
    except FileNotFoundError:
        raise BadInputError(path, "no such file") from None
    except OSError as exc:
        raise BadInputError(path, f"unreadable ({exc.strerror or exc})") from None
    if not head:
        raise BadInputError(path, "empty file (0 bytes)")
    suffix = path.suffix.lower()
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(PNG_MAGIC) or head.startswith(JPEG_MAGIC):
        return "raster"
    if _dicom_head(head, suffix):
        return "dicom"
    if suffix in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        return "raster"
    if suffix in (".dcm", ".dicom"):
        raise BadInputError(path, "not a DICOM file (no DICM marker and no valid leading element)")
    raise BadInputError(path, "not an image (expected DICOM, PNG or JPEG)")


def read_image(path: str | Path, pseudonymize: Pseudonymizer | None = None, reduce_to: int | None = None,
               policy: ReaderPolicy = DEFAULT_READER) -> XrayImage:
    """Read a DICOM, PNG or JPEG chest X-ray as grey float32 [0, 1] with safe metadata, as `policy` allows (the
    pixel limit; DICOM: the modality check). `reduce_to` (a model's
    input size, `cbir.models.decode_size`): decode grey 8-bit JPEG pixels at reduced resolution, never below
    that size (`cbir.io.jpeg_draft`; this changes the pixels)."""
    kind = sniff(path)
    try:
        if kind == "dicom":
            pixels, meta, key, shape = read_dicom(path, pseudonymize, policy, reduce_to)
            return XrayImage(pixels, meta, key, kind, full_shape=_if_reduced(pixels, shape))
        pixels, colour, shape = read_raster(path, policy.max_pixels, reduce_to)
        return XrayImage(pixels, SafeMeta(), None, kind, colour, _if_reduced(pixels, shape))
    except BadInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a third-party reader raises, one file is one line
        raise BadInputError(path, f"unreadable ({describe(exc)})") from None


def _if_reduced(pixels: np.ndarray, shape: tuple[int, int]) -> tuple[int, int] | None:
    return shape if tuple(pixels.shape) != tuple(shape) else None
