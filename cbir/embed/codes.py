"""Binary codes for models without a trained hash layer: LSH and ITQ (Gong & Lazebnik, 2011).

Both map L2-normalised embeddings to K-bit 0/1 codes whose Hamming distance tracks cosine distance:
- LSH: the sign of a fixed random projection (what `CbirNet` computes for non-hash tasks);
- ITQ: PCA to K dimensions, then a rotation learned to minimise the quantisation error, fitted on the
  archive's embeddings (so it needs K ≤ the embedding size).

Where a collection's codes come from is recorded in its metadata as `codes`:

- ``model`` (the default): the model's own code, i.e. the learned hash layer for `--task hash`, and the sign
  of a fixed random projection of the embedding (LSH) for every other task;
- ``itq``: ITQ (`cbir.embed.codes.fit_itq`) fitted at ingest on the embeddings of up to `ITQ_FIT_SIZE` images,
  drawn in a seeded random order. The fitted mean and projection are stored (as float32) in the collection
  metadata, so later ingests and every query encode with the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cbir.errors import CbirError


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


class CodeRecord(Protocol):
    """What the code source needs of a collection's record (`cbir.store.record.CollectionRecord`)."""

    @property
    def code_source(self) -> str: ...

    @property
    def itq(self) -> dict[str, Any] | None: ...


CODE_SOURCES = ("model", "itq")
ITQ_FIT_SIZE = 4096


def check_code_source(codes: str | None, bits: int, dim: int) -> None:
    if codes is None:
        return
    if codes not in CODE_SOURCES:
        raise CbirError(f"unknown code source {codes!r} (choose from {', '.join(CODE_SOURCES)})")
    if codes == "itq" and bits > dim:
        raise CbirError(f"ITQ codes need bits ≤ the embedding size ({bits} > {dim}); use --codes model")


def fit_itq_meta(embeddings: np.ndarray, bits: int) -> dict[str, Any]:
    """Fit ITQ on (N, dim) embeddings and return its metadata form (float32-rounded parameters)."""
    try:
        itq = fit_itq(embeddings, bits)
    except ValueError as exc:
        raise CbirError(f"cannot fit ITQ codes: {exc}") from None
    return {"mean": itq.mean.astype(np.float32).tolist(), "projection": itq.projection.astype(np.float32).tolist(),
            "fitted_on": int(len(embeddings))}


def collection_itq(record: CodeRecord) -> ItqCodes | None:
    """The collection's fitted ITQ encoder, or None when its codes are the model's (or not fitted yet)."""
    params = record.itq
    if record.code_source != "itq" or params is None:
        return None
    return ItqCodes(mean=np.asarray(params["mean"], dtype=np.float32).astype(np.float64),
                    projection=np.asarray(params["projection"], dtype=np.float32).astype(np.float64))


def collection_code(record: CodeRecord, embedding: np.ndarray, model_code: np.ndarray) -> np.ndarray:
    """The code a vector gets in this collection: ITQ's when the collection uses ITQ, else the model's."""
    itq = collection_itq(record)
    if itq is None:
        if record.code_source == "itq":
            raise CbirError("this collection's ITQ codes were never fitted (its first ingest did not finish)")
        return model_code
    return itq.encode(np.asarray(embedding)[None])[0]
