"""Ingest: embed every image of a dataset and upsert embedding, code, labels and safe metadata."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np

from cbir.app.calibrate import calibrate
from cbir.app.datasets import collection_dataset, record_split
from cbir.app.settings import Settings
from cbir.console import QUIET, Reporter
from cbir.data.files import describe_skipped
from cbir.data.patients import LABEL_SOURCE
from cbir.data.records import Records, payload_labels, reconcile_records
from cbir.embed import Embedded, embed_batches
from cbir.embed.codes import ITQ_FIT_SIZE, check_code_source, collection_itq, fit_itq_meta
from cbir.errors import BadInputError, CbirError
from cbir.io import Pseudonymizer, SafeMeta
from cbir.io.dicom import peek_instance_key
from cbir.io.phi import age_band, sex_of, view_of
from cbir.io.thumbnails import thumbnail_spec
from cbir.labels import LabelSpace
from cbir.models import LoadedModel
from cbir.store.base import SCHEMA_VERSION, UNKNOWN_TARGET, Index, Point
from cbir.store.files import FileMap
from cbir.store.record import (
    KEYED_POINT_IDS,
    PLAIN_PATHS,
    PSEUDONYM_PATHS,
    RECORD_VERSION,
    CollectionRecord,
    add_root,
    upgraded,
)
from cbir.store.schema import payload, point_id
from cbir.store.teams import check_team
from cbir.store.versions import (
    Swap,
    check_alias_name,
    create_versioned,
    next_version,
    split_version,
    swap,
    versions,
)


@dataclass
class IngestSummary:
    collection: str
    total: int = 0
    ingested: int = 0
    already: int = 0        # in the collection before this run (by point ID), not read again
    skipped: int = 0        # duplicates within this run: same SOPInstanceUID and the same pixels
    failed: int = 0         # unreadable, missing, or a SOPInstanceUID conflict (same UID, other pixels)
    failures: list[str] = field(default_factory=list)
    points_before: int = 0
    points_after: int = 0
    seconds: float = 0.0
    swap: Swap | None = None
    labels_unknown: bool = False  # the dataset's labels are unknown (plain layout)
    dataset: str = ""             # the dataset id the points are stored under (`cbir.app.datasets`)
    patient_fallbacks: int = 0    # DICOM files without a usable PatientID: patients from the file rule
    patient_mismatches: int = 0   # headers whose patient differs from the label file's (the label file's is kept)
    left_out: int = 0             # files under the root that are not images, or a DICOMDIR lists but lack
    #                               (`Records.left_out`): never read
    left_out_reasons: str = ""    # how many for each reason (`cbir.data.files.describe_skipped`)
    calibrated: bool = False      # the vote was calibrated on the validation images (`cbir.app.calibrate`)

    @property
    def line(self) -> str:
        ingested = f"{self.ingested} ingested" + (" with unknown labels" if self.labels_unknown else "")
        text = (f"{self.total} files: {ingested}, {self.already} already in the index, "
                f"{self.skipped} duplicates skipped, {self.failed} failed"
                + (f", {self.left_out} left out" if self.left_out else "") + "; "
                f"collection {self.collection!r} holds {self.points_after} points ({self.seconds:.1f} s)")
        if self.patient_fallbacks:
            text += f"; {self.patient_fallbacks} DICOM files without a usable PatientID: patients by file name"
        if self.patient_mismatches:
            text += (f"; {self.patient_mismatches} DICOM headers name another patient than the label file "
                     "(the label file's patient was kept)")
        if self.left_out:
            text += f"; {self.left_out_reasons}"
        return text + (f"; reindex: {self.swap.line}" if self.swap else "")


def prepare_collection(index: Index, collection: str, loaded: LoadedModel, pseudonymize: Pseudonymizer,
                       records: Records, codes: str | None = None, shards: int = 1, replicas: int = 1,
                       reporter: Reporter = QUIET, team: str | None = None, version_of: str | None = None,
                       split: dict | None = None, keep_paths: bool = False,
                       thumbnails: bool = False) -> CollectionRecord:
    """Create the collection (`collection__v1` behind the alias `collection`), or check that an existing one
    matches this model, key, team, code source, path mode (`keep_paths`: plain paths, else pseudonyms) and the
    split of `records`' dataset (`split`, default `records.split_record()`), and record that split (and that
    it has thumbnails). `version_of=ALIAS` creates `collection` itself, as the next version of ALIAS (a
    reindex)."""
    check_code_source(codes, loaded.config.bits, loaded.config.vector_dim)
    if index.has_collection(collection):
        record = index.record(collection)
        record.check_model(loaded.fingerprint, loaded.config.vector_dim, loaded.described)
        record.check_key(pseudonymize.fingerprint)
        check_team(record, team)
        check_path_mode(record, keep_paths)
        if (shards, replicas) != (1, 1) and (shards, replicas) != (record.shards, record.replicas):
            reporter.warn(f"collection {collection!r} exists: --shards/--replicas apply only when it is created")
        if not record.keyed_point_ids and any(not str(p).lower().endswith(RASTER) for p in records.meta["path"]):
            raise CbirError(f"collection {collection!r} names its DICOM points by their SOPInstanceUIDs' plain hash "
                            "(made before point IDs were keyed), so whoever holds a study's UIDs can test whether "
                            "it is in the index: key them first with `cbir ingest --reindex` (same --data, --model "
                            "and --collection), then add to it")
        if codes is not None and codes != record.code_source:
            raise CbirError(f"collection {collection!r} stores {record.code_source} codes, not {codes}; "
                            "ingest into a new collection to change the code source")
    else:
        meta = collection_meta(loaded, pseudonymize, collection_space(loaded, records))
        meta.update(codes=codes or "model", shards=shards, replicas=replicas, team=team,
                    paths=PLAIN_PATHS if keep_paths else PSEUDONYM_PATHS,
                    thumbnails=thumbnail_spec() if thumbnails else None)
        if version_of is not None:
            index.create_collection(collection, loaded.config.vector_dim, loaded.config.bits, meta, shards, replicas)
        else:
            create_versioned(index, collection, loaded.config.vector_dim, loaded.config.bits, meta, shards,
                             replicas)
    def change(meta: dict) -> bool:
        """What this ingest records; applied to the stored record under the index's lock (`update_meta`)."""
        changed = False
        if thumbnails and not meta.get("thumbnails"):
            meta["thumbnails"], changed = thumbnail_spec(), True
        if meta.get("record_version") != RECORD_VERSION:   # a collection made before the typed record
            meta.update(upgraded(meta, loaded.config.label_names))
            changed = True
        changed = record_split(meta, split or records.split_record(), collection) or changed
        return add_root(meta, records.dataset_id, str(records.root)) or changed

    return CollectionRecord.of(index.update_meta(collection, change), collection)


def collection_space(loaded: LoadedModel, records: Records) -> LabelSpace:
    """A new collection's label space: the model's (its probability is of the model's target), else, for a
    model without labels, the dataset's."""
    names, target = list(loaded.config.label_names), loaded.config.target
    if target and target in names:
        return LabelSpace.of(names, target)
    if records.has_labels:
        return LabelSpace.of(records.label_names, records.target)
    return LabelSpace.of([target], target)


def check_path_mode(record: CollectionRecord, keep_paths: bool) -> None:
    """Refuse to add plain paths to a collection of pseudonyms, or pseudonyms to one of plain paths."""
    collection = record.name
    if keep_paths and record.path_mode == PSEUDONYM_PATHS:
        raise CbirError(f"collection {collection!r} names its files by pseudonyms: ingest into it without "
                        "--keep-paths, or into a new collection")
    if not keep_paths and record.path_mode == PLAIN_PATHS:
        raise CbirError(f"collection {collection!r} stores file paths in its payloads (made with --keep-paths, "
                        "or before cbir pseudonymised them): pass --keep-paths to add to it, or --reindex it to "
                        "pseudonymise them")


def ingest_records(records: Records, loaded: LoadedModel, index: Index, collection: str,
                   pseudonymize: Pseudonymizer, batch_size: int = 32, workers: int = 2, strict: bool = False,
                   reporter: Reporter = QUIET, codes: str | None = None,
                   itq_fit_size: int = ITQ_FIT_SIZE, may_fit_itq: bool = True, shards: int = 1,
                   replicas: int = 1, team: str | None = None, reindex: bool = False,
                   allow_count_change: bool = False, split: dict | None = None, keep_paths: bool = False,
                   thumbnails: bool = False, label_map: dict[str, str] | None = None,
                   settings: Settings | None = None) -> IngestSummary:
    """Embed and upsert every image; bad files are reported and counted, and the run goes on.

    `codes` picks the code source of a new collection (`cbir.embed.codes`; default: the model's). When ITQ
    still has to be fitted, images are taken in a seeded random order and the first `itq_fit_size` embeddings
    are held back until ITQ is fitted on them, so nothing is embedded twice. `may_fit_itq=False` (parallel
    ingest parts other than the first) refuses to fit, so that all parts share one set of ITQ parameters.

    `split` is the record of the dataset's split (`Records.split_record()` of the whole dataset, which a
    `--part` slice cannot compute itself); the collection records it and refuses another one for the same
    dataset.

    The points are stored under the dataset's id (`cbir.app.datasets.collection_dataset`: the user's
    `--dataset-id`, else the one the collection records for this root folder, else the fingerprint's), and each
    payload's `pseudonym` is the patient the split used (`Records.patient_pseudonyms`).

    `reindex=True` fills the next version of the existing collection `collection` (possibly with a new
    model) while queries keep using the current one, then moves the alias (`cbir.store.versions.swap`).

    Payloads name their files by keyed pseudonyms, recorded in this machine's file map (`cbir.store.files`)
    before the points are written; `keep_paths=True` stores the relative paths instead. `thumbnails=True`
    stores each image's thumbnail (`cbir.io.thumbnails`) with its point.

    The dataset's labels are reconciled with the collection's label space (`cbir.labels`; `label_map`
    renames labels first): payloads carry the collection's names, and a label it does not know is refused.

    `settings` (default: `Settings.from_env()`) gives the readers' policy and the folder of the local file map.
    Every ingest ends by calibrating the collection's vote (`cbir.app.calibrate`): the CLI, `reproduce`, the
    studies and the demo all get the same stored calibration.
    """
    settings = settings or Settings.from_env()
    started = time.perf_counter()
    alias = collection
    if reindex:
        collection = _start_reindex(index, alias, pseudonymize, team)
    else:
        check_alias_name(collection)
    known = index.record(alias) if index.has_collection(alias) else CollectionRecord.new(alias)
    records = collection_dataset(known, records, pseudonymize)
    split = {**split, "dataset": records.dataset_id} if split is not None else None
    record = prepare_collection(index, collection, loaded, pseudonymize, records, codes, shards, replicas, reporter,
                                team, version_of=alias if reindex else None, split=split, keep_paths=keep_paths,
                                thumbnails=thumbnails)
    records = reconcile_records(record.label_space, records, label_map)
    summary = IngestSummary(alias, total=len(records) + len(records.missing) + len(records.left_out),
                            left_out=len(records.left_out),
                            left_out_reasons=describe_skipped(records.left_out) if records.left_out else "",
                            points_before=index.count(collection), labels_unknown=not records.has_labels,
                            dataset=records.dataset_id, patient_fallbacks=records.patient_fallbacks)
    paths = records.meta["path"].tolist()
    names = _FileNames(records, pseudonymize, record.path_mode == PSEUDONYM_PATHS, settings.state_dir,
                       record.keyed_point_ids)
    patients = records.patient_pseudonyms(pseudonymize)
    from_label_file = (records.meta["patient_source"] == LABEL_SOURCE).to_numpy()

    def fail(path: str, reason: str) -> None:
        if strict:
            raise BadInputError(path, reason)
        summary.failed += 1
        summary.failures.append(f"{path}: {reason}")
        reporter.warn(f"{path}: {reason}")

    for relpath, reason in records.missing:
        fail(str(records.root / relpath), reason)
    todo = np.arange(len(paths))
    if summary.points_before:
        todo = _not_yet_ingested(index, collection, records, names, reporter)
        summary.already = len(paths) - len(todo)
    fitting = record.code_source == "itq" and record.itq is None
    if fitting and not may_fit_itq:
        raise CbirError(f"collection {collection!r} has no fitted ITQ codes yet: ingest part 1 first, which fits "
                        "them, then start the other parts")
    order = np.random.default_rng(0).permutation(todo) if fitting else todo
    model_labels = list(loaded.config.label_names) if loaded.task.per_label else None
    seen: dict[str, tuple[str, str]] = {}  # point ID → (pixel digest, path) of the first file with it
    held: list[Embedded] = []
    itq = collection_itq(record)  # parsed once; None while it is still to be fitted, or for the model's codes

    def upsert(items: list[Embedded]) -> None:
        points, positions = [], []
        item_codes = ([i.code for i in items] if itq is None or not items
                      else list(itq.encode(np.stack([i.embedding for i in items]))))
        for item, code in zip(items, item_codes, strict=True):
            point = _point(records, item, code, patients[item.index], record, model_labels, names)
            if from_label_file[item.index] and item.meta.pseudonym not in (None, patients[item.index]):
                summary.patient_mismatches += 1
            if point.id in seen:
                digest, first = seen[point.id]
                if digest == item.digest:
                    summary.skipped += 1
                    reporter.warn(f"{paths[item.index]}: same SOPInstanceUID and pixels as {first}; skipped")
                else:
                    fail(paths[item.index], f"SOPInstanceUID conflict: same UID as {first} but other pixels; "
                                            "kept the first")
                continue
            seen[point.id] = (item.digest, paths[item.index])
            points.append(point)
            positions.append(item.index)
        if points:
            names.remember(positions)   # before the points: a point the map cannot resolve would stay so
            index.upsert(collection, points)
            summary.ingested += len(points)

    def fit_now() -> None:
        nonlocal fitting, itq
        fitted = fit_itq_meta(np.stack([item.embedding for item in held]), loaded.config.bits)
        index.update_meta(collection, lambda stored: stored.update(itq=fitted))
        itq = collection_itq(index.record(collection))
        reporter.log(f"fitted ITQ codes on {len(held)} embeddings")
        fitting = False
        upsert(held)
        held.clear()

    with names, reporter.task(f"ingest {records.dataset}", len(order)) as bar:
        names.remember(sorted(set(range(len(paths))) - set(todo.tolist())))  # ingested before, perhaps elsewhere
        for embedded, failures in embed_batches(loaded, [paths[i] for i in order], batch_size, workers,
                                                pseudonymize, thumbnails, settings.reader):
            for failure in failures:
                fail(failure.path, failure.reason)
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
    if summary.ingested == 0 and summary.already == 0 and summary.total:
        raise CbirError(f"{records.root}: none of the {summary.total} images could be ingested "
                        f"(first error: {summary.failures[0] if summary.failures else 'none'})")
    if reindex:
        summary.swap = swap(index, alias, collection, allow_count_change, reporter=reporter)
    summary.calibrated = calibrate(index, alias, reporter=reporter) is not None  # every ingest ends calibrated
    summary.points_after = index.count(alias)
    summary.seconds = round(time.perf_counter() - started, 2)
    return summary


#: File endings of images whose point IDs never came from a UID (PNG, JPEG: from the keyed file pseudonym).
RASTER = (".png", ".jpg", ".jpeg")


class _FileNames:
    """How this ingest names each image in its payload and point ID: by the keyed pseudonym of its relative path
    (recorded in the local file map), or by the path itself (`pseudonyms=False`: plain paths)."""

    def __init__(self, records: Records, pseudonymize: Pseudonymizer, pseudonyms: bool, state_dir: Path,
                 keyed_ids: bool = True) -> None:
        self.dataset = records.dataset_id
        self.state_dir = state_dir
        self.pseudonymize = pseudonymize
        self.pseudonyms = pseudonyms
        self.keyed_ids = keyed_ids   # point IDs from the keyed instance key (collections made before: unkeyed)
        self.relpaths = [str(rel) for rel in records.meta["relpath"]]
        self.file_map: FileMap | None = None   # open while upserting (`with`)

    def file(self, position: int) -> str | None:
        """The pseudonym of the image at `position` (None with plain paths)."""
        return self.pseudonymize.file(self.dataset, self.relpaths[position]) if self.pseudonyms else None

    def point_id(self, position: int, instance_key: str | None) -> str:
        if instance_key and self.keyed_ids:
            instance_key = self.pseudonymize.instance(instance_key)
        return point_id(self.dataset, instance_key, self.relpaths[position], self.file(position))

    def remember(self, positions: list[int]) -> None:
        """Record in the local file map which file each pseudonym of the images at `positions` names."""
        if self.pseudonyms:
            assert self.file_map is not None, "remember() runs inside `with`"  # and `file` gives pseudonyms
            self.file_map.add((cast(str, self.file(i)), self.dataset, self.relpaths[i]) for i in positions)

    def __enter__(self) -> _FileNames:
        if self.pseudonyms:
            self.file_map = FileMap.local(self.state_dir, writable=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file_map is not None:
            self.file_map.close()
            self.file_map = None


def _not_yet_ingested(index: Index, collection: str, records: Records, names: _FileNames,
                      reporter: Reporter) -> np.ndarray:
    """Positions of the images whose point ID is not in the collection yet, found without decoding pixels
    (a DICOM's ID comes from its header's SOPInstanceUID, other files' from their file name), so that an
    interrupted or repeated ingest resumes where it stopped."""
    ids = [names.point_id(i, peek_instance_key(path)) for i, path in enumerate(records.meta["path"])]
    present: set[str] = set()
    for start in range(0, len(ids), 1024):
        present |= index.existing_ids(collection, ids[start:start + 1024])
    if present:
        reporter.log(f"{len(present)} of {len(ids)} images are already in {collection!r}; not read again")
    return np.array([i for i, pid in enumerate(ids) if pid not in present], dtype=np.int64)


def _start_reindex(index: Index, alias: str, pseudonymize: Pseudonymizer, team: str | None) -> str:
    """The name of the version to fill; the current one must exist, and key and team must match it."""
    if alias not in index.list_aliases():
        if index.has_collection(alias):
            raise CbirError(f"collection {alias!r} has no versions yet; run `cbir migrate` first")
        raise CbirError(f"--reindex: there is no collection {alias!r} to reindex (ingest without --reindex)")
    current = index.record(alias)
    current.check_key(pseudonymize.fingerprint)
    check_team(current, team)
    current_number = (split_version(index.resolve(alias)) or (alias, 0))[1]
    for name in versions(index, alias):  # what an interrupted reindex left behind: start over
        if (split_version(name) or (alias, 0))[1] > current_number:
            index.delete_collection(name)
    return next_version(index, alias)


def _point(records: Records, item: Embedded, code: np.ndarray, patient: str | None, record: CollectionRecord,
           model_labels: list[str] | None, files: _FileNames) -> Point:
    """One point; `patient` is the pseudonym of the patient the split used (`Records.patient_pseudonyms`), which
    the payload stores whatever the file's header says; `model_labels` (multilabel models) names the per-label
    probabilities stored beside the target's."""
    row = records.meta.iloc[item.index]
    label_row = records.labels[item.index]
    names = [n for n, v in zip(records.label_names, label_row, strict=True) if v > 0.5]
    if records.has_labels:
        target = int(label_row[records.target_index] > 0.5)
        primary: str | None = records.target if target else record.negative_label
    else:
        target, primary = UNKNOWN_TARGET, None
    csv_meta = SafeMeta(view=view_of(row.get("view")), sex=sex_of(row.get("sex")), age_band=age_band(row.get("age")),
                        pseudonym=patient)
    safe = SafeMeta(view=item.meta.view, sex=item.meta.sex, age_band=item.meta.age_band,
                    modality=item.meta.modality, pseudonym=patient).merged(csv_meta)
    labels = payload_labels(records, names, str(record.negative_label))
    boxes = row.get("boxes")
    per_label = dict(zip(model_labels, item.probabilities.tolist(), strict=True)) if model_labels else None
    file = files.file(item.index)
    body = payload(dataset=records.dataset_id, split=str(row["split"]), relpath=None if file else str(row["relpath"]),
                   file=file, labels=labels, primary=primary, target=target, meta=safe.as_payload(),
                   boxes=list(boxes) if isinstance(boxes, list | tuple | np.ndarray) else [],
                   probability=item.probability, code=code, probabilities=per_label, team=record.team,
                   thumbnail=item.thumbnail, shape=(item.geometry.height, item.geometry.width))
    return Point(id=files.point_id(item.index, item.instance_key), embedding=item.embedding.astype(np.float32),
                 code=code.astype(np.uint8), payload=body)


def collection_meta(loaded: LoadedModel, pseudonymize: Pseudonymizer, space: LabelSpace) -> dict[str, Any]:
    config = loaded.config
    return {
        "schema_version": SCHEMA_VERSION,
        "model_fingerprint": loaded.fingerprint,
        "model_path": str(loaded.path),
        "backbone": config.backbone,
        "task": config.task,
        "image_size": config.image_size,
        "dim": config.vector_dim,
        "bits": config.bits,  # the hash layer's bits for task hash, the LSH code's otherwise
        "target": space.target,
        "negative_label": space.negative,
        "label_space": space.to_dict(),     # `cbir.labels`: what every dataset that meets it is checked against
        # what the payloads' `probability` is (`cbir.models.calibration`): calibrated, read from this point on
        "probability": {"calibrated": loaded.calibration is not None, "operating_point": loaded.operating_point},
        "key_fingerprint": pseudonymize.fingerprint,
        "point_ids": KEYED_POINT_IDS,       # DICOM point IDs from the keyed instance key (`cbir.store.record`)
        "roots": {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "record_version": RECORD_VERSION,   # `cbir.store.record`
        "revision": 0,
    }
