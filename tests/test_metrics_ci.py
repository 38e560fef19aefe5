"""cbir.metrics_ci: weighted metrics against scikit-learn, and the patient bootstrap's intervals."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as sk

from cbir import metrics
from cbir.metrics_ci import Bootstrap, weighted_auc, weighted_balanced_accuracy, weighted_mean


@pytest.mark.parametrize("seed", range(4))
def test_weighted_auc_is_the_auc_of_repeated_samples(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(60) < 0.4).astype(int)
    scores = rng.integers(0, 6, 60).astype(float) + y  # many ties
    w = rng.integers(0, 4, 60).astype(float)
    repeated = np.repeat(np.arange(60), w.astype(int))
    assert weighted_auc(y, scores, np.ones(60)) == pytest.approx(metrics.roc_auc(y, scores), abs=1e-12)
    assert weighted_auc(y, scores, w) == pytest.approx(sk.roc_auc_score(y[repeated], scores[repeated]), abs=1e-12)
    assert weighted_auc(y, scores, w) == pytest.approx(sk.roc_auc_score(y, scores, sample_weight=w), abs=1e-12)


def test_weighted_balanced_accuracy_and_mean_match_sklearn() -> None:
    rng = np.random.default_rng(7)
    y = (rng.random(80) < 0.3).astype(int)
    pred = np.where(rng.random(80) < 0.8, y, 1 - y)
    w = rng.integers(0, 3, 80).astype(float)
    assert weighted_balanced_accuracy(y, pred, w) == pytest.approx(
        sk.balanced_accuracy_score(y, pred, sample_weight=w), abs=1e-12)
    values = rng.random(80)
    values[3] = np.nan  # undefined values (a query with no AP) are left out
    ok = ~np.isnan(values)
    assert weighted_mean(values, w) == pytest.approx(np.average(values[ok], weights=w[ok]))


def test_the_bootstrap_draws_patients_not_images() -> None:
    groups = np.repeat(np.arange(50), 3)  # 50 patients, 3 images each
    boot = Bootstrap.by_group(groups, n_boot=200, seed=1)
    assert boot.weights.shape == (200, 150)
    by_patient = boot.weights.reshape(200, 50, 3)
    assert (by_patient == by_patient[:, :, :1]).all()  # a patient's images come along together
    assert (boot.weights.sum(axis=1) == 150).all()      # 50 patients drawn, 3 images each
    assert (Bootstrap.by_group(groups, n_boot=200, seed=1).weights == boot.weights).all()  # seeded


def test_intervals_have_the_width_of_the_sampling_error() -> None:
    rng = np.random.default_rng(3)
    correct = (rng.random(500) < 0.5).astype(float)
    low, high = Bootstrap.by_group(np.arange(500), n_boot=2000).interval(lambda w: weighted_mean(correct, w))
    assert low < correct.mean() < high
    expected = 2 * 1.96 * np.sqrt(0.25 / 500)  # normal approximation of a proportion's 95 % interval
    assert high - low == pytest.approx(expected, rel=0.15)
    # The same outcomes, repeated 4 times per patient: 125 patients carry the information, not 500 images.
    repeated = np.repeat(correct[:125], 4)
    by_image = Bootstrap.by_group(np.arange(500)).interval(lambda w: weighted_mean(repeated, w))
    by_patient = Bootstrap.by_group(np.repeat(np.arange(125), 4)).interval(lambda w: weighted_mean(repeated, w))
    assert (by_patient[1] - by_patient[0]) > 1.7 * (by_image[1] - by_image[0])


def test_an_undefined_statistic_gives_no_interval() -> None:
    y = np.zeros(20, int)  # one class: AUC undefined in every replicate
    assert Bootstrap.by_group(np.arange(20), n_boot=50).interval(lambda w: weighted_auc(y, np.arange(20.0), w)) \
        is None


def test_pooling_folds_concatenates_queries_and_keeps_patients_apart() -> None:
    from cbir.evaluation.pooled import pool_queries
    rng = np.random.default_rng(5)
    folds = []
    for _ in range(3):
        y = (rng.random(40) < 0.3).astype(int)
        folds.append({"target": y.tolist(), "probability": np.clip(y * 0.4 + rng.random(40) * 0.6, 0, 1).tolist(),
                      "vote": np.where(rng.random(40) < 0.8, y, 1 - y).tolist(),
                      "ap": [None if i == 0 else float(v) for i, v in enumerate(rng.random(40))],
                      "group": (np.arange(40) // 2).tolist(), "majority_label": 0})
    pooled = pool_queries(folds, k=10)
    y = np.concatenate([f["target"] for f in folds])
    vote = np.concatenate([f["vote"] for f in folds])
    prob = np.concatenate([f["probability"] for f in folds])
    assert pooled["n_queries"] == 120 and pooled["n_patients"] == 60  # group ids repeat across folds, patients don't
    assert pooled["knn_accuracy"] == pytest.approx(np.mean(vote == y))
    assert pooled["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, vote))
    assert pooled["roc_auc"] == pytest.approx(sk.roc_auc_score(y, prob))
    assert pooled["majority_accuracy"] == pytest.approx(np.mean(y == 0))
    aps = [a for f in folds for a in f["ap"] if a is not None]
    assert pooled["map_at_k"] == pytest.approx(np.mean(aps))
    for key in ("roc_auc", "knn_accuracy", "balanced_accuracy", "map_at_k"):
        low, high = pooled[f"{key}_ci"]
        assert low <= pooled[key] <= high
    assert pool_queries([], 10) == {}


def test_vote_minus_model_is_paired_and_pooled() -> None:
    """Stage 2 against stage 1 on the same queries: the difference of balanced accuracies, with an interval from
    one bootstrap of patients for both (so a vote equal to the model has a zero-width interval)."""
    from cbir.evaluation.pooled import pool_queries
    from cbir.evaluation.summary import vote_summary
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    prob = np.clip(y * 0.3 + rng.random(400) * 0.7, 0, 1)
    model = (prob >= 0.5).astype(int)
    vote = np.where(rng.random(400) < 0.8, y, 1 - y)
    groups = np.arange(400) // 2
    s = vote_summary(y, prob, vote, vote.astype(float), groups)
    expect = metrics.balanced_accuracy(y, vote) - metrics.balanced_accuracy(y, model)
    assert s["minus_model_balanced_accuracy"] == pytest.approx(expect)
    low, high = s["minus_model_balanced_accuracy_ci"]
    assert low < expect < high and high - low < 0.2
    same = vote_summary(y, prob, model, prob, groups)
    assert same["minus_model_balanced_accuracy"] == 0 and same["minus_model_balanced_accuracy_ci"] == [0.0, 0.0]
    def fold(part: slice) -> dict:
        return {"target": y[part].tolist(), "probability": prob[part].tolist(), "vote": vote[part].tolist(),
                "ap": [0.5] * 200, "group": groups[part].tolist(), "majority_label": 0,
                "weighted_vote": vote[part].tolist()}

    half, other = fold(slice(0, 200)), fold(slice(200, 400))
    pooled = pool_queries([half, other], 10)
    assert pooled["vote_balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy(y, vote))
    assert pooled["vote_minus_model_balanced_accuracy"] == pytest.approx(expect)
    assert "vote_balanced_accuracy" not in pool_queries([{k: v for k, v in half.items() if k != "weighted_vote"}], 10)
