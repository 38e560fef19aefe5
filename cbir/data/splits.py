"""Deterministic train/val/test splits by patient, and the record of a split that travels with a model.

Each patient key is hashed on its own (sha256 of ``f"{seed}:{patient}"``) to a number in [0, 1), so a
patient's split never depends on which other patients are present, and all images of one patient share a
split. Who the patient is, `cbir.data.patients` decides (a label file, a DICOM header, or a file rule). A
`SplitSpec` says how to split (seed, fractions, or fold i of k); `split_record` describes the split of one
dataset (a digest of its image keys and of each split's patients), so that `cbir ingest` and `cbir evaluate`
can check that they use the split the model was trained with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import pandas as pd

from cbir.errors import CbirError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass(frozen=True)
class SplitSpec:
    """How a dataset is split by patient.

    Hold-out (`folds` = 0): a patient is test when its hash u ≥ 1 − test_fraction, val when
    1 − test_fraction − val_fraction ≤ u < 1 − test_fraction, else train. With `official_test`, a layout's
    own test list (NIH ``test_list.txt``) replaces the hashed test split, and val is `val_fraction` /
    (1 − test_fraction) of the rest. k-fold (`folds` = k ≥ 2): patient p is in fold ⌊u·k⌋ + 1; fold `fold`
    is the test split, and of the other patients a second, independent hash puts `val_fraction` of all
    patients in val.
    """

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    folds: int = 0
    fold: int = 0
    official_test: bool = True

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise CbirError(f"bad split: {problem}")

    def problem(self) -> str | None:
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            return f"fractions must be in [0, 1) (val {self.val_fraction}, test {self.test_fraction})"
        if self.folds == 0:
            if self.val_fraction + self.test_fraction >= 1:
                return f"val + test fractions must leave some training patients ({self.val_fraction} + " \
                       f"{self.test_fraction})"
            if self.fold:
                return "--fold needs --folds"
            return None
        if self.folds < 2:
            return f"--folds must be 0 (hold-out) or at least 2, got {self.folds}"
        if not 1 <= self.fold <= self.folds:
            return f"--fold must be in 1..{self.folds}, got {self.fold}"
        if self.val_fraction >= 1 - 1 / self.folds:
            return f"val fraction {self.val_fraction} leaves no training patients with {self.folds} folds"
        return None

    @property
    def fractions(self) -> tuple[float, float, float]:
        """Expected shares of patients in (train, val, test)."""
        test = 1 / self.folds if self.folds else self.test_fraction
        return (1 - self.val_fraction - test, self.val_fraction, test)

    def describe(self) -> str:
        if self.folds:
            return f"fold {self.fold} of {self.folds} (seed {self.seed}, val {self.val_fraction:g})"
        return (f"seed {self.seed}, val {self.val_fraction:g}, test {self.test_fraction:g}"
                + ("" if self.official_test else ", official test list ignored"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitSpec:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def replace(self, **changes: Any) -> SplitSpec:
        return SplitSpec(**(self.to_dict() | changes))


def patient_uniform(patients: Iterable[object], seed: int | str = 0) -> np.ndarray:
    """Per row, a stable pseudo-random number in [0, 1) that depends only on (seed, patient key)."""
    keys = patients if isinstance(patients, pd.Series) else pd.Series(list(patients), dtype=object)
    codes, uniques = pd.factorize(keys.map(str), use_na_sentinel=False)
    values = np.array([_unit_hash(f"{seed}:{key}") for key in uniques], dtype=np.float64)
    return values[codes] if len(codes) else np.zeros(0, dtype=np.float64)


def split_names(patients: Iterable[object], spec: SplitSpec | None = None,
                official_test: np.ndarray | None = None) -> np.ndarray:
    """Split name ("train", "val" or "test") per row, by patient, as `spec` says (see `SplitSpec`).

    `official_test` marks the rows of a layout's own test list (used in hold-out mode when
    `spec.official_test`).
    """
    spec = spec or SplitSpec()
    patients = patients if isinstance(patients, pd.Series) else pd.Series(list(patients), dtype=object)
    u = patient_uniform(patients, spec.seed)
    if spec.folds:
        test = np.floor(u * spec.folds).astype(np.int64) == spec.fold - 1
        val_share = spec.val_fraction / (1 - 1 / spec.folds)
        val = ~test & (patient_uniform(patients, f"val:{spec.seed}") < val_share)
    elif official_test is not None and spec.official_test:
        test = np.asarray(official_test, dtype=bool)
        val_share = spec.val_fraction / max(1 - spec.test_fraction, 1e-12)
        val = ~test & (u < val_share)
    else:
        test = u >= 1 - spec.test_fraction
        val = ~test & (u >= 1 - spec.test_fraction - spec.val_fraction)
    return np.where(test, "test", np.where(val, "val", "train"))


def assign_splits(
    patients: Iterable[object], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> np.ndarray:
    """Split name per row, chosen by patient, for `fractions` = expected shares of (train, val, test)."""
    shares = _normalise(fractions)
    return split_names(patients, SplitSpec(seed=seed, val_fraction=float(shares[1]),
                                           test_fraction=float(shares[2])))


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


# -- the record of a split ---------------------------------------------------------------------------------


def keys_digest(keys: Iterable[object], domain: str) -> str:
    """sha256 (first 16 hex digits) of the sorted keys: the same set always gives the same digest, and the
    keys (file names, patient IDs) cannot be read back from it."""
    digest = hashlib.sha256(f"cbir:{domain}\n".encode())
    for key in sorted({str(k) for k in keys}):
        digest.update(key.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()[:16]


def split_record(meta: pd.DataFrame, dataset: str, layout: str, spec: SplitSpec, patient_rule: str,
                 fingerprint: str = "") -> dict[str, Any]:
    """What a checkpoint and a collection record about the split of one dataset (no raw keys, only digests):
    `dataset` is its id, `dataset_digest` a digest of its relative paths, and `fingerprint` (when known) the
    first 16 hex digits of `cbir.data.identity.fingerprint`, which tells datasets with equal relative paths
    apart."""
    splits = {}
    for name in SPLITS:
        rows = meta[meta["split"] == name]
        splits[name] = {"images": len(rows), "patients": int(rows["patient"].nunique()),
                        "patients_digest": keys_digest(rows["patient"], "patients")}
    return {"dataset": dataset, "layout": layout, "images": len(meta),
            "dataset_digest": keys_digest(meta["relpath"], "images"), **({"fingerprint": fingerprint[:16]}
                                                                        if fingerprint else {}),
            "spec": spec.to_dict(), "description": spec.describe(), "patient_rule": patient_rule, "splits": splits}


def describe_record(record: dict[str, Any]) -> str:
    """One phrase for messages: the split and the dataset it was made on."""
    return f"{record.get('description') or SplitSpec.from_dict(record['spec']).describe()} of " \
           f"{record.get('dataset')} ({record.get('images')} images)"


def same_data(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two split records describe the same images: equal relative paths, and equal fingerprints where
    both have one (``chest_xray/train`` and ``chest_xray/test`` may share every relative path)."""
    if a.get("dataset_digest") != b.get("dataset_digest"):
        return False
    return not (a.get("fingerprint") and b.get("fingerprint")) or a["fingerprint"] == b["fingerprint"]


def split_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Why two split records of the same dataset put patients differently (empty when they agree)."""
    why = []
    if SplitSpec.from_dict(a["spec"]) != SplitSpec.from_dict(b["spec"]):
        why.append(f"{SplitSpec.from_dict(a['spec']).describe()} vs {SplitSpec.from_dict(b['spec']).describe()}")
    if a.get("patient_rule") != b.get("patient_rule"):
        why.append(f"patients by {a.get('patient_rule')!r} vs {b.get('patient_rule')!r}")
    if same_data(a, b):
        moved = [n for n in SPLITS if a["splits"][n]["patients_digest"] != b["splits"][n]["patients_digest"]]
        if moved and not why:
            why.append(f"other patients in {', '.join(moved)}")
    return why


#: Split options a user can give explicitly (None = "not given").
SPLIT_OPTIONS = {"seed": "--seed", "val_fraction": "--val-fraction", "test_fraction": "--test-fraction",
                 "folds": "--folds", "fold": "--fold"}


def resolve_spec(model_record: dict[str, Any] | None, given: dict[str, Any], allow_other: bool,
                 model_name: str) -> tuple[SplitSpec, list[str]]:
    """The split to use for a model's data: the model's own, unless options were given.

    `given` maps `SPLIT_OPTIONS` keys to values (None = not given). An explicit value that differs from the
    model's is refused with one line naming both, unless `allow_other`. Returns (spec, notes).
    """
    explicit = {k: v for k, v in given.items() if v is not None}
    if model_record is None:  # a checkpoint from before splits were recorded: `cbir evaluate` warns
        return SplitSpec().replace(**explicit), []
    base = SplitSpec.from_dict(model_record["spec"])
    differs = {k: v for k, v in explicit.items() if getattr(base, k) != v}
    if not differs:
        return base, []
    spec = base.replace(**explicit)
    if not allow_other:
        options = " ".join(f"{SPLIT_OPTIONS[k]} {v}" for k, v in differs.items())
        raise CbirError(f"{options}: the split {spec.describe()} differs from the one {model_name} was trained "
                        f"with ({base.describe()}), so its training images could be scored as test queries; "
                        "drop the option to use the model's split, or pass --other-split")
    return spec, [f"using {spec.describe()}, not the model's {base.describe()} (--other-split)"]


def check_same_split(model_record: dict[str, Any] | None, data_record: dict[str, Any], allow_other: bool,
                     model_name: str) -> list[str]:
    """Refuse data split otherwise than the model's own training data was although the spec is the same (same
    dataset, other patients per split, e.g. another --patient-regex); notes otherwise. A spec that differs was
    already refused or noted by `resolve_spec`."""
    if model_record is None or not same_data(model_record, data_record) or \
            SplitSpec.from_dict(model_record["spec"]) != SplitSpec.from_dict(data_record["spec"]):
        return []
    why = split_differences(model_record, data_record)
    if not why:
        return []
    if not allow_other:
        raise CbirError(f"{data_record['dataset']}: this split ({describe_record(data_record)}) differs from the "
                        f"one {model_name} was trained with ({describe_record(model_record)}: {'; '.join(why)}); "
                        "pass --other-split to use it anyway")
    return [f"the split differs from the model's ({'; '.join(why)}) (--other-split)"]


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
