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


def test_appearance_study_scores_every_variant_on_validation_only(data: Path, tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    code, out, err = run_cli("study", "appearance", "--data", data, "--out", tmp_path / "s", "--use-fold", 2,
                             "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1, "--doc", doc)
    assert code == 0, err
    from cbir.studies.appearance import REENCODINGS, VARIANTS, WEIGHTS, _pooled, choose
    result = json.loads((tmp_path / "s" / "appearance.json").read_text())
    (fold,) = result["folds"]
    dev = development_records(StudyOptions(data=data, out=tmp_path), 2)
    assert fold["n_val"] == len(dev.split("val")) and fold["n_train"] == len(dev.split("train"))
    assert len(fold["grid"]) == 1 + len(VARIANTS) * len(WEIGHTS)
    for scored in fold["grid"].values():
        assert len(scored["called"]) == fold["n_val"] and set(scored["rank1"]) == set(REENCODINGS)
    pooled = {key: _pooled(result["folds"], key) for key in fold["grid"]}
    assert all(0 <= p[name] <= 1 for p in pooled.values() for name in REENCODINGS)
    assert "<!-- cbir:study-appearance -->" in doc.read_text() and "Chosen: **" in out
    assert choose(pooled) in pooled
    # --models takes a reproduce-style folder's model when its split is the study's, and refuses another split
    import shutil
    shutil.copytree(tmp_path / "s" / "fold2", tmp_path / "m" / "fold2" / "binary")
    given = ("study", "appearance", "--data", data, "--use-fold", 2, "--image-size", 32, "--models", tmp_path / "m")
    code, _, err = run_cli(*given, "--out", tmp_path / "t")
    assert code == 0, err
    again = json.loads((tmp_path / "t" / "appearance.json").read_text())["folds"][0]["grid"]
    assert again == fold["grid"]
    code, _, err = run_cli(*given, "--out", tmp_path / "u", "--val-fraction", 0.3)
    assert code == 2 and "trained with split" in err and "Traceback" not in err
    code, _, err = run_cli(*given[:-1], tmp_path, "--out", tmp_path / "v")
    assert code == 2 and "no binary model with a recorded split" in err


def test_appearance_choice_keeps_the_vote_within_its_noise() -> None:
    from cbir.studies.appearance import REENCODINGS, choose
    flat = dict.fromkeys(REENCODINGS, 0.5)
    pooled = {"none": {"balanced": 0.75, "balanced_ci": [0.70, 0.80], **flat},
              "16/1/0.3": {"balanced": 0.74, **dict.fromkeys(REENCODINGS, 0.90)},
              "16/1/0.5": {"balanced": 0.60, **dict.fromkeys(REENCODINGS, 0.99)},   # the vote got worse
              "16/1/0.6": {"balanced": 0.76, **dict.fromkeys(REENCODINGS, 1.00)}}   # above the largest weight
    assert choose(pooled) == "16/1/0.3"
    assert choose({"none": pooled["none"], "16/1/0.5": pooled["16/1/0.5"]}) == "none"
