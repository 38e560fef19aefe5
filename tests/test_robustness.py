"""`cbir evaluate --robustness`: the re-encodings, the rank of the original, and the report block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cbir.evaluation.reencode import REENCODINGS, reencode_all
from cbir.evaluation.robustness import ranks_of_originals
from cbir.io import read_image
from tests.conftest import run_cli


def _xray(size: int = 240) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    return np.clip(0.2 + 0.6 * np.exp(-((xx - 0.35) ** 2 + (yy - 0.5) ** 2) * 8)
                   + 0.1 * np.sin(xx * 40) * yy, 0, 1).astype(np.float32)


def test_every_reencoding_reads_back_as_the_same_picture(tmp_path: Path) -> None:
    pixels = _xray()
    files = reencode_all(pixels, tmp_path, "q0")
    assert set(files) == set(REENCODINGS) and len({p.name for p in files.values()}) == len(files)
    for name, path in files.items():
        back = read_image(path).pixels
        if name == "jpeg60":
            assert back.shape == (180, 180)   # 3/4 of a side under 533 px
        if name == "crop-dicom12":
            assert back.shape == (226, 226)
            reference = pixels[7:233, 7:233]
        else:
            reference = np.asarray(pixels if back.shape == pixels.shape else
                                   pixels[::4, ::4][:back.shape[0], :back.shape[1]])
        if back.shape == reference.shape:
            assert np.corrcoef(back.ravel(), reference.ravel())[0, 1] > 0.9, name   # polarity kept


def test_the_dicom_copy_is_12_bit_monochrome1_without_patient_data(tmp_path: Path) -> None:
    path = reencode_all(_xray(), tmp_path, "q1", ["crop-dicom12"])["crop-dicom12"]
    ds = pydicom.dcmread(path)
    assert (ds.PhotometricInterpretation, ds.BitsStored, ds.Modality) == ("MONOCHROME1", 12, "DX")
    assert int(ds.pixel_array.max()) <= 4095 and "PatientName" not in ds and "PatientID" not in ds


def test_rank_of_the_original_by_hand() -> None:
    archive = np.array([[1.0, 0.0], [0.0, 1.0]])
    originals = np.array([[0.6, 0.8], [0.8, 0.6]])
    copies = np.array([[0.62, 0.78], [0.0, 1.0], [0.8, 0.6]])
    ranks = ranks_of_originals(archive, originals, copies, np.array([0, 0, 0]))
    # copy 0 is nearest its original; copy 1 equals archive point 1 (cos 1 > 0.8); copy 2 equals original 1
    assert ranks.tolist() == [1, 2, 2]
    hidden = np.array([[False, False], [False, True], [False, False]])
    assert ranks_of_originals(archive, originals, copies, np.array([0, 0, 0]), hidden).tolist() == [1, 1, 2]


def test_evaluate_robustness_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile
    scratch = tmp_path / "scratch"   # this run's temporary folders only (another process may be evaluating)
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    data, model, index = tmp_path / "data", tmp_path / "model", tmp_path / "index"
    assert run_cli("synth", "--layout", "rsna", "--n", 40, "--size", 64, "--out", data, "--seed", 5)[0] == 0
    code, _, err = run_cli("train", "--data", data, "--task", "binary", "--backbone", "test_resnet", "--image-size",
                           32, "--epochs", 1, "--embed-dim", 16, "--bits", 32, "--out", model, "--workers", 0)
    assert code == 0, err
    assert run_cli("ingest", "--data", data, "--model", model, "--index", index, "--workers", 0)[0] == 0
    code, out, err = run_cli("evaluate", "--index", index, "--k", 3, "--out", tmp_path / "rep", "--robustness")
    assert code == 0, err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    block = report["robustness"]
    assert set(block["reencodings"]) == set(REENCODINGS) and block["failures"] == 0
    for row in block["reencodings"].values():
        assert row["n"] == report["n_queries"] and 0 <= row["rank1"] <= 1 and row["median_rank"] >= 1
        assert row["rank1_ci"][0] <= row["rank1"] <= row["rank1_ci"][1]
        assert set(row["change"]) == {"roc_auc", "knn_accuracy", "balanced_accuracy", "map_at_k"}
    assert "## Robustness to re-encoding" in (tmp_path / "rep" / "report.md").read_text()
    assert not list(scratch.glob("cbir-robustness-*"))   # the scratch copies are gone


def test_robustness_without_the_images_is_one_line(tmp_path: Path) -> None:
    data, model, index = tmp_path / "data", tmp_path / "model", tmp_path / "index"
    assert run_cli("synth", "--layout", "rsna", "--n", 20, "--size", 48, "--out", data, "--seed", 6)[0] == 0
    assert run_cli("train", "--data", data, "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1,
                   "--embed-dim", 16, "--bits", 32, "--out", model, "--workers", 0)[0] == 0
    assert run_cli("ingest", "--data", data, "--model", model, "--index", index, "--workers", 0)[0] == 0
    data.rename(tmp_path / "moved")
    code, _, err = run_cli("evaluate", "--index", index, "--k", 3, "--out", tmp_path / "rep", "--robustness")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--queries" in err
