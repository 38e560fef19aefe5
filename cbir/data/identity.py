"""Dataset ids: what collections, payloads (`dataset`), point IDs, file pseudonyms and split records name a
dataset by. Never the folder's name: ``…/chest_xray/train`` and ``…/chest_xray/test`` are two datasets, and
folder names can name a site, a study or a patient.

The id is `Pseudonymizer.dataset` (HMAC-SHA256 under the pseudonym key) of the dataset's fingerprint: its
layout, every image's relative path and size in bytes, and the sha256 of the first 256 KiB of up to 16 of its
images (those whose relative paths hash lowest). So the id
  * is the same on every run over unchanged files, and after the folder is moved, renamed or copied: nothing
    of the root's own path or name enters it;
  * differs between folders with other images, also when their relative paths are equal;
  * changes when an image is added, removed, resized, or a sampled one rewritten (a new version of the
    dataset). Ingest keeps the id a collection already records for the same root folder
    (`cbir.app.datasets`), so a grown archive stays one dataset there; ``--dataset-id`` names one explicitly
    (`check_dataset_id`), e.g. for a grown archive that has also moved.
Two folders whose images have equal names and sizes, and whose sampled images are byte-equal, get one id (they
are copies, as far as the fingerprint can tell); give them ``--dataset-id`` to keep them apart.
"""

from __future__ import annotations

import hashlib
import os
import re

import pandas as pd

from cbir.errors import DatasetError
from cbir.io.phi import Pseudonymizer

#: How many images' leading bytes enter the fingerprint, and how many bytes of each.
SAMPLED_FILES, SAMPLED_BYTES = 16, 256 * 1024
_DATASET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")


def check_dataset_id(value: str) -> str:
    """A user-given `--dataset-id`, or one line saying why it is refused: 1–48 characters, letters, digits,
    '.', '_' and '-', starting with a letter or digit."""
    text = str(value)
    if not _DATASET_ID.fullmatch(text):
        why = ("is empty" if not text else f"has {len(text)} characters (at most 48)" if len(text) > 48
               else "must start with a letter or digit and hold only letters, digits, '.', '_' and '-'")
        raise DatasetError(f"--dataset-id {text[:60]!r}: {why}")
    return text


def fingerprint(layout: str, meta: pd.DataFrame) -> str:
    """sha256 of the layout, each image's (relative path, size) in sorted order, and the leading bytes of the
    sampled images (see the module docstring); a file that cannot be read counts as size -1, no bytes."""
    rows = sorted(zip(meta["relpath"].astype(str), meta["path"].astype(str), strict=True))
    digest = hashlib.sha256(f"cbir dataset fingerprint 1\n{layout}\n".encode())
    for relpath, path in rows:
        digest.update(f"{relpath}\0{_size(path)}\n".encode("utf-8", "surrogateescape"))
    sampled = sorted(rows, key=lambda row: hashlib.sha256(row[0].encode("utf-8", "surrogateescape")).digest())
    for relpath, path in sampled[:SAMPLED_FILES]:
        digest.update(f"{relpath}\0".encode("utf-8", "surrogateescape") + _head_digest(path))
    return digest.hexdigest()


def dataset_id(layout: str, meta: pd.DataFrame, pseudonymize: Pseudonymizer) -> str:
    """The keyed id of a dataset ("d-" and 16 hex digits): `Pseudonymizer.dataset` of its `fingerprint`."""
    return pseudonymize.dataset(fingerprint(layout, meta))


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _head_digest(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read(SAMPLED_BYTES)).digest()
    except OSError:
        return b""
