"""Evaluate a collection: stage 1 (the model's probability) and stage 2 (kNN over the index).

Queries are the ingested test split by default (their stored embeddings are used, so nothing is
re-embedded), or the images of another dataset. Neighbours from the query's own patient are never
counted, and with the default queries the reference archive is the train and val splits only. The split
must be the one the model was trained with (`cbir.data.splits`): the collection records the split of every
dataset ingested into it, and a collection split otherwise than the model's training data is refused. Points
whose label is unknown (`cbir.store.base.UNKNOWN_TARGET`) are neither queries nor archive items; the report
counts them (`unknown_labels`). Queries with a near-duplicate of another patient's image in the archive are left
out by the leakage audit (`cbir.app.audit.drop_duplicate_queries`; `context.duplicates`), or the report says
that it could not run.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from cbir.app.audit import drop_duplicate_queries
from cbir.app.datasets import split_of
from cbir.app.settings import Settings
from cbir.console import QUIET, Reporter
from cbir.data.records import Records, payload_labels, reconcile_records
from cbir.data.splits import SplitSpec, describe_record, split_differences
from cbir.embed import embed_batches
from cbir.embed.codes import collection_itq
from cbir.errors import CbirError
from cbir.evaluation.prefilter import archive_engine, compare_codes, hamming_ranking, other_groups
from cbir.evaluation.summary import summarize, to_json_safe, vote_summary
from cbir.io import DEFAULT_READER, Pseudonymizer, ReaderPolicy
from cbir.labels import negative_label
from cbir.metrics import average_precisions_at_k, knn_vote, majority_baseline, map_at_k, per_class_auc
from cbir.models import LoadedModel
from cbir.report.evaluation import write_report
from cbir.store.base import HASH as HASH_FIELD
from cbir.store.base import UNKNOWN_TARGET, Filter, Index, unpack_code
from cbir.store.record import CollectionRecord
from cbir.store.records import FilterValue

ARCHIVE_SPLITS = ["train", "val"]
#: The Hamming prefilter of `stage2.prefilter_knn_accuracy` keeps this share of the archive (at least
#: PREFILTER_MIN points) before exact cosine.
PREFILTER_SHARE = 0.10
PREFILTER_MIN = 50


@dataclass
class Query:
    embedding: np.ndarray
    target: int
    probability: float
    pseudonym: str | None
    code: np.ndarray | None = None
    labels: list[str] = field(default_factory=list)   # as stored in payloads ("No Finding" when none)
    probabilities: dict[str, float] | None = None     # per label (multilabel models)
    row: int = -1                                     # position in the query records (embedded queries)


@dataclass
class Archive:
    """The reference archive's ids (sorted), targets, pseudonyms and packed codes, from one scroll."""

    ids: list[str]
    targets: np.ndarray
    pseudonyms: np.ndarray
    packed: np.ndarray                    # (N, ceil(bits / 8)) uint8
    embeddings: np.ndarray | None = None  # (N, dim) float32, when scrolled with vectors
    labels: list[frozenset[str]] = field(default_factory=list)  # payload labels per point

    def n_relevant(self, queries: list[Query]) -> np.ndarray:
        """R per query: archive points with the query's target, the query's own patient left out."""
        return np.array([int(np.sum((self.targets == q.target) & (self.pseudonyms != (q.pseudonym or "\0"))))
                         for q in queries], dtype=np.int64)

    def n_sharing_a_finding(self, queries: list[Query]) -> np.ndarray:
        """R per query for "shares at least one finding": archive points with a label in common, own patient out."""
        return np.array([sum(1 for lab, p in zip(self.labels, self.pseudonyms, strict=True)
                             if p != q.pseudonym and lab & set(q.labels)) for q in queries], dtype=np.int64)


@dataclass
class Neighbours:
    """Per query: the targets and label lists of the k cosine neighbours, and the Hamming-prefiltered vote."""

    targets: np.ndarray            # (Q, k); short lists padded with the archive's majority label
    found: np.ndarray              # (Q,) how many neighbours were returned
    labels: list[list[list[str]]]  # per query, per neighbour, the payload labels
    prefilter_targets: np.ndarray  # (Q, k) as `targets`, with the Hamming prefilter
    scores: np.ndarray | None = None  # (Q, k) cosine similarities; NaN where a list is short


def stored_queries(index: Index, collection: str, bits: int | None = None) -> list[Query]:
    points = index.scroll(collection, Filter(must={"split": "test"}), with_vectors=True)
    return [Query(p.embedding, int(p.payload.get("target", 0)), float(p.payload.get("probability", 0.0)),
                  p.payload.get("pseudonym"), _code(p.payload, bits), list(p.payload.get("labels") or []),
                  p.payload.get("probabilities")) for p in points]


def embedded_queries(records: Records, loaded: LoadedModel, pseudonymize: Pseudonymizer,
                     reporter: Reporter, record: CollectionRecord | None = None,
                     files: dict[int, Path] | None = None, warn: bool = True,
                     policy: ReaderPolicy = DEFAULT_READER) -> tuple[list[Query], list[str]]:
    """Embed every image of `records` (read as `policy` allows) as a query, coded as the collection (`record`)
    codes its points; `files` (row → file) embeds other files in place of those rows' images, with the rows'
    labels and patients."""
    queries: list[Query] = []
    failures: list[str] = []
    itq = collection_itq(record) if record is not None else None
    rows = list(files) if files is not None else list(range(len(records)))
    paths = [str(files[r]) for r in rows] if files is not None else records.meta["path"].tolist()
    y = records.y
    names = records.label_lists()
    negative = (record.negative_label if record is not None else None) or negative_label(records.label_names,
                                                                                         records.target)
    model_labels = loaded.config.label_names if loaded.task.per_label else None
    patients = records.patient_pseudonyms(pseudonymize)   # the patients the split used, as payloads store them
    with reporter.task("embed queries", len(paths)) as bar:
        for embedded, failed in embed_batches(loaded, paths, pseudonymize=pseudonymize, policy=policy):
            for item in embedded:
                row = rows[item.index]
                per_label = (dict(zip(model_labels, item.probabilities.tolist(), strict=True))
                             if model_labels else None)
                code = item.code if itq is None else itq.encode(item.embedding[None])[0]
                queries.append(Query(item.embedding, int(y[row]), item.probability, patients[row],
                                     code, payload_labels(records, names[row], negative), per_label, row))
            for f in failed:
                failures.append(f"{f.path}: {f.reason}")
                if warn:   # the console names the user's own file; written reports count reasons only
                    reporter.warn(f"{f.path}: {f.reason}")
            bar.advance(len(embedded) + len(failed))
    return queries, failures


def evaluate_collection(index: Index, collection: str, loaded: LoadedModel, out_dir: Path, k: int = 10,
                        queries_from: Records | None = None, pseudonymize: Pseudonymizer | None = None,
                        reporter: Reporter = QUIET, allow_other_split: bool = False,
                        robustness: bool = False, label_map: dict[str, str] | None = None,
                        settings: Settings | None = None) -> dict[str, Any]:
    """Run both stages, write report.md/report.json/roc.png/precision_at_k.png, return the report dict. The
    query images are read as `settings.reader` allows (default: `Settings.from_env()`).

    Besides the common keys (see `cbir.evaluation.summary`), every report has `stage2.hamming_map_at_k` (mAP@k
    ranking the archive by the Hamming distance of the codes alone, ties by point id) and
    `stage2.prefilter_knn_accuracy` (kNN accuracy after a Hamming prefilter to 10 % of the archive, at least
    50 points, then exact cosine), and `stage2.codes`: both figures again for the model's codes, LSH codes
    and ITQ codes fitted on the archive (`cbir.evaluation.prefilter`). Multilabel models add `stage1.per_class_auc`
    (label → ROC-AUC of that label's probability) and `stage2.map_at_k_any_finding`: a neighbour is relevant
    when it shares at least one payload label with the query, so "No Finding" matches "No Finding".

    External `queries_from` images of patients that the collection holds as training or validation images of
    the model's own dataset are left out (the model has seen them). Test points and archive points whose label
    is unknown are left out of every metric and counted in `unknown_labels` {"queries_skipped",
    "archive_skipped"}; external `queries_from` must have labels. The returned dict also has `per_query`
    (target, probability, kNN vote, AP@k and an integer patient group per query; written to per_query.json,
    not to report.json) for pooling folds. `robustness` adds the `robustness` block (`cbir.evaluation.robustness`).
    """
    policy = (settings or Settings.from_env()).reader
    started = time.perf_counter()
    record = index.record(collection, loaded.config.label_names)
    record.check_model(loaded.fingerprint, loaded.config.vector_dim, loaded.described)
    if queries_from is not None:   # in the collection's names, with its target (`label_map` renames first)
        queries_from = reconcile_records(record.label_space, queries_from, label_map)
    split_note = check_collection_split(record, loaded, allow_other_split, reporter)
    bits = record.bits or loaded.config.bits
    robust_records = _robustness_records(record, queries_from, pseudonymize) if robustness else None
    failures: list[str] = []
    left_out = 0
    labelled: dict[str, FilterValue] = {"target": UNKNOWN_TARGET}  # as must_not: only points whose label is known
    if queries_from is None:
        queries = stored_queries(index, collection, bits)
        archive_filter = Filter(must={"split": ARCHIVE_SPLITS}, must_not=labelled)
        source = "test split of the collection"
    else:
        if pseudonymize is None:
            raise CbirError("evaluating external queries needs the pseudonym key")
        queries_from.require_labels("evaluation queries")
        queries, failures = embedded_queries(queries_from, loaded, pseudonymize, reporter, record,
                                             policy=policy)
        queries, left_out = _unseen(index, collection, loaded, queries_from, queries, reporter)
        archive_filter = Filter(must_not=labelled)
        source = f"dataset {queries_from.dataset_id or 'given with --queries'}"   # keyed id: no folder name
    point = _operating_point(record, loaded, stored=queries_from is None, reporter=reporter)
    unknown = _unknown_labels(index, collection, archive_filter, queries, reporter)
    queries = [q for q in queries if q.target != UNKNOWN_TARGET]
    if not queries:
        if index.count(collection) == 0:
            raise CbirError(f"collection {collection!r} is empty: ingest images into it first (cbir ingest)")
        if unknown["queries_skipped"]:
            raise CbirError(f"collection {collection!r}: no query images with known labels (the "
                            f"{unknown['queries_skipped']} images of the {source} have unknown labels)")
        raise CbirError(f"collection {collection!r}: no query images ({source} is empty{_no_test_hint(loaded)})")
    archive = scroll_archive(index, collection, archive_filter, bits, with_embeddings=True)
    if archive.targets.size == 0:
        unknown_note = (f" of images with known labels ({unknown['archive_skipped']} have unknown labels)"
                        if unknown["archive_skipped"] else "")
        raise CbirError(f"collection {collection!r}: the reference archive is empty{unknown_note}")
    # leakage audit (`cbir.app.audit`): queries with a near-duplicate of another patient in the archive go
    queries, duplicates = drop_duplicate_queries(queries, archive.embeddings, archive.pseudonyms, loaded.config,
                                                 reporter)
    neighbours = _search(index, collection, archive_filter, archive, queries, k, reporter)
    y_query = np.array([q.target for q in queries])
    prob_query = np.array([q.probability for q in queries])
    relevant = (neighbours.targets == y_query[:, None]) & (np.arange(k)[None, :] < neighbours.found[:, None])
    n_relevant = archive.n_relevant(queries)
    groups = _patient_groups(queries)
    extra = _extra_metrics(loaded, archive, queries, neighbours, y_query, k) | {"unknown_labels": unknown}
    extra["stage2"]["weighted_vote"], extra["vote_calibration"], weighted = _weighted_vote(
        index, record, archive, neighbours, queries, k, groups, reporter, point)
    if loaded.task.boxes:
        extra["stage1"].update(_box_metrics(record, loaded, queries_from, reporter))
    report = summarize(task=loaded.config.task, y_query=y_query, prob_query=prob_query,
                       neighbor_y=neighbours.targets, archive_y=archive.targets, k=k, relevant=relevant,
                       extra=extra, n_relevant=n_relevant, groups=groups, operating_point=point)
    # no folder, file or host: the model by its fingerprint, the index by its kind
    context = {"collection": collection, "index": "a Qdrant server" if getattr(index, "is_server", False)
               else "an embedded index",
               "model_fingerprint": loaded.fingerprint, "backbone": loaded.config.backbone,
               "target": record.target, "negative_label": record.negative_label, "query_source": source,
               "split": split_note, "archive_size": int(archive.targets.size),
               "query_failures": len(failures), "queries_left_out_seen_by_model": left_out,
               "short_neighbour_lists": int((neighbours.found < k).sum()), "duplicates": duplicates,
               "seconds": round(time.perf_counter() - started, 2)}
    if robustness:
        assert robust_records is not None and pseudonymize is not None  # `_robustness_records` checked both
        report["robustness"] = to_json_safe(_robustness(index, collection, loaded, record, archive, archive_filter,
                                                        robust_records, pseudonymize, k, reporter,
                                                        warned=queries_from is not None, policy=policy))
        context["seconds"] = round(time.perf_counter() - started, 2)
    files = write_report(report, out_dir, y_query, prob_query,
                         title=f"cbir evaluation: {collection}", context=context)
    vote, _ = knn_vote(neighbours.targets, k)
    per_query = {"target": y_query.tolist(), "probability": prob_query.tolist(), "vote": vote.tolist(),
                 "ap": [None if np.isnan(a) else float(a) for a in average_precisions_at_k(relevant, k, n_relevant)],
                 "group": groups.tolist(), "majority_label": int(report["baseline"]["majority_label"]),
                 "weighted_vote": weighted.tolist(), "operating_point": point, "k": k}
    (Path(out_dir) / "per_query.json").write_text(json.dumps(per_query) + "\n")
    report["context"] = context
    report["files"] = {name: str(path) for name, path in files.items()} | {"per_query": str(Path(out_dir) /
                                                                                             "per_query.json")}
    report["per_query"] = per_query
    return report


def _robustness_records(record: CollectionRecord, queries_from: Records | None,
                        pseudonymize: Pseudonymizer | None) -> Records:
    """The query images that `--robustness` re-encodes: the external queries, or the collection's test split."""
    records = queries_from if queries_from is not None else collection_test_records(record)
    if records is None or len(records) == 0:
        raise CbirError(f"--robustness re-encodes the query images, but the test images of collection "
                        f"{record.name!r} are not at hand (its dataset folder moved?): pass them as --queries")
    if pseudonymize is None:
        raise CbirError("--robustness needs the pseudonym key")
    return records


def _robustness(index: Index, collection: str, loaded: LoadedModel, record: CollectionRecord, archive: Archive,
                archive_filter: Filter, records: Records, pseudonymize: Pseudonymizer, k: int,
                reporter: Reporter, warned: bool = False, policy: ReaderPolicy = DEFAULT_READER) -> dict[str, Any]:
    """Re-encode every query image, embed the copies and the originals afresh, and compare (module
    `cbir.evaluation.robustness`); `warned`: the query images' failures were already said."""
    from cbir.evaluation import robustness as rb
    assert archive.embeddings is not None  # scrolled with vectors

    def figures(queries: list[Query]) -> dict[str, Any]:
        found = _search(index, collection, archive_filter, archive, queries, k, QUIET)
        y = np.array([q.target for q in queries])
        relevant = (found.targets == y[:, None]) & (np.arange(k)[None, :] < found.found[:, None])
        return rb.stage_metrics(y, np.array([q.probability for q in queries]), found.targets, relevant, k,
                                archive.n_relevant(queries))

    with tempfile.TemporaryDirectory(prefix="cbir-robustness-") as scratch:
        written = rb.write_reencodings(records.meta["path"].tolist(), Path(scratch), pseudonymize, reporter,
                                       policy=policy)
        originals, failures = embedded_queries(records, loaded, pseudonymize, reporter, record, warn=not warned,
                                               policy=policy)
        position = {q.row: i for i, q in enumerate(originals)}
        original_embeddings = np.stack([q.embedding for q in originals])
        base = figures(originals)
        per_name: dict[str, Any] = {}
        for name, files in written.files.items():
            copies, failed = embedded_queries(records, loaded, pseudonymize, reporter, record, files, warn=False,
                                              policy=policy)
            copies = [q for q in copies if q.row in position]
            hidden = np.array([archive.pseudonyms == (q.pseudonym or "\0") for q in copies], dtype=bool)
            ranks = rb.ranks_of_originals(archive.embeddings, original_embeddings,
                                          np.stack([q.embedding for q in copies]),
                                          np.array([position[q.row] for q in copies]), hidden)
            after = figures(copies)
            per_name[name] = {**rb.rank_summary(ranks, _patient_groups(copies)), "metrics": after,
                              "change": rb.changes(base, after), "failures": len(failed)}
    return rb.robustness_section(per_name, base, int(archive.targets.size), written.failures + failures,
                                 records.meta["path"].astype(str).tolist())


def check_collection_split(record: CollectionRecord, loaded: LoadedModel, allow_other: bool,
                           reporter: Reporter) -> str:
    """Refuse a collection whose split of the model's training dataset differs from the model's own; returns a
    description of the split for the report."""
    model_split = loaded.split
    if model_split is None:
        reporter.warn(f"{loaded.path} records no split (trained before splits were recorded): its training "
                      "images may be among the test queries")
        return "unknown (the model records no split)"
    collection = record.name
    held = split_of(record, model_split)
    if held is None:
        if not record.splits:
            reporter.warn(f"collection {collection!r} records no split (ingested before splits were recorded): "
                          "its test points may include the model's training images; ingest it again")
        return f"model: {describe_record(model_split)}"
    why = split_differences(model_split, held)
    if why:
        if not allow_other:
            raise CbirError(f"collection {collection!r} holds {held['dataset']} split as {describe_record(held)}, "
                            f"but {loaded.path} was trained on {describe_record(model_split)} ({'; '.join(why)}), "
                            "so its test points may be training images; ingest with the model's split, or pass "
                            "--other-split")
        reporter.warn(f"the collection's split differs from the model's ({'; '.join(why)}) (--other-split)")
    return describe_record(held)


def _no_test_hint(loaded: LoadedModel) -> str:
    spec = SplitSpec.from_dict(loaded.split["spec"]) if loaded.split else None
    if spec is not None and not spec.folds and spec.test_fraction == 0:
        return "; the model was trained with --test-fraction 0, so nothing was held out: evaluate with " \
               "--queries OTHER_DATASET"
    return ""


def _unseen(index: Index, collection: str, loaded: LoadedModel, records: Records, queries: list[Query],
            reporter: Reporter) -> tuple[list[Query], int]:
    """Drop external queries of patients the collection holds as train/val images of the model's own dataset."""
    model_split = loaded.split
    # the model's dataset by its id, or by its folder's name (a model trained when datasets were named so)
    if model_split is None or model_split.get("dataset") not in (records.dataset_id, records.dataset):
        return queries, 0
    held = split_of(index.record(collection), model_split)
    dataset = str(held["dataset"] if held else model_split.get("dataset"))
    seen = {p.payload.get("pseudonym") for p in index.scroll(
        collection, Filter(must={"split": ARCHIVE_SPLITS, "dataset": dataset}))}
    kept = [q for q in queries if q.pseudonym not in seen]
    if len(kept) < len(queries):
        reporter.warn(f"left out {len(queries) - len(kept)} of {len(queries)} queries: their patients are "
                      f"training or validation images of {loaded.path} in collection {collection!r}")
    return kept, len(queries) - len(kept)


def _unknown_labels(index: Index, collection: str, archive_filter: Filter, queries: list[Query],
                    reporter: Reporter) -> dict[str, int]:
    """How many queries and archive points have unknown labels (left out of every metric); says so when any."""
    archive_unknown = Filter(must={**archive_filter.must, "target": UNKNOWN_TARGET})
    counts = {"queries_skipped": sum(q.target == UNKNOWN_TARGET for q in queries),
              "archive_skipped": index.count(collection, archive_unknown)}
    if any(counts.values()):
        reporter.warn(f"left out {counts['queries_skipped']} queries and {counts['archive_skipped']} archive images "
                      "whose labels are unknown: they neither query nor vote")
    return counts


def _patient_groups(queries: list[Query]) -> np.ndarray:
    """An integer per query's patient (pseudonym; a query without one is its own patient), for the bootstrap."""
    keys = [q.pseudonym or f"\0query {i}" for i, q in enumerate(queries)]
    _, groups = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    return groups.astype(np.int64)


def scroll_archive(index: Index, collection: str, flt: Filter, bits: int,
                   with_embeddings: bool = False) -> Archive:
    """Scroll the archive once and keep what the Hamming rankings need, sorted by id."""
    rows = sorted(((p.id, int(p.payload.get("target", 0)), p.payload.get("pseudonym"),
                    p.payload.get(HASH_FIELD) or "", p.embedding if with_embeddings else None,
                    frozenset(p.payload.get("labels") or []))
                   for p in index.scroll(collection, flt, with_vectors=with_embeddings)),
                  key=lambda row: row[0])
    width = (bits + 7) // 8
    packed = np.zeros((len(rows), width), dtype=np.uint8)
    for i, row in enumerate(rows):
        if row[3]:
            packed[i] = np.frombuffer(bytes.fromhex(row[3]), dtype=np.uint8)[:width]
    embeddings = (np.stack([cast(np.ndarray, r[4]) for r in rows]).astype(np.float32) if with_embeddings and rows
                  else None)
    return Archive(ids=[r[0] for r in rows], targets=np.array([r[1] for r in rows], dtype=np.int64),
                   pseudonyms=np.array([r[2] or "" for r in rows], dtype=object), packed=packed,
                   embeddings=embeddings, labels=[r[5] for r in rows])


def prefilter_size(archive_size: int) -> int:
    """Hamming-prefilter candidates: 10 % of the archive, at least 50, at most the whole archive."""
    return min(archive_size, max(PREFILTER_MIN, math.ceil(PREFILTER_SHARE * archive_size)))


def _search(index: Index, collection: str, archive_filter: Filter, archive: Archive, queries: list[Query], k: int,
            reporter: Reporter) -> Neighbours:
    """Exact cosine kNN per query, and again behind a Hamming prefilter (10 % of the archive, at least 50)."""
    majority = majority_baseline(archive.targets, archive.targets).label
    shortlist = prefilter_size(archive.targets.size)
    targets = np.full((len(queries), k), majority, dtype=np.int64)  # a tiny archive pads with the majority label
    prefiltered = targets.copy()
    scores = np.full((len(queries), k), np.nan)
    found = np.zeros(len(queries), dtype=np.int64)
    labels: list[list[list[str]]] = []
    with reporter.task("search", len(queries)) as bar:
        for row, query in enumerate(queries):
            flt = Filter(must=dict(archive_filter.must), must_not={
                **archive_filter.must_not, **({"pseudonym": query.pseudonym} if query.pseudonym else {})})
            hits = index.search(collection, query.embedding, k, flt=flt)
            found[row] = len(hits)
            targets[row, :len(hits)] = [int(hit.payload.get("target", 0)) for hit in hits]
            scores[row, :len(hits)] = [float(hit.score) for hit in hits]
            labels.append([list(hit.payload.get("labels") or []) for hit in hits])
            if query.code is not None:
                hits = index.search(collection, query.embedding, k, flt=flt, code=query.code, prefilter=shortlist)
                prefiltered[row, :len(hits)] = [int(hit.payload.get("target", 0)) for hit in hits]
            bar.advance()
    return Neighbours(targets, found, labels, prefiltered, scores)


def _operating_point(record: CollectionRecord, loaded: LoadedModel, stored: bool, reporter: Reporter) -> float:
    """Where stage 1 reads the queries' probabilities: the collection's record says what its payloads' probability
    is (`cbir.store.record`), and the stored test queries carry that; queries embedded now carry the model's. A
    record that disagrees with the model is said in one line."""
    collection = record.name
    kinds = {True: "calibrated probabilities", False: "raw scores"}
    model_calibrated = loaded.calibration is not None
    if record.calibrated_probability != model_calibrated or abs(record.operating_point - loaded.operating_point) > 1e-9:
        reporter.warn(f"collection {collection!r} stores {kinds[record.calibrated_probability]} read from "
                      f"{record.operating_point:.3f}, the model gives {kinds[model_calibrated]} read from "
                      f"{loaded.operating_point:.3f}; its stored test queries are read the collection's way")
    return record.operating_point if stored else loaded.operating_point


def _weighted_vote(index: Index, record: CollectionRecord, archive: Archive, neighbours: Neighbours,
                   queries: list[Query], k: int, groups: np.ndarray, reporter: Reporter,
                   operating_point: float = 0.5) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """The calibrated vote's figures, with the collection's stored calibration, the calibration, and each query's
    vote (0/1); the model beside it is read at its `operating_point`. When the collection has no calibration, or
    one fitted at another k (`cbir.search.calibrate.mismatch`), the vote is calibrated now on the collection's
    validation images at this k (not stored), and the report says so (`refitted_because`); with too few
    validation images it stays uncalibrated (`calibrated: false`)."""
    from cbir.search.calibrate import fit_calibration, mismatch
    from cbir.search.vote import VoteCalibration, decide
    collection = record.name
    stored: dict[str, Any] = record.vote_calibration or {}
    why = mismatch(stored, k) if stored else "the collection holds no calibration"
    body: dict[str, Any] = stored if not why else fit_calibration(index, collection, k) or {}
    if stored and why:
        reporter.warn(f"the stored vote calibration does not apply here ({why}): refitted on the validation images "
                      f"at k = {k} for this evaluation" if body else
                      f"the stored vote calibration does not apply here ({why}), and there are too few validation "
                      "images to refit it: the vote is not calibrated")
    calibration = VoteCalibration.from_dict(body.get("vote"))
    assert neighbours.scores is not None  # `_search` fills them
    label, probability, _ = decide(neighbours.scores, neighbours.targets, calibration,
                                   prior=float(archive.targets.mean()) if archive.targets.size else None)
    y = np.array([q.target for q in queries])
    figures = vote_summary(y, np.array([q.probability for q in queries]), label, probability, groups,
                           operating_point=operating_point)
    return figures, {**calibration.to_dict(), "stored": not why, "calibrated": bool(body),
                     "refitted_because": why if body and why else None}, np.asarray(label, int)


def _extra_metrics(loaded: LoadedModel, archive: Archive, queries: list[Query], neighbours: Neighbours,
                   y_query: np.ndarray, k: int) -> dict[str, dict[str, Any]]:
    """The code-based stage-2 metrics for every task, and the per-label ones for multilabel models."""
    stage1: dict[str, Any] = {}
    stage2: dict[str, Any] = {}
    if all(q.code is not None for q in queries):
        stage2["hamming_map_at_k"] = _hamming_map(archive, queries, y_query, k)
        vote, _ = knn_vote(neighbours.prefilter_targets, k)
        stage2["prefilter_knn_accuracy"] = float(np.mean(vote == y_query))
        stage2["prefilter_size"] = prefilter_size(archive.targets.size)
        if archive.embeddings is not None:
            stage2["codes"] = _code_comparison(archive, queries, y_query, k)
    if loaded.task.per_label:
        stage2["map_at_k_any_finding"] = map_at_k(_shares_a_finding(queries, neighbours, k), k,
                                                  archive.n_sharing_a_finding(queries))
        aucs = _per_class_auc(queries, loaded.config.label_names)
        if aucs is not None:
            stage1["per_class_auc"] = aucs
    return {"stage1": stage1, "stage2": stage2}


def _hamming_map(archive: Archive, queries: list[Query], y_query: np.ndarray, k: int) -> float:
    """mAP@k of the Hamming ranking (ties by id), each query's own patient left out."""
    relevant = np.zeros((len(queries), k), dtype=bool)
    codes = (np.unpackbits(archive.packed, axis=1)[:, :len(cast(np.ndarray, queries[0].code))] if queries
             else archive.packed)
    engine = archive_engine(np.ones((len(archive.ids), 1), np.float32), codes, archive.pseudonyms)
    for row, query in enumerate(queries):
        flt = other_groups(query.pseudonym) if query.pseudonym else None
        assert query.code is not None  # the caller checked every query has one
        nearest = hamming_ranking(engine, query.code, k, flt)
        relevant[row, :len(nearest)] = archive.targets[nearest] == y_query[row]
    return map_at_k(relevant, k, archive.n_relevant(queries))


def _box_metrics(record: CollectionRecord, loaded: LoadedModel, queries_from: Records | None,
                 reporter: Reporter) -> dict[str, Any]:
    """A detector's box mAP on the query images: the external queries, or the test split (as the collection
    records it) of the dataset the collection was ingested from (when its folder is still there and has boxes);
    {} when neither is at hand."""
    from cbir.app.heldout import detection_scores
    source = queries_from if queries_from is not None else collection_test_records(record)
    has_boxes = source is not None and "boxes" in source.meta and any(len(b) for b in source.meta["boxes"])
    if source is None or not has_boxes:
        reporter.warn("box mAP not computed: the query images' boxes are not available")
        return {}
    scores = detection_scores(source, loaded, reporter=reporter)
    return {"box_map": scores["box_map"], "box_threshold": scores["box_threshold"],
            "box_images": scores["n_images"], "box_images_with_boxes": scores["n_with_boxes"]}


def collection_test_records(record: CollectionRecord) -> Records | None:
    """The test split, as the collection records it, of the first dataset ingested into it whose folder is
    still at hand; None when none is."""
    from cbir.data.layout import load_dataset
    for dataset, roots in record.roots.items():
        held = record.split(dataset)
        spec = SplitSpec.from_dict(held["spec"]) if held else None
        for root in roots:
            try:
                return load_dataset(Path(root), (held or {}).get("layout") or "auto", split=spec
                                    ).with_dataset_id(dataset).split("test")
            except CbirError:
                continue
    return None


def _code_comparison(archive: Archive, queries: list[Query], y_query: np.ndarray, k: int) -> dict[str, Any]:
    """The model's codes against LSH and archive-fitted ITQ codes (`cbir.evaluation.prefilter`)."""
    assert archive.embeddings is not None  # the caller checked
    bits = len(cast(np.ndarray, queries[0].code))
    archive_codes = np.unpackbits(archive.packed, axis=1)[:, :bits]
    groups = np.array([q.pseudonym or f"\0query {i}" for i, q in enumerate(queries)], dtype=object)
    return compare_codes(archive.embeddings, archive_codes, archive.targets, archive.pseudonyms,
                         np.stack([q.embedding for q in queries]),
                         np.stack([cast(np.ndarray, q.code) for q in queries]),
                         y_query, groups, k, prefilter_size(archive.targets.size))


def _shares_a_finding(queries: list[Query], neighbours: Neighbours, k: int) -> np.ndarray:
    """(Q, k): the neighbour shares at least one payload label with the query ("No Finding" included)."""
    relevant = np.zeros((len(queries), k), dtype=bool)
    for row, query in enumerate(queries):
        mine = set(query.labels)
        for col, theirs in enumerate(neighbours.labels[row][:k]):
            relevant[row, col] = bool(mine & set(theirs))
    return relevant


def _per_class_auc(queries: list[Query], names: list[str]) -> dict[str, float] | None:
    """Label → ROC-AUC of its probability over the queries (NaN where a label has one class), if all carry them."""
    if not all(q.probabilities for q in queries):
        return None
    truth = np.array([[name in q.labels for name in names] for q in queries], dtype=np.int64)
    scores = np.array([[float((q.probabilities or {}).get(name, 0.0)) for name in names] for q in queries])
    return dict(zip(names, per_class_auc(truth, scores), strict=True))


def _code(payload: dict, bits: int | None) -> np.ndarray | None:
    hexstr = payload.get(HASH_FIELD)
    return unpack_code(hexstr, bits) if hexstr and bits else None
