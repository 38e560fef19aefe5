"""Where a collection's binary codes come from, recorded in its metadata as `codes`:

- ``model`` (the default): the model's own code, i.e. the learned hash layer for `--task hash`, and the sign
  of a fixed random projection of the embedding (LSH) for every other task;
- ``itq``: ITQ (`cbir.embed.codes.fit_itq`) fitted at ingest on the embeddings of up to `ITQ_FIT_SIZE` images,
  drawn in a seeded random order. The fitted mean and projection are stored (as float32) in the collection
  metadata, so later ingests and every query encode with the same parameters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cbir.embed.codes import ItqCodes, fit_itq
from cbir.errors import CbirError
from cbir.index.record import CollectionRecord

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


def collection_itq(record: CollectionRecord) -> ItqCodes | None:
    """The collection's fitted ITQ encoder, or None when its codes are the model's (or not fitted yet)."""
    params = record.itq
    if record.code_source != "itq" or params is None:
        return None
    return ItqCodes(mean=np.asarray(params["mean"], dtype=np.float32).astype(np.float64),
                    projection=np.asarray(params["projection"], dtype=np.float32).astype(np.float64))


def collection_code(record: CollectionRecord, embedding: np.ndarray, model_code: np.ndarray) -> np.ndarray:
    """The code a vector gets in this collection: ITQ's when the collection uses ITQ, else the model's."""
    itq = collection_itq(record)
    if itq is None:
        if record.code_source == "itq":
            raise CbirError("this collection's ITQ codes were never fitted (its first ingest did not finish)")
        return model_code
    return itq.encode(np.asarray(embedding)[None])[0]
