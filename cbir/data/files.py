"""File-system and table helpers shared by every layout reader."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbir.data.records import META_COLUMNS
from cbir.errors import DatasetError, printable

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")

#: (file name, absolute path, POSIX path relative to the dataset root)
FileEntry = tuple[str, str, str]


def check_root(root: Path | str) -> Path:
    """The dataset root as an absolute path; DatasetError if it is missing or not a folder."""
    path = Path(os.path.abspath(os.path.expanduser(str(root))))
    if not path.exists():
        raise DatasetError(f"{root}: dataset folder not found")
    if not path.is_dir():
        raise DatasetError(f"{root}: not a folder (give the dataset's root folder)")
    return path


def iter_files(root: Path, top: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS,
               skipped: list[tuple[str, str]] | None = None) -> Iterator[FileEntry]:
    """Files under `top` with one of `extensions` (any case), in sorted order; hidden entries skipped.

    When `extensions` include ".dcm", a file without one of them is read as DICOM when its first bytes say so
    (`cbir.io.image.is_dicom_file`: archives write DICOM files without an extension, e.g. under a DICOMDIR).
    Every other file is appended to `skipped` (when given) as (relative path, reason), so a caller can count
    and name every file it leaves out. A DICOMDIR is an index, not an image: the images it lists are read
    where they lie, under `top`.

    Symlinked sub-folders are not followed, so link loops cannot recurse. A file name that is not valid
    UTF-8 keeps its real path but gets a printable name and relative path (`\\xNN` escapes), which is what
    labels, splits and payloads see.
    """
    from cbir.io.image import is_dicom_file
    root_str = str(root)
    suffixes = tuple(ext.lower() for ext in extensions)
    sniff = ".dcm" in suffixes
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root_str).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        if skipped is not None:
            skipped.extend((printable(prefix + d + "/"), "hidden folder") for d in dirnames if d.startswith("."))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = dirpath + os.sep + name
            if name.startswith("."):
                reason = "hidden file"
            elif name.lower().endswith(suffixes):
                reason = ""
            elif name.upper() == "DICOMDIR":
                reason = "a DICOMDIR (an index: the images it lists are read from their folders)"
                if skipped is not None:
                    skipped.extend((printable(prefix + rel), "listed in the DICOMDIR but absent")
                                   for rel in dicomdir_missing(Path(path)))
            elif sniff and is_dicom_file(path):
                reason = ""
            else:
                reason = f"not an image ({_extension(name)}, and no DICOM marker)"
            if not reason:
                yield printable(name), path, printable(prefix + name)
            elif skipped is not None:
                skipped.append((printable(prefix + name), reason))


def dicomdir_missing(path: Path) -> list[str]:
    """The files a DICOMDIR lists (ReferencedFileID, relative to its folder) that are not there; [] for one that
    cannot be read (it is left out either way, and the files under its folder are read as they are)."""
    import pydicom
    try:
        index = pydicom.dcmread(path, force=True, specific_tags=["DirectoryRecordSequence"])
        records = index.get("DirectoryRecordSequence") or []
    except Exception:  # noqa: BLE001 - a damaged index is only an index
        return []
    missing = []
    for record in records:
        parts = record.get("ReferencedFileID")
        if not parts:
            continue
        rel = "/".join([parts] if isinstance(parts, str) else [str(p) for p in parts])
        if ".." not in rel.split("/") and not (path.parent / rel).is_file():
            missing.append(rel)
    return missing


def _extension(name: str) -> str:
    suffix = os.path.splitext(name)[1].lower()
    return f"extension {printable(suffix)[:12]}" if suffix else "no extension"


def describe_skipped(skipped: Sequence[tuple[str, str]]) -> str:
    """One line for the files a listing left out: how many, by reason."""
    from collections import Counter
    counts = Counter(reason for _, reason in skipped)
    return (f"{len(skipped)} files left out: "
            + "; ".join(f"{n} {reason}" for reason, n in counts.most_common(6))
            + ("; …" if len(counts) > 6 else ""))


def file_map(root: Path, tops: Iterable[Path], extensions: Sequence[str]) -> dict[str, tuple[str, str]]:
    """File name → (absolute path, relpath) for files under `tops`; the first one found wins."""
    found: dict[str, tuple[str, str]] = {}
    for top in tops:
        for name, path, rel in iter_files(root, top, extensions):
            found.setdefault(name, (path, rel))
    return found


def has_image(folder: Path) -> bool:
    """Whether `folder` holds at least one image file at any depth."""
    return next(iter_files(folder, folder), None) is not None


def read_csv_checked(path: Path, required: Sequence[str], **kwargs: Any) -> pd.DataFrame:
    """Read a label CSV; DatasetError (one line, naming the file) if unreadable, empty or missing columns."""
    try:
        frame = pd.read_csv(path, index_col=False, **kwargs)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(f"{path}: cannot read as CSV ({reason})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"{path}: missing column {missing[0]!r} (expected {', '.join(required)}; "
            f"found {', '.join(frame.columns[:12])})"
        )
    if frame.empty:
        raise DatasetError(f"{path}: no rows")
    return frame


def optional_text(values: pd.Series) -> pd.Series:
    """Stripped strings as an object column, None where missing or blank."""
    text = _as_text(values).str.strip()
    return _none_where(text, text.isna() | (text == ""))


def optional_int(values: pd.Series) -> pd.Series:
    """The first integer in each value (e.g. ``58`` or ``"058Y"``) as an object column, None if none."""
    if pd.api.types.is_integer_dtype(values.dtype):
        number = values.astype("Int64")
    else:
        digits = _as_text(values).str.extract(r"(\d+)", expand=False)
        number = pd.to_numeric(digits, errors="coerce").astype("Int64")
    return _none_where(number, number.isna())


def _as_text(values: pd.Series) -> pd.Series:
    """`values` as a nullable string column (missing values stay missing)."""
    return values.astype("string")


def _none_where(values: pd.Series, missing: pd.Series) -> pd.Series:
    column = values.astype(object)
    column[missing.to_numpy(dtype=bool, na_value=True)] = None
    return column


def make_meta(
    path: Sequence[str],
    relpath: Sequence[str],
    patient: Sequence[str],
    split: Sequence[str] | np.ndarray,
    boxes: Sequence[list] | None = None,
    view: Sequence[object] | pd.Series | None = None,
    sex: Sequence[object] | pd.Series | None = None,
    age: Sequence[object] | pd.Series | None = None,
    patient_source: Sequence[str] | None = None,
) -> pd.DataFrame:
    """A `Records.meta` frame with exactly `META_COLUMNS`; a column left as None is all-None, except
    `patient_source`, which defaults to "label" (the caller's `patient` column names the patients)."""
    n = len(path)

    def column(values: Sequence[object] | pd.Series | np.ndarray | None) -> list:
        if values is None:
            return [None] * n
        return values.tolist() if isinstance(values, pd.Series | np.ndarray) else list(values)

    frame = pd.DataFrame(
        {
            "path": column(path),
            "relpath": column(relpath),
            "patient": [str(p) for p in column(patient)],
            "split": [str(s) for s in column(split)],
            "boxes": [[] for _ in range(n)] if boxes is None else column(boxes),
            "view": column(view),
            "sex": column(sex),
            "age": column(age),
            "patient_source": ["label"] * n if patient_source is None else [str(s) for s in patient_source],
        },
        columns=list(META_COLUMNS),
    )
    for name in ("boxes", "view", "sex", "age"):
        frame[name] = frame[name].astype(object)
    return frame
