"""Stage 2 with three kinds of binary code on the same queries: the model's own (the learned hash layer, or
LSH inside the model), LSH (sign of a seeded Gaussian projection of the embedding) and ITQ fitted on the
archive's embeddings. Each is scored by Hamming-ranking mAP@k and by the Hamming prefilter (top-N by Hamming
distance, ties by id) followed by exact cosine kNN, as `cbir query --prefilter N` does."""

from __future__ import annotations

from typing import Any

import numpy as np

from cbir.embed.codes import fit_itq, lsh_codes
from cbir.metrics import balanced_accuracy, knn_vote, map_at_k

#: Set bits of every byte value.
POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int64)


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
    a_norm = archive_embeddings / np.maximum(np.linalg.norm(archive_embeddings, axis=1, keepdims=True), 1e-12)
    q_norm = query_embeddings / np.maximum(np.linalg.norm(query_embeddings, axis=1, keepdims=True), 1e-12)
    results = {}
    for name, (archive, queries) in sources.items():
        packed_a, packed_q = np.packbits(archive, axis=1), np.packbits(queries, axis=1)
        relevant = np.zeros((len(queries), k), dtype=bool)
        voted = np.zeros((len(queries), k), dtype=np.int64)
        n_relevant = np.zeros(len(queries), dtype=np.int64)
        for row in range(len(queries)):
            keep = np.flatnonzero(archive_groups != query_groups[row])
            n_relevant[row] = int(np.sum(archive_targets[keep] == query_targets[row]))
            distance = POPCOUNT[packed_a[keep] ^ packed_q[row]].sum(axis=1)
            order = keep[np.argsort(distance, kind="stable")]
            nearest = order[:k]
            relevant[row, :len(nearest)] = archive_targets[nearest] == query_targets[row]
            candidates = order[:shortlist]
            best = candidates[np.argsort(-(a_norm[candidates] @ q_norm[row]), kind="stable")[:k]]
            voted[row, :len(best)] = archive_targets[best]
        vote, _ = knn_vote(voted, k)
        results[name] = {"hamming_map_at_k": map_at_k(relevant, k, n_relevant),
                         "prefilter_knn_accuracy": float(np.mean(vote == query_targets)),
                         "prefilter_balanced_accuracy": balanced_accuracy(query_targets, vote)}
    return results
