"""`cbir study shift` end to end on tiny synthetic stand-ins for RSNA and Kermany."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import run_cli


def _kermany(root: Path, n: int = 16) -> Path:
    """A Kermany-named folder: NORMAL (IM-… and the NORMAL2- batch) and PNEUMONIA (personN_…)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        for label, name in (("NORMAL", f"IM-{i:04d}-0001.jpeg"), ("NORMAL", f"NORMAL2-IM-{i:04d}-0001.jpeg"),
                            ("PNEUMONIA", f"person{i}_bacteria_{i}.jpeg")):
            folder = root / label
            folder.mkdir(parents=True, exist_ok=True)
            base = 0.3 if label == "NORMAL" else 0.6
            pixels = np.clip(base + 0.2 * rng.random((48, 48)), 0, 1)
            Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / name)
    return root


def test_shift_study_writes_every_proxy_for_every_recipe(tmp_path: Path) -> None:
    rsna = tmp_path / "rsna"
    assert run_cli("synth", "--layout", "rsna", "--n", 60, "--size", 48, "--out", rsna, "--seed", 11)[0] == 0
    doc = tmp_path / "results.md"
    doc.write_text("# R\n\n<!-- cbir:study-shift -->\n<!-- /cbir:study-shift -->\n")
    code, out, err = run_cli("study", "shift", "--data", rsna, "--other", _kermany(tmp_path / "kermany"), "--out",
                             tmp_path / "study", "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1,
                             "--device", "cpu", "--doc", doc)
    assert code == 0, err
    result = json.loads((tmp_path / "study" / "shift.json").read_text())
    from cbir.studies.shift import PROXIES, RECIPES
    assert set(result["rows"]) == {p[0] for p in PROXIES}
    for by_recipe in result["rows"].values():
        assert set(by_recipe) == set(RECIPES)
    normal2 = result["rows"]["Kermany → NORMAL2 (specificity)"]
    assert all(r["n_queries"] == 16 for r in normal2.values())          # only the NORMAL2 images
    pa_ap = next(iter(result["rows"]["RSNA PA → AP"].values()))
    assert set(pa_ap["rank1"]) == {"jpeg60", "crop-dicom12", "blur-gamma", "rotate5"}
    assert "Recipes against shift proxies" in doc.read_text()
    code, _, err = run_cli("study", "shift", "--data", rsna, "--out", tmp_path / "s2")
    assert code == 2 and "--other" in err
