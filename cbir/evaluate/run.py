"""Evaluate a collection: stage 1 (the model's probability) and stage 2 (kNN over the index).

Queries are the ingested test split by default (their stored embeddings are used, so nothing is
re-embedded), or every image of another dataset. Neighbours from the query's own patient are never
counted, and with the default queries the reference archive is the train and val splits only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbir.console import QUIET, Reporter
from cbir.data.records import Records
from cbir.embed import embed_batches
from cbir.errors import CbirError
from cbir.evaluate.summary import summarize
from cbir.index.base import Filter, Index
from cbir.index.schema import check_model
from cbir.io import Pseudonymizer
from cbir.metrics import majority_baseline
from cbir.models import LoadedModel
from cbir.report.evaluation import write_report

ARCHIVE_SPLITS = ["train", "val"]


@dataclass
class Query:
    embedding: np.ndarray
    target: int
    probability: float
    pseudonym: str | None


def stored_queries(index: Index, collection: str) -> list[Query]:
    points = index.scroll(collection, Filter(must={"split": "test"}), with_vectors=True)
    return [Query(p.embedding, int(p.payload.get("target", 0)), float(p.payload.get("probability", 0.0)),
                  p.payload.get("pseudonym")) for p in points]


def embedded_queries(records: Records, loaded: LoadedModel, pseudonymize: Pseudonymizer,
                     reporter: Reporter) -> tuple[list[Query], list[str]]:
    queries, failures = [], []
    paths = records.meta["path"].tolist()
    y = records.y
    with reporter.task("embed queries", len(paths)) as bar:
        for embedded, failed in embed_batches(loaded, paths, pseudonymize=pseudonymize):
            for item in embedded:
                patient = str(records.meta["patient"].iloc[item.index])
                queries.append(Query(item.embedding, int(y[item.index]), float(item.probabilities[0]),
                                     pseudonymize(patient)))
            failures.extend(f"{f.path}: {f.reason}" for f in failed)
            bar.advance(len(embedded) + len(failed))
    return queries, failures


def evaluate_collection(index: Index, collection: str, loaded: LoadedModel, out_dir: Path, k: int = 10,
                        queries_from: Records | None = None, pseudonymize: Pseudonymizer | None = None,
                        reporter: Reporter = QUIET) -> dict[str, Any]:
    """Run both stages, write report.md/report.json/roc.png/precision_at_k.png, return the report dict."""
    started = time.perf_counter()
    meta = index.get_meta(collection)
    check_model(meta, loaded, collection)
    failures: list[str] = []
    if queries_from is None:
        queries = stored_queries(index, collection)
        archive = Filter(must={"split": ARCHIVE_SPLITS})
        source = "test split of the collection"
    else:
        if pseudonymize is None:
            raise CbirError("evaluating external queries needs the pseudonym key")
        queries, failures = embedded_queries(queries_from, loaded, pseudonymize, reporter)
        archive = Filter()
        source = f"{queries_from.dataset} ({queries_from.root})"
    if not queries:
        raise CbirError(f"collection {collection!r}: no query images ({source} is empty)")
    archive_y = _archive_targets(index, collection, archive)
    if archive_y.size == 0:
        raise CbirError(f"collection {collection!r}: the reference archive is empty")
    neighbor_y = np.zeros((len(queries), k), dtype=np.int64)
    found = np.zeros(len(queries), dtype=np.int64)
    with reporter.task("search", len(queries)) as bar:
        for row, query in enumerate(queries):
            flt = Filter(must=dict(archive.must),
                         must_not={"pseudonym": query.pseudonym} if query.pseudonym else {})
            hits = index.search(collection, query.embedding, k, flt=flt)
            labels = [int(hit.payload.get("target", 0)) for hit in hits]
            found[row] = len(labels)
            neighbor_y[row, :len(labels)] = labels
            if len(labels) < k:  # a tiny archive: pad with the majority label so shapes stay rectangular
                neighbor_y[row, len(labels):] = majority_baseline(archive_y, archive_y).label
            bar.advance()
    y_query = np.array([q.target for q in queries])
    prob_query = np.array([q.probability for q in queries])
    relevant = (neighbor_y == y_query[:, None]) & (np.arange(k)[None, :] < found[:, None])
    report = summarize(task=loaded.config.task, y_query=y_query, prob_query=prob_query, neighbor_y=neighbor_y,
                       archive_y=archive_y, k=k, relevant=relevant)
    context = {"collection": collection, "index": index.location, "model": str(loaded.path),
               "model_fingerprint": loaded.fingerprint, "backbone": loaded.config.backbone,
               "target": meta.get("target"), "negative_label": meta.get("negative_label"), "query_source": source,
               "archive_size": int(archive_y.size),
               "query_failures": len(failures), "short_neighbour_lists": int((found < k).sum()),
               "seconds": round(time.perf_counter() - started, 2)}
    files = write_report(report, out_dir, y_query, prob_query,
                         title=f"cbir evaluation: {collection}", context=context)
    report["context"] = context
    report["files"] = {name: str(path) for name, path in files.items()}
    return report


def _archive_targets(index: Index, collection: str, archive: Filter) -> np.ndarray:
    total = index.count(collection, archive)
    positives = index.count(collection, Filter(must={**archive.must, "target": 1}))
    return np.concatenate([np.ones(positives, dtype=np.int64), np.zeros(total - positives, dtype=np.int64)])
