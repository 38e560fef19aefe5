"""Stage 2 with three kinds of binary code on the same queries: the model's own (the learned hash layer, or
LSH inside the model), LSH (sign of a seeded Gaussian projection of the embedding) and ITQ fitted on the
archive's embeddings. Each is scored by Hamming-ranking mAP@k and by the Hamming prefilter (top-N by Hamming
distance, ties by id) followed by exact cosine kNN, as `cbir query --prefilter N` does."""

from __future__ import annotations

from typing import Any

import numpy as np

from cbir.embed.codes import fit_itq, lsh_codes
from cbir.metrics import balanced_accuracy, knn_vote, map_at_k
from cbir.store.base import Filter
from cbir.store.memory import MemoryIndex
from cbir.store.planner import Scope


def archive_engine(embeddings: np.ndarray, codes: np.ndarray, groups: np.ndarray) -> MemoryIndex:
    """The in-memory engine over an archive in id order: ids are the zero-padded positions, so ties by id are
    ties by position, and each point's payload holds its group as `pseudonym`."""
    norm = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    width = len(str(max(len(groups) - 1, 0)))
    return MemoryIndex.from_arrays([f"{i:0{width}d}" for i in range(len(groups))], norm, codes,
                                   [{"pseudonym": str(g)} for g in groups])


def other_groups(group: Any) -> Filter:
    """Leave out the query's own patient."""
    return Filter(must_not={"pseudonym": str(group)})


def hamming_ranking(engine: MemoryIndex, code: np.ndarray, k: int, flt: Filter | None = None) -> np.ndarray:
    """Positions of the k points nearest to `code` by Hamming distance (ties by ascending id) that pass `flt`."""
    found = engine.nearest_by_code(engine.name, np.asarray(code, dtype=np.uint8), k, Scope(flt=flt))
    return np.asarray(found.rows, dtype=np.int64)


def compare_codes(archive_embeddings: np.ndarray, archive_codes: np.ndarray, archive_targets: np.ndarray,
                  archive_groups: np.ndarray, query_embeddings: np.ndarray, query_codes: np.ndarray,
                  query_targets: np.ndarray, query_groups: np.ndarray, k: int, shortlist: int
                  ) -> dict[str, dict[str, Any]]:
    """code source → {hamming_map_at_k, prefilter_knn_accuracy, prefilter_balanced_accuracy}.

    The archive is in id order (ties go to the lower id). Archive points of the query's group (patient
    pseudonym) are left out. `archive_codes`/`query_codes` are the model's 0/1 codes (N, bits).
    """
    bits = archive_codes.shape[1]
    sources = {"model": (archive_codes, query_codes),
               "lsh": (lsh_codes(archive_embeddings, bits), lsh_codes(query_embeddings, bits))}
    if bits <= min(archive_embeddings.shape):  # ITQ's PCA needs bits ≤ dim and bits ≤ N
        itq = fit_itq(archive_embeddings, bits)
        sources["itq"] = (itq.encode(archive_embeddings), itq.encode(query_embeddings))
    results = {}
    for name, (archive, queries) in sources.items():
        engine = archive_engine(archive_embeddings, archive, archive_groups)
        relevant = np.zeros((len(queries), k), dtype=bool)
        voted = np.zeros((len(queries), k), dtype=np.int64)
        n_relevant = np.zeros(len(queries), dtype=np.int64)
        for row in range(len(queries)):
            flt = other_groups(query_groups[row])
            n_relevant[row] = int(np.sum((archive_targets == query_targets[row])
                                         & (archive_groups != query_groups[row])))
            nearest = hamming_ranking(engine, queries[row], k, flt)
            relevant[row, :len(nearest)] = archive_targets[nearest] == query_targets[row]
            hits = engine.search(query_embeddings[row], k, flt, code=queries[row], prefilter=shortlist)
            voted[row, :len(hits)] = archive_targets[[int(h.id) for h in hits]]
        vote, _ = knn_vote(voted, k)
        results[name] = {"hamming_map_at_k": map_at_k(relevant, k, n_relevant),
                         "prefilter_knn_accuracy": float(np.mean(vote == query_targets)),
                         "prefilter_balanced_accuracy": balanced_accuracy(query_targets, vote)}
    return results
