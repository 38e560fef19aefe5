"""Binary codes for models without a trained hash layer: LSH and ITQ (Gong & Lazebnik, 2011).

Both map L2-normalised embeddings to K-bit 0/1 codes whose Hamming distance tracks cosine distance:
- LSH: the sign of a fixed random projection (what `CbirNet` computes for non-hash tasks);
- ITQ: PCA to K dimensions, then a rotation learned to minimise the quantisation error, fitted on the
  archive's embeddings (so it needs K ≤ the embedding size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ItqCodes:
    mean: np.ndarray        # (dim,)
    projection: np.ndarray  # (dim, bits): PCA directions times the learned rotation

    @property
    def bits(self) -> int:
        return int(self.projection.shape[1])

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, dim) float → (N, bits) uint8 of 0/1."""
        return ((np.asarray(embeddings, dtype=np.float64) - self.mean) @ self.projection > 0).astype(np.uint8)


def lsh_codes(embeddings: np.ndarray, bits: int, seed: int = 0) -> np.ndarray:
    """Sign of a seeded Gaussian random projection: Hamming distance ≈ bits·angle/π in expectation."""
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((embeddings.shape[1], bits))
    return (np.asarray(embeddings, dtype=np.float64) @ projection > 0).astype(np.uint8)


def fit_itq(embeddings: np.ndarray, bits: int, iterations: int = 50, seed: int = 0) -> ItqCodes:
    """Fit ITQ on (N, dim) embeddings; raises ValueError when bits > dim or N < max(2, bits)."""
    x = np.asarray(embeddings, dtype=np.float64)
    n, dim = x.shape
    if bits > dim:
        raise ValueError(f"ITQ needs bits ≤ embedding size ({bits} > {dim}); use LSH codes instead")
    if n < max(2, bits):
        raise ValueError(f"ITQ needs at least as many embeddings as bits ({n} < {max(2, bits)})")
    mean = x.mean(axis=0)
    centred = x - mean
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    pca = vt[:bits].T                                   # (dim, bits)
    v = centred @ pca                                   # (n, bits)
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    for _ in range(iterations):
        b = np.where(v @ rotation >= 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(b.T @ v)               # maximise tr(Bᵀ V R)
        rotation = (u @ wt).T
    return ItqCodes(mean=mean, projection=pca @ rotation)


def quantisation_error(embeddings: np.ndarray, codes: ItqCodes) -> float:
    """Mean ‖sign(VR) − VR‖² per point in the rotated PCA space (what ITQ minimises)."""
    v = (np.asarray(embeddings, dtype=np.float64) - codes.mean) @ codes.projection
    return float(np.mean(np.sum((np.where(v >= 0, 1.0, -1.0) - v) ** 2, axis=1)))
