"""Header checks made before any pixel is decoded: the image geometry as plain integers, the pixel limit and
the modality. A malformed value (a multi-valued Rows, a NumberOfFrames of '1A') is one line, never a crash."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from cbir.errors import BadInputError
from cbir.io.policy import DEFAULT_READER, MAX_PIXELS, ReaderPolicy

__all__ = ["DEFAULT_READER", "MAX_PIXELS", "ReaderPolicy", "Geometry", "check_modality", "geometry", "header_int"]


#: Modalities that are (or may be) projection radiographs: CR, DX, the non-standard DR, RG (film), and
#: secondary captures (OT, SC), which archives use for digitised films. A file without Modality is accepted.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT", "SC"})
#: BodyPartExamined values (DICOM's defined terms, CID 4031, spaces and underscores removed) of radiographs that
#: are not chest films: a CR hand or pelvis is refused like an MR. Any other value passes, a missing one too:
#: archives write the chest in many ways and languages (CHEST, THORAX, TORAX, PECHO, LUNG, CHEST_LAT, …).
NOT_CHEST = frozenset({
    "ABDOMEN", "ANKLE", "ARM", "BREAST", "CALCANEUS", "CSPINE", "CERVICALSPINE", "COCCYX", "ELBOW", "EXTREMITY",
    "FINGER", "FOOT", "FOREARM", "HAND", "HEAD", "HIP", "HUMERUS", "FEMUR", "JAW", "KNEE", "LEG", "LOWEREXTREMITY",
    "LSPINE", "LUMBARSPINE", "MANDIBLE", "NECK", "ORBIT", "PELVIS", "SACRUM", "SHOULDER", "SKULL", "SSPINE",
    "TSPINE", "THORACICSPINE", "THUMB", "TIBIA", "TOE", "UPPEREXTREMITY", "WRIST", "HEADNECK", "SINUS",
})




@dataclass(frozen=True)
class Geometry:
    rows: int
    columns: int
    frames: int
    samples: int


def header_int(ds: Dataset, keyword: str, default: int, path: str | Path) -> int:
    """A single non-negative integer element; anything else is a BadInputError naming the element."""
    if keyword not in ds:
        return default
    value = ds[keyword].value
    if value is None or value == "":
        return default
    if isinstance(value, (MultiValue, list, tuple)):
        shown = [str(v) for v in value][:4]
        raise BadInputError(path, f"malformed header: {keyword} has {len(value)} values [{', '.join(shown)}]")
    try:
        number = int(str(value).strip()) if isinstance(value, (str, bytes)) else int(value)
    except (TypeError, ValueError):
        raise BadInputError(path, f"malformed header: {keyword} is {str(value)[:40]!r}, not a number") from None
    if number < 0:
        raise BadInputError(path, f"malformed header: {keyword} is {number}")
    return number


def geometry(ds: Dataset, path: str | Path, limit: int | None = None) -> Geometry:
    """Rows, columns, frames and samples, with the pixel limit applied (before anything is allocated)."""
    limit = MAX_PIXELS if limit is None else limit
    if "Rows" not in ds or "Columns" not in ds:
        raise BadInputError(path, "malformed header: pixel data without Rows and Columns")
    rows, cols = header_int(ds, "Rows", 0, path), header_int(ds, "Columns", 0, path)
    if rows * cols > limit:
        raise BadInputError(path, f"image too large ({cols}×{rows} pixels, limit {limit}; see --max-pixels)")
    if rows < 2 or cols < 2:
        raise BadInputError(path, f"image too small ({cols}×{rows} pixels)")
    frames = header_int(ds, "NumberOfFrames", 1, path) or 1
    samples = header_int(ds, "SamplesPerPixel", 1, path) or 1
    if samples not in (1, 3, 4):
        raise BadInputError(path, f"malformed header: SamplesPerPixel is {samples}")
    return Geometry(rows, cols, frames, samples)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return (str(value[0]) if isinstance(value, MultiValue) and len(value) else str(value or "")).strip().upper()


def check_modality(ds: Dataset, path: str | Path, any_modality: bool = False) -> None:
    """Refuse modalities that are not radiographs (MR, CT, US, SEG, RTDOSE, …) and radiographs of a body part
    other than the chest (`NOT_CHEST`), unless `any_modality` (`ReaderPolicy.any_modality`)."""
    if any_modality:
        return
    modality = _text(ds, "Modality")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise BadInputError(path, f"not a radiograph (modality {modality[:16]}; cbir embeds CR/DX chest "
                                  "radiographs; --any-modality overrides)")
    part = _text(ds, "BodyPartExamined")
    if part.replace(" ", "").replace("_", "") in NOT_CHEST:
        raise BadInputError(path, f"not a chest radiograph (body part {part[:16]}; cbir embeds chest radiographs; "
                                  "--any-modality overrides)")
