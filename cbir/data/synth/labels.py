"""Label sampling for the synthetic datasets, from statistics of the real label files.

The constants below were computed once from the real files (then pasted here, so a clone without the
data can still draw realistic labels):

* RSNA: ``stage_2_train_labels.csv`` (Kaggle RSNA Pneumonia Detection Challenge, stage 2: 30,227 rows,
  26,684 patients, 6,012 positive) and ``stage_2_train_dicom_headers.csv.gz`` (view, sex, age).
* NIH: ``Data_Entry_2017_v2020.csv.gz`` (ChestX-ray14: 112,120 images, 30,805 patients).

``tests/test_synth.py`` recomputes them from ``../shared/data/labels`` when it is present.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, cast

import numpy as np
import pandas as pd

# ---------------------------------------------------------------- RSNA

RSNA_N_PATIENTS = 26_684
RSNA_N_POSITIVE = 6_012
RSNA_POSITIVE_RATE = RSNA_N_POSITIVE / RSNA_N_PATIENTS  # 0.2253
RSNA_IMAGE_SIZE = 1024  # the boxes of the real file are in 1024×1024 pixels

#: Boxes per positive patient and which image half each box centre is in ("L": x < 512, "R": x ≥ 512).
RSNA_BOX_PATTERNS: dict[str, int] = {
    "LR": 3196, "L": 1618, "R": 996, "LLR": 73, "LRR": 45, "LL": 41, "RR": 29, "LLRR": 11, "LRRR": 2, "LLL": 1,
}

#: Quantile levels of the box marginals below.
RSNA_BOX_LEVELS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

#: Per image half: quantiles of box centre x, centre y, width and height (1024-pixel coordinates).
RSNA_BOX_MARGINALS: dict[str, dict[str, tuple[int, ...]]] = {
    "L": {
        "cx": (88, 176, 220, 244, 272, 290, 305, 319, 335, 352, 370, 398, 425, 467, 506),
        "cy": (130, 249, 340, 382, 430, 468, 500, 528, 560, 591, 628, 678, 720, 788, 945),
        "width": (40, 96, 123, 140, 163, 181, 197, 212, 226, 242, 262, 287, 308, 350, 528),
        "height": (45, 77, 117, 138, 174, 208, 243, 282, 331, 388, 457, 542, 605, 696, 867),
    },
    "R": {
        "cx": (513, 567, 614, 636, 664, 684, 700, 714, 728, 744, 764, 790, 812, 853, 900),
        "cy": (141, 258, 344, 390, 442, 476, 506, 534, 562, 594, 628, 678, 720, 792, 924),
        "width": (50, 94, 126, 146, 173, 192, 209, 224, 240, 257, 277, 303, 326, 371, 467),
        "height": (52, 88, 129, 157, 200, 238, 275, 318, 368, 426, 496, 575, 642, 740, 942),
    },
}

#: Per image half: correlation of the normal scores of (cx, cy, width, height) (a Gaussian copula).
RSNA_BOX_CORR: dict[str, tuple[tuple[float, ...], ...]] = {
    "L": ((1.0, -0.14, -0.18, -0.01), (-0.14, 1.0, 0.0, -0.18), (-0.18, 0.0, 1.0, 0.6), (-0.01, -0.18, 0.6, 1.0)),
    "R": ((1.0, 0.15, 0.1, 0.02), (0.15, 1.0, 0.04, -0.11), (0.1, 0.04, 1.0, 0.61), (0.02, -0.11, 0.61, 1.0)),
}

#: P(view = AP), P(sex = M) by Target (0, 1); age quantiles (ages over 100 capped).
RSNA_AP_RATE = (0.3632, 0.7758)
RSNA_MALE_RATE = (0.5639, 0.5838)
#: Pixel spacing (mm) of the 1024-pixel images and how many headers have it (26,609 of 26,684).
RSNA_PIXEL_SPACING: tuple[tuple[float, int], ...] = ((0.143, 8993), (0.168, 8815), (0.139, 5511), (0.171, 1996),
                                                     (0.194311, 1294))
AGE_LEVELS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
RSNA_AGE_QUANTILES = (1, 9, 18, 23, 34, 49, 59, 67, 72, 80, 100)

# ---------------------------------------------------------------- NIH

NIH_N_IMAGES = 112_120
NIH_N_PATIENTS = 30_805
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
NO_FINDING = "No Finding"

#: Fraction of images with each finding (for reference and tests; sampling uses the combinations).
NIH_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.10309, "Cardiomegaly": 0.02476, "Consolidation": 0.04163, "Edema": 0.02054,
    "Effusion": 0.11877, "Emphysema": 0.02244, "Fibrosis": 0.01504, "Hernia": 0.00202,
    "Infiltration": 0.17743, "Mass": 0.05157, "Nodule": 0.05647, "Pleural_Thickening": 0.03019,
    "Pneumonia": 0.01276, "Pneumothorax": 0.04729, NO_FINDING: 0.53836,
}

#: The 60 most common `Finding Labels` strings with their image counts (94.5 % of all images).
NIH_TOP_COMBINATIONS: tuple[tuple[str, int], ...] = (
    ("No Finding", 60361), ("Infiltration", 9547), ("Atelectasis", 4215), ("Effusion", 3955),
    ("Nodule", 2705), ("Pneumothorax", 2194), ("Mass", 2139), ("Effusion|Infiltration", 1603),
    ("Atelectasis|Infiltration", 1350), ("Consolidation", 1310), ("Atelectasis|Effusion", 1165),
    ("Pleural_Thickening", 1126), ("Cardiomegaly", 1093), ("Emphysema", 892), ("Infiltration|Nodule", 829),
    ("Atelectasis|Effusion|Infiltration", 737), ("Fibrosis", 727), ("Edema", 628), ("Cardiomegaly|Effusion", 484),
    ("Consolidation|Infiltration", 441), ("Infiltration|Mass", 420), ("Effusion|Pneumothorax", 403),
    ("Effusion|Mass", 402), ("Atelectasis|Consolidation", 398), ("Mass|Nodule", 394), ("Edema|Infiltration", 392),
    ("Infiltration|Pneumothorax", 345), ("Emphysema|Pneumothorax", 337), ("Consolidation|Effusion", 337),
    ("Pneumonia", 322), ("Effusion|Pleural_Thickening", 251), ("Effusion|Nodule", 249),
    ("Atelectasis|Pneumothorax", 240), ("Infiltration|Pleural_Thickening", 210), ("Cardiomegaly|Infiltration", 200),
    ("Atelectasis|Consolidation|Effusion", 200), ("Infiltration|Pneumonia", 199), ("Atelectasis|Nodule", 199),
    ("Edema|Effusion", 189), ("Fibrosis|Infiltration", 185), ("Mass|Pneumothorax", 178), ("Atelectasis|Mass", 175),
    ("Consolidation|Mass", 151), ("Nodule|Pleural_Thickening", 140), ("Edema|Infiltration|Pneumonia", 137),
    ("Consolidation|Effusion|Infiltration", 134), ("Mass|Pleural_Thickening", 132), ("Nodule|Pneumothorax", 130),
    ("Consolidation|Nodule", 128), ("Edema|Effusion|Infiltration", 127), ("Emphysema|Infiltration", 126),
    ("Cardiomegaly|Effusion|Infiltration", 120), ("Atelectasis|Emphysema", 117),
    ("Atelectasis|Pleural_Thickening", 117), ("Hernia", 110), ("Atelectasis|Pneumonia", 108),
    ("Effusion|Infiltration|Nodule", 106), ("Atelectasis|Fibrosis", 104),
    ("Atelectasis|Consolidation|Infiltration", 104), ("Effusion|Infiltration|Mass", 99),
)

#: The other 6,204 images (776 rarer combinations): how many findings each has, and how often each
#: finding occurs among them. Drawn as k findings without replacement, weighted by these counts.
NIH_OTHER_SIZES: dict[int, int] = {2: 1478, 3: 3092, 4: 1247, 5: 301, 6: 67, 7: 16, 8: 1, 9: 2}
NIH_OTHER_WEIGHTS: dict[str, int] = {
    "Atelectasis": 2330, "Cardiomegaly": 879, "Consolidation": 1464, "Edema": 830, "Effusion": 2756,
    "Emphysema": 1044, "Fibrosis": 670, "Hernia": 117, "Infiltration": 2483, "Mass": 1692, "Nodule": 1451,
    "Pleural_Thickening": 1409, "Pneumonia": 665, "Pneumothorax": 1475,
}

#: Patients by number of images, as (fewest, most, patients): 17,503 patients have a single image.
NIH_IMAGES_PER_PATIENT: tuple[tuple[int, int, int], ...] = (
    (1, 1, 17503), (2, 2, 4113), (3, 3, 2100), (4, 4, 1330), (5, 5, 938), (6, 7, 1395), (8, 10, 1201),
    (11, 15, 983), (16, 25, 692), (26, 50, 399), (51, 100, 133), (101, 184, 18),
)

#: P(view = AP) for "No Finding" images and for images with a finding; P(sex = M); age quantiles.
NIH_AP_RATE = (0.3489, 0.4589)
NIH_MALE_RATE = 0.5649
NIH_AGE_QUANTILES = (0, 8, 18, 23, 34, 49, 59, 67, 72, 79, 95)

#: The most common original geometries, verbatim: width, height, pixel spacing x, y (and images).
NIH_GEOMETRY: tuple[tuple[str, str, str, str, int], ...] = (
    ("2500", "2048", "0.168", "0.168", 29986), ("2992", "2991", "0.14300000000000002", "0.14300000000000002", 21961),
    ("3056", "2544", "0.139", "0.139", 15340), ("2500", "2048", "0.171", "0.171", 7141),
    ("2048", "2500", "0.168", "0.168", 5817), ("2021", "2021", "0.19431099999999998", "0.19431099999999998", 4264),
    ("2048", "2500", "0.171", "0.171", 2838), ("2544", "3056", "0.139", "0.139", 2418),
    ("2990", "2991", "0.14300000000000002", "0.14300000000000002", 483),
    ("2020", "2021", "0.19431099999999998", "0.19431099999999998", 310),
)

#: The official split lists images by patient: train_val_list.txt 86,524 and test_list.txt 25,596 images.
NIH_TEST_FRACTION = 25_596 / NIH_N_IMAGES


# ---------------------------------------------------------------- drawn cases


@dataclass
class RsnaCase:
    """One RSNA patient: boxes as (x, y, width, height) in 1024×1024 pixels (empty when negative)."""

    patient_id: str
    boxes: list[tuple[float, float, float, float]]
    view: str
    sex: str
    age: int

    @property
    def target(self) -> int:
        return int(bool(self.boxes))


@dataclass
class NihCase:
    """One NIH image with its row of the Data_Entry CSV."""

    patient_id: int
    follow_up: int
    findings: tuple[str, ...]
    age: int
    sex: str
    view: str
    geometry: tuple[str, str, str, str] = ("2500", "2048", "0.168", "0.168")
    image_index: str = field(default="")

    def __post_init__(self) -> None:
        if not self.image_index:
            self.image_index = f"{self.patient_id:08d}_{self.follow_up:03d}.png"

    @property
    def finding_labels(self) -> str:
        return "|".join(sorted(self.findings)) if self.findings else NO_FINDING


def _quantile_draw(rng: np.random.Generator, quantiles: tuple[int, ...], levels: tuple[float, ...]) -> float:
    return float(np.interp(rng.random(), levels, quantiles))


def _age(rng: np.random.Generator, quantiles: tuple[int, ...]) -> int:
    return int(round(_quantile_draw(rng, quantiles, AGE_LEVELS)))


def random_uuid(rng: np.random.Generator) -> str:
    """A uuid4 string drawn from `rng` (so it is reproducible)."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


# ---------------------------------------------------------------- RSNA sampling


def sample_rsna_box(rng: np.random.Generator, half: str) -> tuple[float, float, float, float]:
    """One box (x, y, w, h) in 1024 pixels with its centre in image half "L" or "R"."""
    corr = np.asarray(RSNA_BOX_CORR[half])
    z = np.linalg.cholesky(corr) @ rng.standard_normal(4)
    cdf = NormalDist().cdf
    cx, cy, w, h = (float(np.interp(cdf(float(zi)), RSNA_BOX_LEVELS, RSNA_BOX_MARGINALS[half][name]))
                    for zi, name in zip(z, ("cx", "cy", "width", "height"), strict=True))
    x0 = min(max(round(cx - w / 2), 0), RSNA_IMAGE_SIZE - 8)
    y0 = min(max(round(cy - h / 2), 0), RSNA_IMAGE_SIZE - 8)
    return (float(x0), float(y0), float(min(round(w), RSNA_IMAGE_SIZE - x0)),
            float(min(round(h), RSNA_IMAGE_SIZE - y0)))


def sample_rsna_boxes(rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """The boxes of one positive patient (count and sides as in the real file)."""
    patterns = list(RSNA_BOX_PATTERNS)
    weights = np.asarray(list(RSNA_BOX_PATTERNS.values()), dtype=float)
    pattern = patterns[int(rng.choice(len(patterns), p=weights / weights.sum()))]
    return [sample_rsna_box(rng, half) for half in pattern]


def _rsna_demographics(rng: np.random.Generator, target: int) -> tuple[str, str, int]:
    view = "AP" if rng.random() < RSNA_AP_RATE[target] else "PA"
    sex = "M" if rng.random() < RSNA_MALE_RATE[target] else "F"
    return view, sex, _age(rng, RSNA_AGE_QUANTILES)


def sample_rsna_cases(rng: np.random.Generator, n: int) -> list[RsnaCase]:
    """`n` patients, exactly round(n × 22.5 %) of them positive, in random order."""
    n_pos = int(round(n * RSNA_POSITIVE_RATE))
    targets = np.zeros(n, dtype=int)
    targets[rng.permutation(n)[:n_pos]] = 1
    cases = []
    for target in targets:
        pid = random_uuid(rng)
        boxes = sample_rsna_boxes(rng) if target else []
        cases.append(RsnaCase(pid, boxes, *_rsna_demographics(rng, int(target))))
    return cases


def rsna_cases_from_csv(path: Path, n: int, rng: np.random.Generator) -> list[RsnaCase]:
    """The first `n` patients of a real RSNA label CSV with their boxes; view, sex and age are drawn."""
    rows = pd.read_csv(path, dtype={"patientId": str})
    missing = {"patientId", "x", "y", "width", "height", "Target"} - set(rows.columns)
    if missing:
        raise ValueError(f"{path}: not an RSNA label CSV (missing columns {sorted(missing)})")
    cases: dict[str, list[tuple[float, float, float, float]]] = {}
    targets: dict[str, int] = {}
    row: Any  # pandas-stubs gives a row's fields every scalar type, None and NaT included
    for row in rows.itertuples(index=False):
        pid = str(row.patientId)
        if pid not in cases:
            if len(cases) == n:
                break
            cases[pid], targets[pid] = [], 0
        targets[pid] = max(targets[pid], int(row.Target))
        box = (row.x, row.y, row.width, row.height)
        if not any(math.isnan(float(v)) for v in box):
            cases[pid].append(cast("tuple[float, float, float, float]", tuple(float(v) for v in box)))
    out = []
    for pid, boxes in cases.items():
        if targets[pid] and not boxes:
            raise ValueError(f"{path}: patient {pid} has Target 1 but no box")
        out.append(RsnaCase(pid, boxes, *_rsna_demographics(rng, targets[pid])))
    return out


# ---------------------------------------------------------------- NIH sampling


def sample_nih_findings(rng: np.random.Generator) -> tuple[str, ...]:
    """One image's findings: a common combination, or k rarer findings (co-occurrence kept)."""
    top = sum(count for _, count in NIH_TOP_COMBINATIONS)
    if rng.random() < top / NIH_N_IMAGES:
        names = [name for name, _ in NIH_TOP_COMBINATIONS]
        weights = np.asarray([count for _, count in NIH_TOP_COMBINATIONS], dtype=float)
        label = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        return () if label == NO_FINDING else tuple(label.split("|"))
    sizes = np.asarray(list(NIH_OTHER_SIZES), dtype=int)
    size_w = np.asarray(list(NIH_OTHER_SIZES.values()), dtype=float)
    k = int(rng.choice(sizes, p=size_w / size_w.sum()))
    names = list(NIH_OTHER_WEIGHTS)
    weights = np.asarray(list(NIH_OTHER_WEIGHTS.values()), dtype=float)
    picked = rng.choice(len(names), size=min(k, len(names)), replace=False, p=weights / weights.sum())
    return tuple(sorted(names[i] for i in picked))


def _images_for_patient(rng: np.random.Generator, cap: int) -> int:
    weights = np.asarray([count for *_, count in NIH_IMAGES_PER_PATIENT], dtype=float)
    lo, hi, _ = NIH_IMAGES_PER_PATIENT[int(rng.choice(len(weights), p=weights / weights.sum()))]
    return min(int(rng.integers(lo, hi + 1)), cap)


def sample_nih_cases(rng: np.random.Generator, n: int) -> list[NihCase]:
    """`n` images of patients 1, 2, …; some patients have several follow-ups (capped at n // 10)."""
    cap = max(1, n // 10)
    geo_w = np.asarray([g[4] for g in NIH_GEOMETRY], dtype=float)
    cases: list[NihCase] = []
    patient = 0
    while len(cases) < n:
        patient += 1
        count = min(_images_for_patient(rng, cap), n - len(cases))
        sex = "M" if rng.random() < NIH_MALE_RATE else "F"
        age = _age(rng, NIH_AGE_QUANTILES)
        findings: tuple[str, ...] = ()
        for follow_up in range(count):
            if follow_up == 0 or rng.random() > 0.35:  # follow-ups often keep the previous labels
                findings = sample_nih_findings(rng)
            view = "AP" if rng.random() < NIH_AP_RATE[int(bool(findings))] else "PA"
            age = min(age + int(rng.random() < 0.3), 95) if follow_up else age
            geometry = NIH_GEOMETRY[int(rng.choice(len(geo_w), p=geo_w / geo_w.sum()))][:4]
            cases.append(NihCase(patient, follow_up, findings, age, sex, view, geometry))
    return cases


def nih_cases_from_csv(path: Path, n: int) -> list[NihCase]:
    """The first `n` rows of a real NIH Data_Entry CSV (``.csv`` or ``.csv.gz``), verbatim."""
    rows = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=n)
    if "Image Index" not in rows.columns or "Finding Labels" not in rows.columns:
        raise ValueError(f"{path}: not an NIH Data_Entry CSV")
    cols = list(rows.columns)
    cases = []
    for values in rows.itertuples(index=False):
        row = dict(zip(cols, values, strict=True))
        labels = row["Finding Labels"]
        findings = () if labels == NO_FINDING else tuple(labels.split("|"))
        geometry = tuple(values[7:11]) if len(values) >= 11 else ("2500", "2048", "0.168", "0.168")
        cases.append(NihCase(int(row["Patient ID"]), int(row["Follow-up #"]), findings, int(row["Patient Age"]),
                             row["Patient Gender"], row["View Position"], geometry,
                             image_index=row["Image Index"]))
    return cases


def split_patients(cases: list[NihCase], rng: np.random.Generator) -> set[int]:
    """Patients of the test list: whole patients, about `NIH_TEST_FRACTION` of the images."""
    counts: dict[int, int] = {}
    for case in cases:
        counts[case.patient_id] = counts.get(case.patient_id, 0) + 1
    patients = sorted(counts)
    order = [patients[i] for i in rng.permutation(len(patients))]
    test: set[int] = set()
    target = NIH_TEST_FRACTION * len(cases)
    taken = 0
    for pid in order[:-1]:  # the last one always stays in train_val
        if taken >= target:
            break
        test.add(pid)
        taken += counts[pid]
    return test


# ---------------------------------------------------------------- what was written


@dataclass
class SynthSummary:
    """What `synth_dataset` wrote.

    `n_positive`: RSNA patients with Target 1, or NIH images with at least one finding. `findings`:
    images per finding. `phi`: every fake identifying value written into the DICOM headers, by field
    (empty for NIH, whose PNGs carry none), for tests that check a reader never leaks them.
    """

    layout: str
    out: Path
    n_images: int
    n_patients: int
    n_positive: int
    findings: dict[str, int]
    n_boxes: int = 0
    phi: dict[str, list[str]] = field(default_factory=dict)
