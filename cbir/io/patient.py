"""Who the patient of a DICOM file is, from its header: the keyed pseudonym of (IssuerOfPatientID, PatientID).

A PatientID is usable unless it names nobody: empty or missing, a placeholder word (`PLACEHOLDER_IDS`, any
case, e.g. "ANONYMOUS" or "unknown"), only zeros ("0", "0000"), or without any letter or digit ("-", "^^").
Anonymisers write such values into every file, so taking them as a patient would put a whole archive into one
patient. A file without a usable PatientID has no header patient (None); the layout readers then fall back to
their file rule (`cbir.data.patients`); `cbir.io.dicom.peek_patient` reads a file's patient without its pixels.
The raw PatientID and issuer never leave `cbir.io`: callers get the pseudonym only (`Pseudonymizer`,
HMAC-SHA256 under the secret key).
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from cbir.io.phi import Pseudonymizer

#: PatientID values (compared case-insensitively, after stripping) that mean "no patient".
PLACEHOLDER_IDS = frozenset({"anonymous", "anonymized", "anonymised", "anon", "unknown", "none", "null", "nil",
                             "n/a", "na", "removed", "deidentified", "de-identified"})
#: The header elements `patient_pseudonym` reads (`cbir.io.dicom.peek_patient` reads only these).
PATIENT_TAGS = ["PatientID", "IssuerOfPatientID"]


def usable_patient_id(value: object) -> str | None:
    """The PatientID stripped, or None when it names nobody (see the module docstring)."""
    text = str(value if value is not None else "").strip()
    if not text or text.casefold() in PLACEHOLDER_IDS or set(text) == {"0"} or not re.search(r"[^\W_]", text):
        return None
    return text


def patient_pseudonym(ds: Dataset, pseudonymize: Pseudonymizer) -> str | None:
    """The keyed pseudonym of a header's patient: of PatientID alone, or of (IssuerOfPatientID, PatientID) when an
    issuer is given (one ID in two issuers' namespaces is two patients); None without a usable PatientID."""
    patient_id = usable_patient_id(_text(ds.get("PatientID")))
    if patient_id is None:
        return None
    issuer = _text(ds.get("IssuerOfPatientID")).strip()
    return pseudonymize(f"{issuer}\0{patient_id}" if issuer else patient_id)


def _text(value: object) -> str:
    """An element value as text: the first of several values, "" for none."""
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if len(value) else ""
    return "" if value is None else str(value)
