"""DICOM reading: decode with a pinned plugin, process pixels, keep only safe metadata."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

from cbir.errors import BadInputError
from cbir.io.phi import Pseudonymizer, SafeMeta, age_band, sex_of, view_of
from cbir.io.pixels import process

#: Compressed transfer syntaxes are decoded by GDCM only, so pixels do not depend on which optional
#: plugins (Pillow, pylibjpeg) happen to be installed. Uncompressed data needs no plugin.
DECODING_PLUGIN = "gdcm"

#: Images with more pixels than this (per frame) are refused before decoding ($CBIR_MAX_PIXELS overrides it).
MAX_PIXELS = 80_000_000


def max_pixels() -> int:
    """The pixel limit: $CBIR_MAX_PIXELS (set by `--max-pixels`), else `MAX_PIXELS`."""
    value = os.environ.get("CBIR_MAX_PIXELS", "")
    return int(value) if value.isdigit() and int(value) > 0 else MAX_PIXELS


def read_header(path: str | Path) -> Dataset:
    """The dataset without pixel data; a missing preamble is accepted (read with force)."""
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(str(path), stop_before_pixels=False, force=True, defer_size="1 KB")
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise BadInputError(path, f"unreadable DICOM ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(ds, Dataset) or len(ds) == 0:
        raise BadInputError(path, "not a DICOM file")
    return ds


def decode(ds: Dataset, path: str | Path, limit: int | None = None) -> np.ndarray:
    """Stored pixel values of the first frame (no LUTs applied); more than `limit` pixels are refused."""
    limit = max_pixels() if limit is None else limit
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        kind = str(ds.get("SOPClassUID", "")) and getattr(ds.SOPClassUID, "name", str(ds.SOPClassUID))
        raise BadInputError(path, f"no pixel data ({kind or 'unknown SOP class'})")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols > limit:
        raise BadInputError(path, f"image too large ({cols}×{rows} pixels, limit {limit}; see --max-pixels)")
    if rows < 2 or cols < 2:
        raise BadInputError(path, f"image too small ({cols}×{rows} pixels)")
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    syntax = ds.file_meta.TransferSyntaxUID
    options: dict[str, object] = {"index": 0} if int(ds.get("NumberOfFrames", 1) or 1) > 1 else {}
    if syntax.is_compressed:
        if not _can_decode(syntax):
            raise BadInputError(path, f"unsupported transfer syntax {syntax.name} ({syntax}): no decoder for it is "
                                      "installed")
        options["decoding_plugin"] = DECODING_PLUGIN
    try:
        with _quiet_pydicom():
            return pixel_array(ds, **options)
    except NotImplementedError:
        raise BadInputError(path, f"unsupported transfer syntax {syntax.name} ({syntax})") from None
    except RuntimeError as exc:
        if "plugin" in str(exc).lower() or "decod" in str(exc).lower():
            raise BadInputError(path, f"cannot decode {syntax.name}: {_first_line(exc)}") from None
        raise BadInputError(path, f"corrupt pixel data ({_first_line(exc)})") from None
    except (ValueError, EOFError, OSError, KeyError, IndexError, AttributeError, TypeError) as exc:
        raise BadInputError(path, f"corrupt pixel data ({type(exc).__name__}: {_first_line(exc)})") from None


def _can_decode(syntax: pydicom.uid.UID) -> bool:
    """Whether the pinned plugin decodes this compressed syntax here."""
    from pydicom.pixels.decoders.base import get_decoder
    try:
        return DECODING_PLUGIN in get_decoder(syntax).available_plugins
    except (NotImplementedError, ValueError, KeyError):
        return False


def safe_meta(ds: Dataset, pseudonymize: Pseudonymizer | None) -> SafeMeta:
    """Coarse fields only; PatientID leaves as a keyed pseudonym or not at all."""
    return SafeMeta(
        view=view_of(ds.get("ViewPosition")),
        sex=sex_of(ds.get("PatientSex")),
        age_band=age_band(ds.get("PatientAge")),
        modality=str(ds.get("Modality") or "").strip().upper() or None,
        pseudonym=pseudonymize(str(ds.get("PatientID") or "")) if pseudonymize else None,
    )


def instance_key(ds: Dataset) -> str | None:
    """A one-way key of the SOPInstanceUID, used for deduplication and point IDs."""
    uid = str(ds.get("SOPInstanceUID") or "").strip()
    return hashlib.sha256(uid.encode()).hexdigest()[:32] if uid else None


def looks_like_raw_dicom(head: bytes) -> bool:
    """A preamble-less DICOM starts with a (0008,xxxx) or (0002,xxxx) group element."""
    return len(head) >= 8 and head[1] == 0 and head[0] in (0x02, 0x08) and head[3] == 0


def peek_instance_key(path: str | Path) -> str | None:
    """`instance_key` from the header alone (no pixels read); None for a non-DICOM or unreadable file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] != b"DICM" and not looks_like_raw_dicom(head):
            return None
        with _quiet_pydicom():
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True,
                                 specific_tags=["SOPInstanceUID"])
        return instance_key(ds)
    except Exception:  # noqa: BLE001 - the full read later reports what is wrong with the file
        return None


def read_dicom(path: str | Path, pseudonymize: Pseudonymizer | None = None,
               limit: int | None = None) -> tuple[np.ndarray, SafeMeta, str | None]:
    """(pixels float32 [0,1], safe metadata, instance key) of a DICOM file."""
    with _quiet_pydicom():
        ds = read_header(path)
        arr = decode(ds, path, limit)
        try:
            pixels = process(arr, ds)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise BadInputError(path, f"cannot apply the header's LUTs ({_first_line(exc)})") from None
        if pixels.ndim != 2:
            raise BadInputError(path, f"unexpected pixel array shape {pixels.shape}")
        return pixels, safe_meta(ds, pseudonymize), instance_key(ds)


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns about odd but readable values; a batch run would drown in them. Real failures raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__
