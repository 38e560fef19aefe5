"""cbir.metrics: hand-computed cases and cross-checks against scikit-learn (test-only dependency)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import sklearn.metrics as sk  # the test extra installs scikit-learn

from cbir import metrics


def _binary_case(seed: int, n: int = 200, tied: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    noise = rng.integers(0, 5, n).astype(float) if tied else rng.normal(size=n)
    return y, noise + 1.5 * y * rng.random(n).round(1)


# --- ROC -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tied", [True, False])
def test_roc_auc_matches_sklearn(seed: int, tied: bool) -> None:
    y, s = _binary_case(seed, tied=tied)
    assert metrics.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)


def test_roc_auc_hand_cases() -> None:
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert metrics.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # One positive tied with one of two negatives, above the other: (1 + 0.5) / 2.
    assert metrics.roc_auc([1, 0, 0], [0.5, 0.5, 0.1]) == 0.75
    assert metrics.roc_auc(np.array([True, False]), [2, 1]) == 1.0


def test_roc_auc_undefined_and_invalid() -> None:
    assert math.isnan(metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(metrics.roc_auc([0, 0], [0.1, 0.2]))
    assert math.isnan(metrics.roc_auc([], []))
    with pytest.raises(ValueError):
        metrics.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        metrics.roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError):
        metrics.roc_auc([0, 1], [0.1])


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_matches_sklearn(seed: int) -> None:
    y, s = _binary_case(seed)
    fpr, tpr, thr = metrics.roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf and (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    # The trapezoidal area under the curve is the Mann–Whitney AUC (ties become diagonal segments).
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(metrics.roc_auc(y, s), abs=1e-12)


def test_roc_curve_single_class_is_nan() -> None:
    fpr, tpr, _ = metrics.roc_curve([1, 1], [0.2, 0.4])
    assert np.isnan(fpr).all() and tpr.tolist() == [0.0, 0.5, 1.0]


def test_per_class_auc_matches_sklearn() -> None:
    rng = np.random.default_rng(7)
    Y = (rng.random((150, 4)) < [0.2, 0.5, 0.1, 0.4]).astype(int)
    S = rng.integers(0, 6, (150, 4)) + Y * rng.random((150, 4))
    np.testing.assert_allclose(metrics.per_class_auc(Y, S), sk.roc_auc_score(Y, S, average=None))
    Y[:, 2] = 0
    assert math.isnan(metrics.per_class_auc(Y, S)[2])
    with pytest.raises(ValueError):
        metrics.per_class_auc(Y, S[:, :3])


# --- Classification --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_balanced_accuracy_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.choice(4, 120, p=[0.6, 0.2, 0.15, 0.05])
    pred = np.where(rng.random(120) < 0.6, y, rng.integers(0, 5, 120))  # label 4 never occurs in y
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sk.balanced_accuracy_score(y, pred)
    assert metrics.balanced_accuracy(y, pred) == pytest.approx(expected, abs=1e-12)


def test_balanced_accuracy_hand_case() -> None:
    # Recall of class 0: 2/3, of class 1: 1/1; class 2 (predicted only) does not count.
    assert metrics.balanced_accuracy([0, 0, 0, 1], [0, 0, 2, 1]) == pytest.approx((2 / 3 + 1) / 2)
    assert math.isnan(metrics.balanced_accuracy([], []))


def test_majority_baseline() -> None:
    base = metrics.majority_baseline([0, 0, 1], [0, 1, 1, 1])
    assert (base.label, base.accuracy, base.balanced_accuracy) == (0, 0.25, 0.5)
    label, accuracy = base
    assert (label, accuracy) == (0, 0.25)
    assert isinstance(base.label, int)
    assert metrics.majority_baseline([1, 1, 0, 0], [1]).label == 0  # tie: the smallest label
    assert metrics.majority_baseline([1, 1, 0], [0, 0]).balanced_accuracy == 0.0
    with pytest.raises(ValueError):
        metrics.majority_baseline([], [0, 1])


# --- Retrieval -------------------------------------------------------------------------------------


def test_knn_vote_majority_and_tie_break() -> None:
    labels = np.array([[1, 0, 0, 1, 0], [2, 2, 1, 1, 1], [3, 1, 2, 2, 2], [0, 1, 1, 0, 1]])
    pred, frac = metrics.knn_vote(labels, 4)
    # Row 0: 1 and 0 tie 2–2, 1 ranks first; row 1: 2 ranks first; row 2: 2 wins 2–1–1; row 3: 0 first.
    assert pred.tolist() == [1, 2, 2, 0]
    np.testing.assert_allclose(frac, [0.5, 0.5, 0.5, 0.5])
    pred, frac = metrics.knn_vote(labels, 5)
    assert pred.tolist() == [0, 1, 2, 1]
    np.testing.assert_allclose(frac, [0.6, 0.6, 0.6, 0.6])
    pred, frac = metrics.knn_vote(labels, 3)
    assert pred.tolist() == [0, 2, 3, 1]  # row 2: three-way tie, best rank wins
    np.testing.assert_allclose(frac, [2 / 3, 2 / 3, 1 / 3, 2 / 3])
    pred, frac = metrics.knn_vote(labels, 1)
    assert pred.tolist() == labels[:, 0].tolist() and (frac == 1).all()


def test_knn_vote_invalid_k() -> None:
    with pytest.raises(ValueError):
        metrics.knn_vote(np.zeros((2, 3), int), 4)
    with pytest.raises(ValueError):
        metrics.knn_vote(np.zeros((2, 3), int), 0)
    pred, frac = metrics.knn_vote(np.zeros((0, 3), int), 3)
    assert pred.shape == frac.shape == (0,)


RELEVANT = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 1]], dtype=bool)


def test_precision_at_k_hand_case() -> None:
    assert metrics.precision_at_k(RELEVANT, 1) == pytest.approx(1 / 3)
    assert metrics.precision_at_k(RELEVANT, 2) == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert metrics.precision_at_k(RELEVANT, 4) == pytest.approx((0.5 + 0.25 + 0.5) / 3)
    curve = metrics.precision_at_ks(RELEVANT, range(1, 5))
    assert list(curve) == [1, 2, 3, 4] and curve[2] == metrics.precision_at_k(RELEVANT, 2)
    with pytest.raises(ValueError):
        metrics.precision_at_k(RELEVANT, 5)


def test_average_precision_at_k_hand_case() -> None:
    # Hits at ranks 1 and 3 of 4, and R relevant items in the archive: (1/1 + 2/3) / min(k, R).
    assert metrics.average_precision_at_k(RELEVANT[0], 4, n_relevant=2) == pytest.approx(5 / 6)
    assert metrics.average_precision_at_k(RELEVANT[0], 4, n_relevant=3) == pytest.approx(5 / 9)
    assert metrics.average_precision_at_k(RELEVANT[0], 4, n_relevant=10) == pytest.approx(5 / 12)
    assert metrics.average_precision_at_k(RELEVANT[0], 2, n_relevant=10) == pytest.approx(1 / 2)
    # One hit at rank 4 with R = 1: P@4 · 1 / 1.
    assert metrics.average_precision_at_k(RELEVANT[1], 4, n_relevant=1) == pytest.approx(1 / 4)
    assert metrics.average_precision_at_k(RELEVANT[1], 3, n_relevant=1) == 0.0  # no hit in the top 3
    # Hits at ranks 2 and 4, R = 5: (1/2 + 2/4) / 4.
    assert metrics.average_precision_at_k(RELEVANT[2], 4, n_relevant=5) == pytest.approx(0.25)
    assert metrics.average_precision_at_k([1, 1, 0], 3, n_relevant=2) == 1.0
    assert metrics.average_precision_at_k([1, 1, 0], 3, n_relevant=4) == pytest.approx(2 / 3)
    r = np.array([3, 1, 5])
    assert metrics.map_at_k(RELEVANT, 4, r) == pytest.approx((5 / 9 + 1 / 4 + 1 / 4) / 3)
    # A query with nothing relevant in the archive has no AP and is left out of the mean.
    assert math.isnan(metrics.average_precision_at_k([0, 0, 0], 3, n_relevant=0))
    assert metrics.map_at_k(np.array([[1, 0], [0, 0]], bool), 2, [1, 0]) == 1.0
    with pytest.raises(ValueError, match="smaller"):
        metrics.average_precision_at_k([1, 1, 0], 3, n_relevant=1)


def test_the_hits_variant_keeps_its_old_definition() -> None:
    # Σ P@i · rel_i divided by the hits in the top k: 1 whenever every hit ranks above every miss.
    assert metrics.map_at_k_hits(RELEVANT, 4) == pytest.approx((5 / 6 + 1 / 4 + 1 / 2) / 3)
    assert metrics.map_at_k_hits(RELEVANT, 3) == pytest.approx((5 / 6 + 0 + 1 / 2) / 3)
    assert metrics.map_at_k_hits(np.array([[1, 0, 0]], bool), 3) == 1.0
    assert metrics.map_at_k(np.array([[1, 0, 0]], bool), 3, 3) == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_matches_sklearn_over_the_whole_archive(seed: int) -> None:
    """Ranking the whole archive (k = its size, so min(k, R) = R), AP@k is scikit-learn's average precision."""
    rng = np.random.default_rng(seed)
    rel = rng.random((30, 25)) < 0.35
    rel[:, 0] |= ~rel.any(axis=1)  # every query has a relevant item
    ranked_scores = np.arange(rel.shape[1], 0, -1)  # rank 1 has the highest score
    r = rel.sum(axis=1)
    for row, n in zip(rel, r, strict=True):
        assert metrics.average_precision_at_k(row, rel.shape[1], n) == pytest.approx(
            sk.average_precision_score(row, ranked_scores), abs=1e-12)
    expected = np.mean([sk.average_precision_score(row, ranked_scores) for row in rel])
    assert metrics.map_at_k(rel, rel.shape[1], r) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("k", [5, 10])
def test_average_precision_matches_sklearn_when_the_top_k_holds_every_relevant_item(k: int) -> None:
    """With R ≤ k relevant items all inside the top k, AP@k equals sklearn's AP of the full ranking."""
    rng = np.random.default_rng(k)
    for _ in range(20):
        full = np.zeros(40, bool)
        hits = rng.choice(k, size=rng.integers(1, k + 1), replace=False)
        full[hits] = True
        ranked_scores = np.arange(full.size, 0, -1)
        assert metrics.average_precision_at_k(full, k, int(full.sum())) == pytest.approx(
            sk.average_precision_score(full, ranked_scores), abs=1e-12)


def test_empty_query_sets_are_nan() -> None:
    empty = np.zeros((0, 5), bool)
    assert math.isnan(metrics.precision_at_k(empty, 3))
    assert math.isnan(metrics.map_at_k(empty, 3, np.zeros(0)))
    assert math.isnan(metrics.map_at_k_hits(empty, 3))
