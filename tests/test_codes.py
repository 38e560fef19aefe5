"""LSH and ITQ codes: shapes, balance, and that Hamming ranking follows cosine similarity."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.embed.codes import ItqCodes, fit_itq, lsh_codes, quantisation_error


def clustered(n: int = 600, dim: int = 32, clusters: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)) * 3
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def hamming_precision(codes: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    dist = (codes[:, None, :] != codes[None, :, :]).sum(-1).astype(float)
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return float((labels[order] == labels[:, None]).mean())


def test_shapes_and_values() -> None:
    x, _ = clustered()
    itq = fit_itq(x, 16)
    assert isinstance(itq, ItqCodes) and itq.bits == 16
    for codes in (lsh_codes(x, 16), itq.encode(x)):
        assert codes.shape == (600, 16) and codes.dtype == np.uint8 and set(np.unique(codes)) <= {0, 1}


def test_itq_codes_are_balanced_and_beat_chance() -> None:
    x, labels = clustered()
    codes = fit_itq(x, 16).encode(x)
    assert np.all((codes.mean(0) > 0.15) & (codes.mean(0) < 0.85))  # centred PCA splits each bit
    chance = np.mean([np.mean(labels == c) ** 2 for c in range(6)]) * 6
    assert hamming_precision(codes, labels) > 0.9 > chance


def test_itq_rotation_lowers_quantisation_error() -> None:
    x, _ = clustered()
    fitted = fit_itq(x, 16, iterations=50)
    unrotated = fit_itq(x, 16, iterations=0)
    assert quantisation_error(x, fitted) < quantisation_error(x, unrotated)


def test_lsh_hamming_tracks_angle() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal(64)
    near, far = a + 0.1 * rng.standard_normal(64), -a + 0.1 * rng.standard_normal(64)
    codes = lsh_codes(np.stack([a, near, far]), 256, seed=3)
    assert (codes[0] != codes[1]).sum() < 40 and (codes[0] != codes[2]).sum() > 216


def test_itq_refuses_more_bits_than_dimensions() -> None:
    x, _ = clustered(dim=8)
    with pytest.raises(ValueError, match="bits ≤ embedding size"):
        fit_itq(x, 16)


def test_itq_refuses_fewer_embeddings_than_bits() -> None:
    x, _ = clustered(dim=32)
    with pytest.raises(ValueError, match="at least as many embeddings as bits"):
        fit_itq(x[:10], 16)
    assert fit_itq(x[:16], 16).bits == 16
