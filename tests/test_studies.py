"""`cbir study`: every study runs end to end on a tiny set, never reads a test patient, and writes its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbir.data.layout import load_dataset
from cbir.data.synth import synth_dataset
from cbir.studies.common import StudyOptions, development_records
from cbir.studies.selection import RULES, pick
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study") / "rsna"
    synth_dataset("rsna", 70, 40, root, seed=8)
    return root


def test_development_data_holds_no_test_patient(data: Path, tmp_path: Path) -> None:
    options = StudyOptions(data=data, out=tmp_path, folds=5)
    for fold in (1, 3):
        dev = development_records(options, fold)
        test = load_dataset(data, "rsna", split=options.spec(fold)).split("test")
        assert len(test) and not set(dev.meta["patient"]) & set(test.meta["patient"])
        assert set(dev.meta["split"]) == {"train", "val"}


def test_pick_rules() -> None:
    assert pick([0.6, 0.8, 0.7], last=False) == 1 and pick([0.6, 0.8, 0.7], last=True) == 2
    assert pick([float("nan"), 0.5], last=False) == 1


@pytest.mark.parametrize("name", ["selection", "hash-weights", "detector", "pooling"])
def test_each_study_runs_and_writes_its_section(name: str, data: Path, tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    epochs = 2 if name == "selection" else 1
    code, out, err = run_cli("study", name, "--data", data, "--out", tmp_path / "s", "--use-fold", 2,
                             "--backbone", "test_resnet", "--image-size", 32, "--epochs", epochs, "--doc", doc)
    assert code == 0, err
    result = json.loads((tmp_path / "s" / f"{name}.json").read_text())
    assert f"<!-- cbir:study-{name} -->" in doc.read_text() and "± " in doc.read_text() and "|---|" in doc.read_text()
    if name == "selection":
        (fold,) = result["folds"]
        assert set(fold["rules"]) == set(RULES) and all(len(c) == epochs for c in fold["curves"].values())
        assert fold["n_a"] + fold["n_b"] == len(development_records(StudyOptions(data=data, out=tmp_path), 2)
                                                .split("val"))
    else:
        assert result["runs"] and all(r["fold"] == 2 for r in result["runs"])
        assert all(0 <= r["knn_accuracy" if name != "hash-weights" else "hamming_map_at_k"] <= 1
                   for r in result["runs"])


def test_an_unknown_study_or_fold_is_one_line(data: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("study", "nope", "--data", data, "--out", tmp_path)
    assert code == 2 and "unknown study" in err
    code, _, err = run_cli("study", "selection", "--data", data, "--out", tmp_path, "--use-fold", 9)
    assert code == 2 and "1..5" in err


def test_render_rebuilds_the_table_from_the_saved_results(data: Path, tmp_path: Path) -> None:
    assert run_cli("study", "selection", "--data", data, "--out", tmp_path / "s", "--use-fold", 1, "--backbone",
                   "test_resnet", "--image-size", 32, "--epochs", 1)[0] == 0
    first = (tmp_path / "s" / "selection.md").read_text()
    (tmp_path / "s" / "selection.md").unlink()
    code, out, err = run_cli("study", "selection", "--out", tmp_path / "s", "--render", "--doc", tmp_path / "d.md")
    assert code == 0, err
    assert (tmp_path / "s" / "selection.md").read_text() == first and first.strip() in (tmp_path / "d.md").read_text()
    code, out, err = run_cli("study", "detector", "--out", tmp_path / "s", "--render")
    assert code == 2 and "detector.json" in err
