"""Synthetic NIH ChestX-ray14 dataset, in the layout of the NIH release.

``out/Data_Entry_2017_v2020.csv`` (the real header, verbatim), ``out/images/<Image Index>`` (8-bit
greyscale PNG), ``out/train_val_list.txt`` and ``out/test_list.txt`` (the official split: whole
patients, one Image Index per line). Follow-ups of one patient share the patient's anatomy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.data.synth import phantom
from cbir.data.synth.labels import NIH_FINDINGS, NihCase, SynthSummary, split_patients

LABELS_CSV = "Data_Entry_2017_v2020.csv"
IMAGE_DIR = "images"
SPLIT_FILES = ("train_val_list.txt", "test_list.txt")
#: The header line of the real file: two column names contain a comma and are not quoted.
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
LAYOUT_ID = 2


def csv_line(case: NihCase) -> str:
    return ",".join([case.image_index, case.finding_labels, str(case.follow_up), str(case.patient_id),
                     str(case.age), case.sex, case.view, *case.geometry])


def render_case(case: NihCase, size: int, seed: int, rng: np.random.Generator) -> np.ndarray:
    """The phantom of one image (uint8): the patient's anatomy, this film's pose, its findings."""
    patient_rng = np.random.default_rng([seed, LAYOUT_ID, 2, case.patient_id])
    anatomy = phantom.sample_anatomy(patient_rng, case.sex, case.age)
    anatomy = phantom.sample_pose(anatomy, rng, ap=case.view == "AP")
    findings = [f for f in case.findings if f in phantom.FINDINGS]
    return phantom.to_uint8(phantom.render(anatomy, size, rng, findings=findings))


def write_nih(cases: list[NihCase], size: int, out: Path, seed: int,
              progress: Callable[[int], None] | None = None) -> SynthSummary:
    """Render and write `cases` in the NIH layout under `out`."""
    images = out / IMAGE_DIR
    images.mkdir(parents=True, exist_ok=True)
    for index, case in enumerate(cases):
        rng = np.random.default_rng([seed, LAYOUT_ID, 1, index])
        Image.fromarray(render_case(case, size, seed, rng)).save(images / case.image_index)
        if progress is not None:
            progress(1)
    (out / LABELS_CSV).write_text("\n".join([HEADER, *(csv_line(c) for c in cases)]) + "\n")
    test = split_patients(cases, np.random.default_rng([seed, LAYOUT_ID, 3]))
    for name, in_test in zip(SPLIT_FILES, (False, True), strict=True):
        names = sorted(c.image_index for c in cases if (c.patient_id in test) == in_test)
        (out / name).write_text("".join(f"{n}\n" for n in names))
    counts = {name: sum(name in c.findings for c in cases) for name in NIH_FINDINGS}
    return SynthSummary(
        layout="nih", out=out, n_images=len(cases), n_patients=len({c.patient_id for c in cases}),
        n_positive=sum(bool(c.findings) for c in cases), findings=counts,
    )
