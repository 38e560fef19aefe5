"""PHI handling: keyed pseudonyms and coarse, safe header fields."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from cbir.errors import CbirError

KEY_ENV = "CBIR_PSEUDONYM_KEY"
KEY_FILE_ENV = "CBIR_KEY_FILE"
DEFAULT_KEY_FILE = Path("~/.config/cbir/pseudonym.key")

#: ViewPosition → the stored view: PA, AP, lateral ("LL", either side), oblique ("OBL": LAO, RAO, LPO, RPO; an
#: oblique is not a lateral); anything else is not stored.
_VIEWS = {"PA": "PA", "AP": "AP", "LL": "LL", "LAT": "LL", "LATERAL": "LL", "RL": "LL", "RLD": "LL", "LLD": "LL",
          "LAO": "OBL", "RAO": "OBL", "LPO": "OBL", "RPO": "OBL", "OBLIQUE": "OBL"}


@dataclass(frozen=True)
class SafeMeta:
    """The only header-derived fields that may be stored: all coarse, none identifying."""

    view: str | None = None
    sex: str | None = None
    age_band: str | None = None
    modality: str | None = None
    pseudonym: str | None = None

    def as_payload(self) -> dict[str, str | None]:
        return asdict(self)

    def merged(self, other: SafeMeta) -> SafeMeta:
        """Fields of `self`, with gaps filled from `other`."""
        return SafeMeta(**{k: v if v is not None else getattr(other, k) for k, v in asdict(self).items()})


class Pseudonymizer:
    """HMAC-SHA256 of a patient key under a secret; the same key gives the same pseudonym."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise CbirError("pseudonym key is shorter than 16 bytes")
        self._key = key

    def __call__(self, patient_id: str | None) -> str | None:
        if patient_id is None or str(patient_id).strip() == "":
            return None
        digest = hmac.new(self._key, str(patient_id).strip().encode("utf-8"), hashlib.sha256).hexdigest()
        return "p-" + digest[:20]

    def file(self, dataset: str, relpath: str) -> str:
        """The keyed pseudonym of an image file (`dataset`, path relative to its root): what a payload stores
        instead of the file name, which often is a PatientID or MRN. Distinct from every patient pseudonym."""
        message = "\0".join(("cbir file", dataset, relpath)).encode("utf-8", "backslashreplace")
        return "f-" + hmac.new(self._key, message, hashlib.sha256).hexdigest()[:24]

    def instance(self, instance_key: str) -> str:
        """The keyed form of an image's instance key (`cbir.io.dicom.instance_key`, a hash of its SOPInstanceUID)
        that point IDs are made from: without the key, nobody holding a study's UIDs can tell whether it is in an
        index or a snapshot. Distinct from every other pseudonym."""
        message = "\0".join(("cbir instance", instance_key)).encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]

    def dataset(self, fingerprint: str) -> str:
        """The keyed id of a dataset from its fingerprint (`cbir.data.identity`): what payloads, point IDs and
        collection metadata name a dataset by, never its folder name. Distinct from file and patient pseudonyms."""
        message = "\0".join(("cbir dataset", fingerprint)).encode("utf-8")
        return "d-" + hmac.new(self._key, message, hashlib.sha256).hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        """Identifies the key without revealing it (recorded with a collection)."""
        return hmac.new(self._key, b"cbir key fingerprint", hashlib.sha256).hexdigest()[:16]


def key_file_path() -> Path:
    return Path(os.environ.get(KEY_FILE_ENV, str(DEFAULT_KEY_FILE))).expanduser()


def load_pseudonymizer(create: bool = True) -> Pseudonymizer:
    """Key from `$CBIR_PSEUDONYM_KEY`, else the key file (created with mode 0600 when missing)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Pseudonymizer(env.encode("utf-8"))
    path = key_file_path()
    if not path.exists():
        if not create:
            raise CbirError(f"{path}: no pseudonym key (set ${KEY_ENV} or run `cbir ingest` once)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    return Pseudonymizer(path.read_text().strip().encode("utf-8"))


def shown_path(path: str | Path) -> str:
    """A folder as written files (results.json, study outputs) name it, never a user's absolute path (which may
    hold a name, an MRN or a host): the project's shared data as `../shared/…`, a relative path as it was typed,
    anything else as `…/` and its last part."""
    parts = Path(path).parts
    if "shared" in parts:
        return str(Path("..", *parts[parts.index("shared"):]))
    if not Path(path).is_absolute() and not str(path).startswith("~"):
        return str(path)
    return f"…/{parts[-1]}" if parts else ""


def view_of(value: object) -> str | None:
    text = str(value or "").strip().upper()
    return _VIEWS.get(text)


def sex_of(value: object) -> str | None:
    text = str(value or "").strip().upper()[:1]
    return text if text in ("M", "F", "O") else None


def age_years(value: object) -> float | None:
    """Age in years from a DICOM AS string ('062Y', '006M', '003W', '010D') or a plain number."""
    text = str(value or "").strip().upper()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([YMWD]?)", text)
    if not match:
        return None
    number, unit = float(match.group(1)), match.group(2) or "Y"
    years = number / {"Y": 1, "M": 12, "W": 52.18, "D": 365.25}[unit]
    return years if 0 <= years < 130 else None


def age_band(value: object) -> str | None:
    """5-year band such as '60-64'; ages of 90 and over are pooled as '90+' (HIPAA safe harbour)."""
    years = age_years(value)
    if years is None:
        return None
    if years >= 90:
        return "90+"
    low = int(years // 5) * 5
    return f"{low:02d}-{low + 4:02d}"
