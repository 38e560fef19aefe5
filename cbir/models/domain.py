"""Is a query like the model's training images? A regularised Mahalanobis distance on the backbone's pooled
features (`ModelOutput.pooled`, before the embedding head), fitted on the training images, with a threshold set on
the validation images.

The covariance is shrunk towards a multiple of the identity (Ledoit–Wolf), then modelled by its top `dims`
principal directions plus one variance for the rest (probabilistic PCA), so the distance is defined however few
images there are and an image that differs only outside the top directions is still seen:

    d(x)² = ( Σ_k (v_k·(x − m))² / λ_k  +  ‖residual‖² / σ² ) / p        (p features; ≈ 1 in the training set)

The threshold is the `quantile` quantile of the validation images' distances, so about 1 − `quantile` of
in-domain queries fire. Saved as `domain.safetensors` in the model's run folder (`cbir.models.checkpoint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

DOMAIN = "domain.safetensors"
FORMAT = "cbir-domain-1"
#: Most principal directions kept; the rest share one variance.
MAX_DIMS = 64
#: Validation quantile of the threshold: fires on about 0.5 % of in-domain queries (the product asks < 2 %).
QUANTILE = 0.995


@dataclass
class DomainModel:
    """The fitted distance (`score`) and its threshold (`in_domain`)."""

    mean: np.ndarray            # (p,) training mean
    components: np.ndarray      # (k, p) orthonormal principal directions
    variances: np.ndarray       # (k,) their shrunk variances
    residual_variance: float    # shrunk variance per direction outside them (0 when k = p)
    threshold: float = math.inf
    quantile: float = QUANTILE
    shrinkage: float = 0.0      # Ledoit–Wolf weight of the identity target
    n_train: int = 0
    n_val: int = 0
    fingerprint: str = ""       # the model's (`cbir.models.checkpoint.fingerprint_of`) it was fitted for

    @classmethod
    def fit(cls, features_train: np.ndarray, features_val: np.ndarray, quantile: float = QUANTILE,
            dims: int = MAX_DIMS, fingerprint: str = "") -> DomainModel:
        """Fit on (N, p) training features; the threshold is the `quantile` quantile of the (M, p) validation
        features' distances."""
        x = np.asarray(features_train)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need (N ≥ 2, p) training features, got shape {x.shape}")
        if len(features_val) == 0:
            raise ValueError("need at least one validation image for the threshold")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        n, p = x.shape
        mean = x.mean(axis=0, dtype=np.float64)
        cov = np.zeros((p, p))
        fourth = 0.0
        for start in range(0, n, 4096):   # float64 chunks: no centred copy of all the features
            c = x[start:start + 4096].astype(np.float64) - mean
            cov += c.T @ c
            fourth += float(((c * c).sum(axis=1) ** 2).sum())
        cov /= n
        mu = float(np.trace(cov)) / p
        spread = float(((cov - mu * np.eye(p)) ** 2).sum())
        noise = min(spread, (fourth / n - float((cov ** 2).sum())) / n)
        alpha = float(np.clip(noise / spread, 0.0, 1.0)) if spread > 0 else 1.0
        eigenvalues, vectors = np.linalg.eigh(cov)   # ascending
        eigenvalues = np.clip(eigenvalues[::-1], 0.0, None)
        k = min(dims, p)
        floor = max(mu, 1e-12)   # all-constant features: unit variances instead of a division by zero
        shrunk = (1 - alpha) * eigenvalues + alpha * floor
        rest = (1 - alpha) * float(eigenvalues[k:].mean()) + alpha * floor if k < p else 0.0
        model = cls(mean=mean, components=np.ascontiguousarray(vectors[:, ::-1][:, :k].T),
                    variances=np.maximum(shrunk[:k], 1e-12), residual_variance=max(rest, 1e-12) if k < p else 0.0,
                    quantile=quantile, shrinkage=alpha, n_train=n, fingerprint=fingerprint)
        return model.with_threshold(model.score(features_val), quantile)

    def with_threshold(self, distances: np.ndarray, quantile: float = QUANTILE) -> DomainModel:
        """This distance with the threshold at the `quantile` quantile of `distances` (validation images')."""
        d = np.asarray(distances, dtype=np.float64)
        return DomainModel(self.mean, self.components, self.variances, self.residual_variance,
                           float(np.quantile(d, quantile)), quantile, self.shrinkage, self.n_train, len(d),
                           self.fingerprint)

    @property
    def dim(self) -> int:
        """p, the length of the features it takes."""
        return len(self.mean)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) distances of (N, p) features (RMS over the p whitened directions: ≈ 1 in-domain)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features of shape {x.shape}: the domain model takes (N, {self.dim})")
        c = x - self.mean
        z = c @ self.components.T
        d2 = (z * z / self.variances).sum(axis=1)
        if self.residual_variance > 0:
            residual = np.clip((c * c).sum(axis=1) - (z * z).sum(axis=1), 0.0, None)
            d2 += residual / self.residual_variance
        return np.sqrt(d2 / self.dim)

    def in_domain(self, distances: np.ndarray) -> np.ndarray:
        """(N,) bool: at or below the threshold."""
        return np.asarray(distances) <= self.threshold

    def save(self, folder: Path) -> Path:
        """Write `folder`/domain.safetensors (arrays, and the scalars as metadata)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / DOMAIN
        tensors = {"mean": self.mean, "components": self.components, "variances": self.variances}
        meta = {"format": FORMAT, "residual_variance": repr(self.residual_variance), "threshold": repr(self.threshold),
                "quantile": repr(self.quantile), "shrinkage": repr(self.shrinkage), "n_train": str(self.n_train),
                "n_val": str(self.n_val), "fingerprint": self.fingerprint}
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(path), meta)
        return path

    @classmethod
    def load(cls, folder: Path) -> DomainModel | None:
        """`folder`/domain.safetensors, or None when there is none. Raises ValueError/OSError when unreadable."""
        path = Path(folder) / DOMAIN
        if not path.is_file():
            return None
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format {meta.get('format')!r})")
        arrays = load_file(str(path))
        return cls(arrays["mean"], arrays["components"], arrays["variances"], float(meta["residual_variance"]),
                   float(meta["threshold"]), float(meta["quantile"]), float(meta["shrinkage"]), int(meta["n_train"]),
                   int(meta["n_val"]), meta.get("fingerprint", ""))
