"""Ingest: embed every image of a dataset and upsert embedding, code, labels and safe metadata."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from cbir.console import QUIET, Reporter
from cbir.data.records import Records
from cbir.embed import Embedded, embed_batches
from cbir.errors import BadInputError, CbirError
from cbir.index.base import Index, Point
from cbir.index.codes import ITQ_FIT_SIZE, check_code_source, code_source, fit_itq_meta, itq_from_meta
from cbir.index.schema import (
    check_key,
    check_model,
    collection_meta,
    negative_label,
    payload,
    point_id,
)
from cbir.io import Pseudonymizer, SafeMeta
from cbir.io.phi import age_band, sex_of, view_of
from cbir.models import LoadedModel


@dataclass
class IngestSummary:
    collection: str
    total: int = 0
    ingested: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    points_before: int = 0
    points_after: int = 0
    seconds: float = 0.0

    @property
    def line(self) -> str:
        return (f"{self.total} files: {self.ingested} ingested, {self.skipped} skipped, {self.failed} failed; "
                f"collection {self.collection!r} holds {self.points_after} points ({self.seconds:.1f} s)")


def prepare_collection(index: Index, collection: str, loaded: LoadedModel, pseudonymize: Pseudonymizer,
                       records: Records, codes: str | None = None, shards: int = 1, replicas: int = 1,
                       reporter: Reporter = QUIET) -> dict:
    """Create the collection, or check that an existing one matches this model, key and code source."""
    check_code_source(codes, loaded.config.bits, loaded.config.embed_dim)
    if index.has_collection(collection):
        meta = index.get_meta(collection)
        check_model(meta, loaded, collection)
        check_key(meta, pseudonymize, collection)
        if (shards, replicas) != (1, 1) and (shards, replicas) != (meta.get("shards"), meta.get("replicas")):
            reporter.warn(f"collection {collection!r} exists: --shards/--replicas apply only when it is created")
        if codes is not None and codes != code_source(meta):
            raise CbirError(f"collection {collection!r} stores {code_source(meta)} codes, not {codes}; "
                            "ingest into a new collection to change the code source")
    else:
        meta = collection_meta(loaded, pseudonymize, records.target,
                               negative_label(records.label_names, records.target))
        meta.update(codes=codes or "model", shards=shards, replicas=replicas)
        index.create_collection(collection, loaded.config.embed_dim, loaded.config.bits, meta, shards, replicas)
    roots = dict(meta.get("roots") or {})
    if roots.get(records.dataset) != str(records.root):
        roots[records.dataset] = str(records.root)
        meta["roots"] = roots
        index.set_meta(collection, meta)
    return meta


def ingest_records(records: Records, loaded: LoadedModel, index: Index, collection: str,
                   pseudonymize: Pseudonymizer, batch_size: int = 32, workers: int = 2, strict: bool = False,
                   reporter: Reporter = QUIET, codes: str | None = None,
                   itq_fit_size: int = ITQ_FIT_SIZE, may_fit_itq: bool = True, shards: int = 1,
                   replicas: int = 1) -> IngestSummary:
    """Embed and upsert every image; bad files are reported and counted, and the run goes on.

    `codes` picks the code source of a new collection (`cbir.index.codes`; default: the model's). When ITQ
    still has to be fitted, images are taken in a seeded random order and the first `itq_fit_size` embeddings
    are held back until ITQ is fitted on them, so nothing is embedded twice. `may_fit_itq=False` (parallel
    ingest parts other than the first) refuses to fit, so that all parts share one set of ITQ parameters.
    """
    started = time.perf_counter()
    meta = prepare_collection(index, collection, loaded, pseudonymize, records, codes, shards, replicas, reporter)
    summary = IngestSummary(collection, total=len(records), points_before=index.count(collection))
    paths = records.meta["path"].tolist()
    fitting = code_source(meta) == "itq" and not meta.get("itq")
    if fitting and not may_fit_itq:
        raise CbirError(f"collection {collection!r} has no fitted ITQ codes yet: ingest part 1 first, which fits "
                        "them, then start the other parts")
    order = np.random.default_rng(0).permutation(len(paths)) if fitting else np.arange(len(paths))
    model_labels = list(loaded.config.label_names) if loaded.config.task == "multilabel" else None
    seen: set[str] = set()
    held: list[Embedded] = []
    itq = itq_from_meta(meta)  # parsed once; None while it is still to be fitted, or for the model's codes

    def upsert(items: list[Embedded]) -> None:
        points = []
        item_codes = ([i.code for i in items] if itq is None or not items
                      else list(itq.encode(np.stack([i.embedding for i in items]))))
        for item, code in zip(items, item_codes, strict=True):
            point = _point(records, item, code, pseudonymize, meta, model_labels)
            if point.id in seen:
                summary.skipped += 1
                reporter.warn(f"{paths[item.index]}: duplicate SOPInstanceUID in this run; kept the first")
                continue
            seen.add(point.id)
            points.append(point)
        if points:
            index.upsert(collection, points)
            summary.ingested += len(points)

    def fit_now() -> None:
        nonlocal fitting, itq
        meta["itq"] = fit_itq_meta(np.stack([item.embedding for item in held]), loaded.config.bits)
        index.set_meta(collection, meta)
        itq = itq_from_meta(meta)
        reporter.log(f"fitted ITQ codes on {len(held)} embeddings")
        fitting = False
        upsert(held)
        held.clear()

    with reporter.task(f"ingest {records.dataset}", len(paths)) as bar:
        for embedded, failures in embed_batches(loaded, [paths[i] for i in order], batch_size, workers,
                                                pseudonymize):
            for failure in failures:
                if strict:
                    raise BadInputError(failure.path, failure.reason)
                summary.failed += 1
                summary.failures.append(f"{failure.path}: {failure.reason}")
                reporter.warn(f"{failure.path}: {failure.reason}")
            items = [replace(item, index=int(order[item.index])) for item in embedded]
            if fitting:
                held.extend(items)
                if len(held) >= itq_fit_size:
                    fit_now()
            else:
                upsert(items)
            bar.advance(len(embedded) + len(failures))
        if fitting and held:
            fit_now()
    summary.points_after = index.count(collection)
    summary.seconds = round(time.perf_counter() - started, 2)
    if summary.ingested == 0 and summary.total:
        raise CbirError(f"{records.root}: none of the {summary.total} images could be ingested "
                        f"(first error: {summary.failures[0] if summary.failures else 'none'})")
    return summary


def payload_labels(records: Records, names: list[str], negative: str) -> list[str]:
    """The payload's `labels` for an image whose positive labels are `names`.

    With nothing positive, NIH says "No Finding" and a one-label set (RSNA) says the negative label
    ("No Pneumonia"); folder datasets always have their class.
    """
    if records.layout == "folder" or names:
        return names
    return ["No Finding" if len(records.label_names) > 1 else negative]


def _point(records: Records, item: Embedded, code: np.ndarray, pseudonymize: Pseudonymizer, meta: dict,
           model_labels: list[str] | None) -> Point:
    """One point; `model_labels` (multilabel models) names the per-label probabilities stored beside the target's."""
    row = records.meta.iloc[item.index]
    label_row = records.labels[item.index]
    names = [n for n, v in zip(records.label_names, label_row, strict=True) if v > 0.5]
    target = int(label_row[records.target_index] > 0.5)
    primary = records.target if target else meta["negative_label"]
    csv_meta = SafeMeta(view=view_of(row.get("view")), sex=sex_of(row.get("sex")), age_band=age_band(row.get("age")),
                        pseudonym=pseudonymize(str(row["patient"])))
    safe = SafeMeta(view=item.meta.view, sex=item.meta.sex, age_band=item.meta.age_band,
                    modality=item.meta.modality, pseudonym=csv_meta.pseudonym).merged(csv_meta)
    labels = payload_labels(records, names, meta["negative_label"])
    boxes = row.get("boxes")
    per_label = dict(zip(model_labels, item.probabilities.tolist(), strict=True)) if model_labels else None
    body = payload(dataset=records.dataset, split=str(row["split"]), relpath=str(row["relpath"]), labels=labels,
                   primary=primary, target=target, meta=safe.as_payload(),
                   boxes=list(boxes) if isinstance(boxes, list | tuple | np.ndarray) else [],
                   probability=item.probability, code=code, probabilities=per_label)
    return Point(id=point_id(records.dataset, item.instance_key, str(row["relpath"])),
                 embedding=item.embedding.astype(np.float32), code=code.astype(np.uint8), payload=body)
