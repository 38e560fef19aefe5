"""Is a query like the model's training images? The cosine distance from the query's mid-level backbone features
(`ModelOutput.domain`: `cbir.models.stages`) to its `K`-th nearest training image, with a threshold set on the
validation images.

The threshold is the ⌈(n + 1)·`quantile`⌉-th smallest of the n validation images' distances (the largest when
that rank exceeds n): a new in-domain query, exchangeable with the validation images, fires with probability at
most max(1 − `quantile`, 1 / (n + 1)) (the split-conformal bound; a plain sample quantile of 88 validation images
fired on 2.1 % of one fold's test patients). The reference is at most `MAX_REFERENCE` training images' unit
features (a seeded sample), stored as float16 in `domain.safetensors` in the run folder (`cbir.models.checkpoint`).

Chosen on one RSNA fold's training and validation patients, with paediatric films (Kermany), a colour photograph
and a near-uniform image as the out-of-domain development set (docs/results.md, "Out-of-domain warning"):
against a regularised Mahalanobis distance, against the pooled features before the embedding head, and against
early-layer style statistics, an intensity histogram and a power spectrum.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

DOMAIN = "domain.safetensors"
FORMAT = "cbir-domain-3"
#: Earlier formats (other features): read as no domain model, so their checkpoints still load.
OLD_FORMATS = ("cbir-domain-1", "cbir-domain-2")
#: The neighbour whose distance counts, and the most training images kept as the reference.
K = 5
MAX_REFERENCE = 4096
#: Quantile of the threshold: at most max(0.5 %, 1 / (n_val + 1)) of in-domain queries fire (the product asks < 2 %).
QUANTILE = 0.995


def _unit(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def conformal_threshold(distances: np.ndarray, quantile: float) -> float:
    """The ⌈(n + 1)·quantile⌉-th smallest of n distances, or the largest when that rank exceeds n."""
    d = np.sort(np.asarray(distances, dtype=np.float64).ravel())
    if len(d) == 0:
        raise ValueError("need at least one validation distance for the threshold")
    rank = math.ceil((len(d) + 1) * quantile - 1e-9)
    return float(d[min(max(rank, 1), len(d)) - 1])


@dataclass
class DomainModel:
    """The fitted distance (`score`) and its threshold (`in_domain`)."""

    reference: np.ndarray       # (M, p) unit training features (float16 when stored)
    threshold: float = math.inf
    quantile: float = QUANTILE
    k: int = K
    n_train: int = 0
    n_val: int = 0
    fingerprint: str = ""       # the model's (`cbir.models.checkpoint.fingerprint_of`) it was fitted for
    features: str = "pooled"    # which features (`cbir.models.stages.describe`)

    @classmethod
    def fit(cls, features_train: np.ndarray, features_val: np.ndarray, quantile: float = QUANTILE, k: int = K,
            fingerprint: str = "", max_reference: int = MAX_REFERENCE, features: str = "pooled") -> DomainModel:
        """The reference from (N, p) training features; the threshold from the (M, p) validation features'
        distances (`conformal_threshold`)."""
        x = np.asarray(features_train)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need (N ≥ 2, p) training features, got shape {x.shape}")
        if len(features_val) == 0:
            raise ValueError("need at least one validation image for the threshold")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        keep = np.sort(np.random.default_rng(0).permutation(len(x))[:max_reference])
        reference = _unit(x[keep]).astype(np.float16)
        model = cls(reference, quantile=quantile, k=min(k, len(reference)), n_train=len(x), fingerprint=fingerprint,
                    features=features)
        return model.with_threshold(model.score(features_val), quantile)

    def with_threshold(self, distances: np.ndarray, quantile: float = QUANTILE) -> DomainModel:
        """This distance with the threshold set on `distances` (validation images'; `conformal_threshold`)."""
        d = np.asarray(distances, dtype=np.float64)
        return DomainModel(self.reference, conformal_threshold(d, quantile), quantile, self.k, self.n_train, len(d),
                           self.fingerprint, self.features)

    @property
    def dim(self) -> int:
        """p, the length of the features it takes."""
        return int(self.reference.shape[1])

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) cosine distances of (N, p) features to their k-th nearest reference image."""
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features of shape {x.shape}: the domain model takes (N, {self.dim})")
        reference = self.reference.astype(np.float32)
        out = np.empty(len(x))
        for start in range(0, len(x), 512):
            similarity = _unit(x[start:start + 512]) @ reference.T
            kth = -np.partition(-similarity, self.k - 1, axis=1)[:, self.k - 1]   # the k-th largest similarity
            out[start:start + 512] = 1.0 - kth
        return out

    def in_domain(self, distances: np.ndarray) -> np.ndarray:
        """(N,) bool: at or below the threshold."""
        return np.asarray(distances) <= self.threshold

    def save(self, folder: Path) -> Path:
        """Write `folder`/domain.safetensors (the reference, and the scalars as metadata)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / DOMAIN
        meta = {"format": FORMAT, "threshold": repr(self.threshold), "quantile": repr(self.quantile),
                "k": str(self.k), "n_train": str(self.n_train), "n_val": str(self.n_val),
                "fingerprint": self.fingerprint, "features": self.features}
        partial = path.with_name(path.name + ".partial")   # a killed write leaves no half file behind
        save_file({"reference": np.ascontiguousarray(self.reference, dtype=np.float16)}, str(partial), meta)
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, folder: Path) -> DomainModel | None:
        """`folder`/domain.safetensors, or None when there is none or it has an earlier format (`OLD_FORMATS`).
        Raises ValueError/OSError when unreadable."""
        path = Path(folder) / DOMAIN
        if not path.is_file():
            return None
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") in OLD_FORMATS:
            return None
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format {meta.get('format')!r})")
        arrays = load_file(str(path))
        return cls(arrays["reference"], float(meta["threshold"]), float(meta["quantile"]), int(meta["k"]),
                   int(meta["n_train"]), int(meta["n_val"]), meta.get("fingerprint", ""),
                   meta.get("features", "pooled"))
