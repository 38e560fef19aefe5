"""DICOM reading: check the header, decode the first frame with the syntax's fixed plugin, process the
pixels, keep only safe metadata. Whatever a third-party reader raises on a file becomes one BadInputError."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cbir.errors import BadInputError
from cbir.io.capture import captured_output
from cbir.io.decoders import PIXEL_KEYWORDS, can_decode, decode_first_frame
from cbir.io.header import DEFAULT_READER, MAX_PIXELS, ReaderPolicy, check_modality, geometry
from cbir.io.jpeg_draft import decode_dicom_reduced, reducible_dicom
from cbir.io.patient import PATIENT_TAGS, patient_pseudonym
from cbir.io.phi import Pseudonymizer, SafeMeta, age_band, sex_of, view_of
from cbir.io.pixels import BlankImage, process

__all__ = ["MAX_PIXELS", "read_header", "decode", "read_dicom", "safe_meta", "instance_key",
           "looks_like_raw_dicom", "peek_instance_key", "peek_patient"]


def read_header(path: str | Path) -> Dataset:
    """The dataset with its pixel data left in the file (deferred); a missing preamble is accepted."""
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(str(path), force=True, defer_size="1 KB")
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise BadInputError(path, f"unreadable DICOM ({describe(exc)})") from None
    if not isinstance(ds, Dataset) or len(ds) == 0:
        raise BadInputError(path, "not a DICOM file")
    return ds


def transfer_syntax(ds: Dataset, path: str | Path) -> pydicom.uid.UID:
    """The file's transfer syntax (Implicit VR Little Endian when the file meta has none), if known."""
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    syntax = pydicom.uid.UID(str(ds.file_meta.TransferSyntaxUID).strip())
    if not syntax.is_transfer_syntax:
        raise BadInputError(path, f"unknown transfer syntax {str(syntax)[:64]} (not a DICOM transfer syntax "
                                  "pydicom knows)")
    return syntax


def decode(ds: Dataset, path: str | Path, limit: int | None = None, reduce_to: int | None = None) -> np.ndarray:
    """Stored values of the first frame (no LUTs applied), with `ds.PhotometricInterpretation` set to the
    decoded array's; more than `limit` pixels are refused before anything is allocated. With `reduce_to`, a
    grey JPEG Baseline frame is decoded at the smallest DCT scale whose longer side is still ≥ `reduce_to`
    (`cbir.io.jpeg_draft`); every other frame in full."""
    require_pixels(ds, path)
    shape = geometry(ds, path, limit)
    syntax = transfer_syntax(ds, path)
    if not can_decode(syntax):
        raise BadInputError(path, f"unsupported transfer syntax {syntax.name} ({syntax}): no decoder for it is "
                                  "installed")
    with captured_output() as said:
        try:
            reduced = (decode_dicom_reduced(ds, shape, reduce_to) if reduce_to and reducible_dicom(ds, syntax, shape)
                       else None)
        except Exception:  # noqa: BLE001 - a stream Pillow cannot read: the full decode below reports the file
            reduced = None
        if reduced is not None:
            return reduced
        try:
            arr, photometric = decode_first_frame(ds, path, syntax, shape)
        except NotImplementedError as exc:
            raise BadInputError(path, f"cannot decode {syntax.name}: {describe(exc, said.first_line())}") from None
        except MemoryError:
            raise BadInputError(path, "corrupt pixel data (MemoryError)") from None
        except Exception as exc:  # noqa: BLE001 - a decoder's failure on this file, whatever its type
            raise BadInputError(path, f"corrupt pixel data ({describe(exc, said.first_line())})") from None
    if photometric:
        ds.PhotometricInterpretation = photometric
    return arr


def require_pixels(ds: Dataset, path: str | Path) -> None:
    """A BadInputError naming the SOP class for a DICOM without pixel data (an SR, an RT Plan, …)."""
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        kind = str(ds.get("SOPClassUID", "")) and getattr(ds.SOPClassUID, "name", str(ds.SOPClassUID))
        raise BadInputError(path, f"no pixel data ({kind or 'unknown SOP class'})")


def safe_meta(ds: Dataset, pseudonymize: Pseudonymizer | None) -> SafeMeta:
    """Coarse fields only; the patient leaves as a keyed pseudonym (`cbir.io.patient.patient_pseudonym`) or not at
    all."""
    return SafeMeta(
        view=view_of(ds.get("ViewPosition")),
        sex=sex_of(ds.get("PatientSex")),
        age_band=age_band(ds.get("PatientAge")),
        modality=str(ds.get("Modality") or "").strip().upper() or None,
        pseudonym=patient_pseudonym(ds, pseudonymize) if pseudonymize else None,
    )


def instance_key(ds: Dataset) -> str | None:
    """A one-way key of the SOPInstanceUID, used for deduplication and point IDs."""
    uid = str(ds.get("SOPInstanceUID") or "").strip()
    return hashlib.sha256(uid.encode()).hexdigest()[:32] if uid else None


def looks_like_raw_dicom(head: bytes) -> bool:
    """A preamble-less DICOM starts with a (0008,xxxx) or (0002,xxxx) group element."""
    return len(head) >= 8 and head[1] == 0 and head[0] in (0x02, 0x08) and head[3] == 0


def _peek(path: str | Path, tags: list[str]) -> Dataset | None:
    """The header elements `tags` of a DICOM file (no pixels read); None for a non-DICOM or unreadable file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] != b"DICM" and not looks_like_raw_dicom(head):
            return None
        with quiet_pydicom():
            return pydicom.dcmread(str(path), stop_before_pixels=True, force=True, specific_tags=tags)
    except Exception:  # noqa: BLE001 - the full read later reports what is wrong with the file
        return None


def peek_instance_key(path: str | Path) -> str | None:
    """`instance_key` from the header alone (no pixels read); None for a non-DICOM or unreadable file."""
    ds = _peek(path, ["SOPInstanceUID"])
    return None if ds is None else instance_key(ds)


def peek_patient(path: str | Path, pseudonymize: Pseudonymizer) -> str | None:
    """`cbir.io.patient.patient_pseudonym` of a DICOM file from its header alone (only PatientID and
    IssuerOfPatientID are parsed, no pixels read); None for a file without a usable PatientID, and for a non-DICOM
    or unreadable file (the full read later reports what is wrong with it)."""
    ds = _peek(path, list(PATIENT_TAGS))
    if ds is None:
        return None
    try:
        return patient_pseudonym(ds, pseudonymize)
    except Exception:  # noqa: BLE001 - an unreadable header has no patient; ingest reports the file itself
        return None


def read_dicom(path: str | Path, pseudonymize: Pseudonymizer | None = None, policy: ReaderPolicy = DEFAULT_READER,
               reduce_to: int | None = None) -> tuple[np.ndarray, SafeMeta, str | None, tuple[int, int]]:
    """(pixels float32 [0,1], safe metadata, instance key, (Rows, Columns)) of a DICOM file, or one
    BadInputError; `policy`: the pixel limit and the modality check; `reduce_to`: see `decode` (the pixels are
    then smaller than Rows × Columns)."""
    try:
        with quiet_pydicom():
            return _read_dicom(path, pseudonymize, policy, reduce_to)
    except BadInputError:
        raise
    except RecursionError:
        raise BadInputError(path, "unreadable DICOM (RecursionError: sequences nested too deeply)") from None
    except Exception as exc:  # noqa: BLE001 - one bad file is one line, whatever the reader raised
        raise BadInputError(path, f"unreadable DICOM ({describe(exc)})") from None


def _read_dicom(path: str | Path, pseudonymize: Pseudonymizer | None, policy: ReaderPolicy,
                reduce_to: int | None) -> tuple[np.ndarray, SafeMeta, str | None, tuple[int, int]]:
    ds = read_header(path)
    require_pixels(ds, path)
    check_modality(ds, path, policy.any_modality)
    arr = decode(ds, path, policy.max_pixels, reduce_to)
    try:
        pixels = process(arr, ds)
    except BlankImage as exc:
        raise BadInputError(path, f"blank image ({exc} after windowing)") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise BadInputError(path, f"cannot apply the header's LUTs ({describe(exc)})") from None
    if pixels.ndim != 2:
        raise BadInputError(path, f"unexpected pixel array shape {pixels.shape}")
    return pixels, safe_meta(ds, pseudonymize), instance_key(ds), (int(ds.Rows), int(ds.Columns))


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom warns about odd but readable values; a batch run would drown in them. Real failures raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def describe(exc: BaseException, said: str = "") -> str:
    """`Type: message` on one line: the whole message (its lines joined), plus what a C library printed."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if said and said not in text:
        text += f"; the decoder said: {said}"
    return text[:400]
