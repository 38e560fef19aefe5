"""Deterministic train/val/test splits by patient.

Each patient key is hashed on its own (sha256 of ``f"{seed}:{patient}"``) to a number in [0, 1), so
a patient's split never depends on which other patients are present, and all images of one patient
share a split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from cbir.data.records import SPLITS

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def patient_uniform(patients: Iterable[object], seed: int = 0) -> np.ndarray:
    """Per row, a stable pseudo-random number in [0, 1) that depends only on (seed, patient key)."""
    keys = patients if isinstance(patients, pd.Series) else pd.Series(list(patients), dtype=object)
    codes, uniques = pd.factorize(keys.map(str), use_na_sentinel=False)
    values = np.array([_unit_hash(f"{seed}:{key}") for key in uniques], dtype=np.float64)
    return values[codes] if len(codes) else np.zeros(0, dtype=np.float64)


def assign_splits(
    patients: Iterable[object], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> np.ndarray:
    """Split name ("train", "val" or "test") per row, chosen by patient.

    `fractions` are the expected shares of patients in train, val and test (normalised to sum 1).
    """
    shares = _normalise(fractions)
    edges = np.cumsum(shares)[:-1]
    index = np.searchsorted(edges, patient_uniform(patients, seed), side="right")
    return np.asarray(SPLITS)[index]


def train_val_splits(
    patients: Iterable[object], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> np.ndarray:
    """Split "train" or "val" per row, by patient, for rows already kept out of the test set.

    The val share is fractions[1] / (fractions[0] + fractions[1]) (1/8 with the defaults).
    """
    shares = _normalise(fractions)
    if shares[0] + shares[1] <= 0:
        raise ValueError("train and val fractions are both zero")
    val_share = shares[1] / (shares[0] + shares[1])
    return np.where(patient_uniform(patients, seed) < val_share, "val", "train")


def parse_part(text: str) -> tuple[int, int]:
    """`"i/n"` (1 ≤ i ≤ n) → (i, n); ValueError with the reason otherwise."""
    left, sep, right = text.partition("/")
    try:
        i, n = int(left), int(right)
    except ValueError:
        i = n = 0
    if not sep or n < 1 or not 1 <= i <= n:
        raise ValueError(f"bad part {text!r}: use i/n with 1 ≤ i ≤ n, e.g. 1/4")
    return i, n


def part_mask(keys: Iterable[object], i: int, n: int) -> np.ndarray:
    """Rows in part i of n (1-based): each key goes to one part by a hash of the key alone, so n machines
    that each take one part cover every row exactly once, whatever order they list the rows in."""
    values = np.array([_unit_hash(f"part:{key}") for key in keys], dtype=np.float64)
    return np.floor(values * n).astype(np.int64) == i - 1


def _normalise(fractions: Sequence[float]) -> np.ndarray:
    shares = np.asarray(fractions, dtype=np.float64)
    if shares.shape != (3,) or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers with a positive sum, got {fractions!r}")
    return shares / shares.sum()


def _unit_hash(text: str) -> float:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)
