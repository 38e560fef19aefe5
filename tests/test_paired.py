"""Paired comparison of two models on the same queries (`cbir.evaluation.paired`, `cbir.app.compare`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cbir.app.compare import compare_runs, evaluations
from cbir.errors import CbirError
from cbir.evaluation.paired import NotPaired, paired_difference, verdict
from cbir.evaluation.pooled import pool_queries


def per_query(target: np.ndarray, probability: np.ndarray, k: int = 10) -> dict:
    """An evaluation's per_query dict whose votes and AP follow its probabilities (one patient per query)."""
    predicted = (probability >= 0.5).astype(int)
    return {"target": target.tolist(), "probability": probability.tolist(), "vote": predicted.tolist(),
            "weighted_vote": predicted.tolist(), "ap": (predicted == target).astype(float).tolist(),
            "group": list(range(len(target))), "majority_label": 0, "operating_point": 0.5, "k": k}


@pytest.fixture
def two_models() -> tuple[dict, dict]:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    good = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.25, y.size), 0, 1)    # separates the classes
    weak = np.clip(0.5 + (y - 0.5) * 0.1 + rng.normal(0, 0.25, y.size), 0, 1)    # barely
    return per_query(y, good), per_query(y, weak)


def test_a_clearly_better_model_is_better_beyond_the_noise_and_the_reverse_worse(two_models: tuple) -> None:
    good, weak = two_models
    ahead = paired_difference([good], [weak])["measures"]
    assert set(ahead) == {"roc_auc", "model_balanced_accuracy", "knn_balanced_accuracy", "vote_balanced_accuracy",
                          "map_at_k"}
    assert all(m["verdict"] == "better" and m["interval"][0] > 0 for m in ahead.values())
    behind = paired_difference([weak], [good])["measures"]
    assert all(m["verdict"] == "worse" for m in behind.values())
    assert behind["roc_auc"]["difference"] == pytest.approx(-ahead["roc_auc"]["difference"])
    # the point values are the pooled figures of each model alone
    assert ahead["roc_auc"]["a"] == pytest.approx(pool_queries([good], 10)["roc_auc"])
    assert ahead["vote_balanced_accuracy"]["b"] == pytest.approx(pool_queries([weak], 10)["vote_balanced_accuracy"])


def test_the_paired_interval_is_narrower_than_the_two_separate_intervals_suggest(two_models: tuple) -> None:
    """Two models that rank alike but for a few queries: their separate intervals overlap widely, while the paired
    interval of the difference is far narrower (the shared spread of the patients cancels)."""
    good, _ = two_models
    rng = np.random.default_rng(2)
    nudged = dict(good, probability=np.clip(np.asarray(good["probability"]) + rng.normal(0, 0.02, 300), 0, 1)
                  .tolist())
    result = paired_difference([good], [nudged])["measures"]["roc_auc"]
    alone = pool_queries([good], 10)["roc_auc_ci"]
    assert result["interval"][1] - result["interval"][0] < 0.5 * (alone[1] - alone[0])


def test_the_same_outcomes_are_level_and_one_class_sets_have_no_auc() -> None:
    y = np.zeros(40, dtype=int)
    normal = per_query(y, np.linspace(0, 0.8, 40))
    result = paired_difference([normal], [normal])
    assert "roc_auc" not in result["measures"] and result["n_queries"] == 40
    assert all(m["difference"] == 0 and m["verdict"] == "level" for m in result["measures"].values())
    assert verdict(None) == "n/a" and verdict([0.01, 0.2]) == "better" and verdict([-0.2, -0.01]) == "worse"


def test_outcomes_of_other_queries_are_refused(two_models: tuple) -> None:
    good, weak = two_models
    with pytest.raises(NotPaired, match="1 evaluations against 2"):
        paired_difference([good], [weak, weak])
    shifted = dict(weak, target=weak["target"][1:] + weak["target"][:1])
    with pytest.raises(NotPaired, match="labels or patients differ"):
        paired_difference([good], [shifted])
    with pytest.raises(NotPaired, match="k = 10 against 5"):
        paired_difference([good], [dict(weak, k=5)])
    with pytest.raises(NotPaired, match="no evaluations"):
        paired_difference([], [])


def write(root: Path, relative: str, body: dict) -> None:
    (root / relative).mkdir(parents=True, exist_ok=True)
    (root / relative / "per_query.json").write_text(json.dumps(body))


def test_runs_pair_their_evaluations_by_name_and_pool_folds(tmp_path: Path, two_models: tuple) -> None:
    good, weak = two_models
    half = {key: (value[:150] if isinstance(value, list) else value) for key, value in good.items()}
    rest = {key: (value[150:] if isinstance(value, list) else value) for key, value in good.items()}
    for fold, part in ((1, half), (2, rest)):
        write(tmp_path / "new", f"reports/fold{fold}/binary", part)
        write(tmp_path / "new", f"reports/fold{fold}/multilabel-nih-fold{fold}", part)
    write(tmp_path / "old", "reports/fold1/binary", {k: (v[:150] if isinstance(v, list) else v)
                                                      for k, v in weak.items()})
    write(tmp_path / "old", "reports/fold2/binary", {k: (v[150:] if isinstance(v, list) else v)
                                                      for k, v in weak.items()})
    found = evaluations(tmp_path / "new")
    assert list(found) == ["binary", "multilabel-nih"] and [p.parent.parent.name for p in found["binary"]] == [
        "fold1", "fold2"]
    result = compare_runs(tmp_path / "new", tmp_path / "old")
    assert list(result["evaluations"]) == ["binary"] and result["only_a"] == ["multilabel-nih"]
    binary = result["evaluations"]["binary"]
    assert binary["n_queries"] == 300 and binary["measures"]["roc_auc"]["verdict"] == "better"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CbirError, match="no evaluations"):
        compare_runs(tmp_path / "new", tmp_path / "empty")
    write(tmp_path / "shift", "rsna---kermany", good)
    with pytest.raises(CbirError, match="share no evaluation"):
        compare_runs(tmp_path / "new", tmp_path / "shift")
    (tmp_path / "bad" / "binary").mkdir(parents=True)
    (tmp_path / "bad" / "binary" / "per_query.json").write_text("{not json")
    with pytest.raises(CbirError, match="not a readable per_query.json"):
        compare_runs(tmp_path / "bad", tmp_path / "bad")
    (tmp_path / "bad" / "binary" / "per_query.json").write_text(json.dumps(dict(good, probability=[0.5])))
    with pytest.raises(CbirError, match="differ in length"):
        compare_runs(tmp_path / "bad", tmp_path / "bad")
