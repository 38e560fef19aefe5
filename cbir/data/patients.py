"""Who the patient of each image is: the one place that decides it, for splits, payloads, evaluation, calibration
and pretraining pairs alike.

* rsna, nih: the label file's patient column. For rsna the CSV's ``patientId`` wins over the DICOM header: the
  labels and boxes are per patientId, and the Kaggle files are named by it and carry it as PatientID. Ingest
  compares each header's patient with it and reports how many differ (`cbir.app.ingest.IngestSummary`).
* folder, plain, without ``--patient-regex``: a DICOM file's patient is the keyed pseudonym of its header's
  (IssuerOfPatientID, PatientID) (`cbir.io.patient`, read without pixels), whatever the file is called, so that
  one patient's studies under unrelated names land in one split. A DICOM without a usable PatientID (empty,
  missing or a placeholder, `cbir.io.patient.usable_patient_id`), and every PNG/JPEG, falls back to the file
  rule (`cbir.data.folder.folder_patients`); the notes and ingest count those DICOM files.
* folder, plain, with ``--patient-regex``: the regex, on every file (DICOM or not), and no header is read. An
  explicit regex wins because it is the one thing the user said about this archive (e.g. headers whose PatientID
  is a per-study accession); without one, the header is the best evidence there is.

`meta["patient"]` is the split key: for a header patient the keyed pseudonym itself (the raw PatientID is
never held), else the raw key from the file name or label file, which `patient_pseudonyms` keys. Splits by
header patients therefore depend on the pseudonym key; their rule names the key's fingerprint, so a split made
under another key is refused with a line that says so (`cbir.data.splits.split_differences`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cbir.io.phi import Pseudonymizer

#: `meta["patient_source"]` values: the label file's column; the DICOM header (keyed pseudonym); a file-name rule
#: that matched (regex or Kermany naming: groups images); the file itself (its own patient); a DICOM without a
#: usable PatientID, keyed by the file rule instead.
LABEL_SOURCE, HEADER_SOURCE, NAME_SOURCE, FILE_SOURCE, FALLBACK_SOURCE = "label", "header", "name", "file", "fallback"
PATIENT_SOURCES = (LABEL_SOURCE, HEADER_SOURCE, NAME_SOURCE, FILE_SOURCE, FALLBACK_SOURCE)
#: Sources whose keys group several images of one patient.
GROUPING_SOURCES = (LABEL_SOURCE, HEADER_SOURCE, NAME_SOURCE)
#: Why a DICOM file falls back to the file rule, for notes and summaries.
NO_PATIENT_ID = "no usable PatientID (empty, missing or a placeholder such as ANONYMOUS or 0)"


def patient_pseudonyms(meta: pd.DataFrame, pseudonymize: Pseudonymizer) -> list[str | None]:
    """Per row, the keyed pseudonym of its patient: a header patient's key as it is (already keyed), any other
    key through `pseudonymize`."""
    return [str(key) if source == HEADER_SOURCE else pseudonymize(str(key))
            for key, source in zip(meta["patient"], _sources(meta), strict=True)]


def fallback_count(meta: pd.DataFrame) -> int:
    """DICOM files without a usable PatientID, whose patient came from the file rule instead."""
    return int((_sources(meta) == FALLBACK_SOURCE).sum())


def grouped_patients(meta: pd.DataFrame) -> np.ndarray:
    """Per row, whether its key groups images of one patient (MICLe pairs may be drawn within it)."""
    return _sources(meta).isin(GROUPING_SOURCES).to_numpy()


def _sources(meta: pd.DataFrame) -> pd.Series:
    if "patient_source" in meta.columns:
        return meta["patient_source"]
    return pd.Series([LABEL_SOURCE] * len(meta), index=meta.index, dtype=object)
