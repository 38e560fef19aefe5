"""The use-cases that start from a dataset folder: ingest it into a collection, or evaluate a collection with it
(or with the model's own held-out patients) as queries. `cbir ingest`, `cbir evaluate` and `cbir.ingest` /
`cbir.evaluation` are these functions; `reproduce`, the studies and the demo call the same `ingest_records` and
`evaluate_collection` on datasets they have already split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbir.app.audit import AuditResult
from cbir.app.evaluate import evaluate_collection
from cbir.app.ingest import IngestSummary, ingest_records
from cbir.app.open import collection_model, open_index
from cbir.app.settings import Settings
from cbir.console import QUIET, Reporter
from cbir.data.layout import load_dataset_for_model
from cbir.data.records import Records
from cbir.data.splits import parse_part, same_data
from cbir.errors import CbirError
from cbir.io import load_pseudonymizer
from cbir.labels import parse_label_map
from cbir.models import LoadedModel
from cbir.store.teams import team_collection


@dataclass(frozen=True)
class DatasetOptions:
    """How a folder becomes a dataset: its layout, its split (None: the model's), its patients and its id."""

    layout: str = "auto"
    split: dict[str, Any] = field(default_factory=dict)   # seed, val_fraction, test_fraction, folds, fold
    other_split: bool = False                              # allow a split other than the model's
    patient_regex: str | None = None
    dataset_id: str | None = None
    label_map: list[str] = field(default_factory=list)     # OLD=NEW, as `--label-map`


@dataclass(frozen=True)
class IngestOptions:
    """`cbir ingest`'s options beyond the dataset's."""

    batch_size: int = 32
    workers: int = 2
    strict: bool = False
    device: str = "auto"
    codes: str | None = None
    part: str | None = None          # "i/n": the i-th of n deterministic slices
    shards: int = 1
    replicas: int = 1
    reindex: bool = False
    allow_count_change: bool = False
    keep_paths: bool = False
    thumbnails: bool = False


def ingest(data: Path, model: Path, collection: str | None = None, dataset: DatasetOptions | None = None,
           options: IngestOptions | None = None, settings: Settings | None = None, team: str | None = None,
           reporter: Reporter = QUIET) -> IngestSummary:
    """Embed every image of the folder `data` with `model` and upsert it into `collection`, split as the model's
    training data was; the collection is calibrated at the end (`ingest_records`)."""
    from cbir.models import load_checkpoint
    from cbir.models.device import resolve_device
    settings = settings or Settings.from_env()
    dataset, options = dataset or DatasetOptions(), options or IngestOptions()
    name = team_collection(collection or settings.collection, team)
    if options.reindex and options.part:
        raise CbirError("--reindex builds a whole new version in one run; it cannot be combined with --part")
    loaded = load_checkpoint(model, resolve_device(options.device))
    records = _dataset(data, loaded, dataset, str(model), reporter)
    split = records.split_record()
    first_part = True
    if options.part:
        try:
            i, n = parse_part(options.part)
        except ValueError as exc:
            raise CbirError(str(exc)) from None
        records, first_part = records.part(i, n), i == 1
    if options.keep_paths:
        reporter.warn("--keep-paths: file names go into the index as they are; use it only if they identify nobody")
    with open_index(settings, writable=True, create=True) as index:
        return ingest_records(records, loaded, index, name, load_pseudonymizer(), options.batch_size, options.workers,
                              options.strict, reporter, codes=options.codes, may_fit_itq=first_part,
                              shards=options.shards, replicas=options.replicas, team=team, reindex=options.reindex,
                              allow_count_change=options.allow_count_change, split=split,
                              keep_paths=options.keep_paths, thumbnails=options.thumbnails,
                              label_map=parse_label_map(dataset.label_map), settings=settings)


def evaluate(collection: str | None = None, model: Path | None = None, queries: Path | None = None,
             out: Path = Path("cbir-report"), k: int = 10, dataset: DatasetOptions | None = None,
             robustness: bool = False, device: str = "auto", settings: Settings | None = None,
             team: str | None = None, reporter: Reporter = QUIET) -> dict[str, Any]:
    """Stage 1 and stage 2 of `collection` on its model's held-out test patients, or on the folder `queries`
    (only its test split when it is the model's own training data); writes the report into `out` and returns it."""
    settings = settings or Settings.from_env()
    dataset = dataset or DatasetOptions()
    name = team_collection(collection or settings.collection, team)
    with open_index(settings) as index:
        loaded = collection_model(index, name, model, device, settings)
        records = _query_records(queries, loaded, dataset, reporter) if queries else None
        return evaluate_collection(index, name, loaded, out, k, records, load_pseudonymizer(), reporter,
                                   allow_other_split=dataset.other_split, robustness=robustness,
                                   label_map=parse_label_map(dataset.label_map), settings=settings)


def _dataset(root: Path, loaded: LoadedModel, dataset: DatasetOptions, model_name: str, reporter: Reporter
             ) -> Records:
    records, notes = load_dataset_for_model(root, dataset.layout, loaded.split, dataset.split, dataset.other_split,
                                            model_name, dataset.patient_regex, dataset.dataset_id)
    for note in notes:
        reporter.warn(note)
    return records


def _query_records(root: Path, loaded: LoadedModel, dataset: DatasetOptions, reporter: Reporter) -> Records:
    """`--queries`: the dataset split by the model's rule; only its test split if the model was trained on it."""
    records = _dataset(root, loaded, DatasetOptions(dataset.layout, {}, dataset.other_split, dataset.patient_regex,
                                                    dataset.dataset_id), str(loaded.path), reporter)
    if loaded.split is not None and same_data(loaded.split, records.split_record()):
        records = records.split("test")
        reporter.log(f"queries: the {len(records)} test images of {root} (the model was trained on this dataset)")
        if len(records) == 0:
            raise CbirError(f"{root}: the model was trained on this dataset and held out no test images; "
                            "give another dataset as --queries")
    return records


@dataclass(frozen=True)
class AuditOptions:
    """`cbir audit`'s options beyond the dataset's."""

    threshold: float | None = None      # None: `cbir.app.audit.THRESHOLD`
    pixel: bool = False                 # also compare each pair's pixels
    workers: int = 2


def audit(data: Path, dataset: DatasetOptions | None = None, against: Path | None = None,
          against_layout: str = "auto", collection: str | None = None, model: Path | None = None,
          options: AuditOptions | None = None, settings: Settings | None = None, reporter: Reporter = QUIET
          ) -> AuditResult:
    """Near-duplicate images across the splits of `data`, between `data` and the folder `against`, or between
    `data` and the points of `collection` (by their tiny images; see `cbir.app.audit`)."""
    from cbir.app.audit import THRESHOLD, audit_collection, audit_datasets, audit_splits
    from cbir.data.layout import load_dataset
    from cbir.data.splits import SplitSpec
    if against is not None and collection is not None:
        raise CbirError("give --against DIR or --collection NAME, not both")
    settings = settings or Settings.from_env()
    dataset, options = dataset or DatasetOptions(), options or AuditOptions()
    pseudonymize = load_pseudonymizer()
    explicit = {k: v for k, v in dataset.split.items() if v is not None}
    records = load_dataset(data, dataset.layout, split=SplitSpec().replace(**explicit),
                           patient_regex=dataset.patient_regex, pseudonymize=pseudonymize)
    common: dict[str, Any] = {"threshold": THRESHOLD if options.threshold is None else options.threshold,
                              "reporter": reporter, "workers": options.workers, "pixel": options.pixel,
                              "settings": settings}
    if against is not None:
        return audit_datasets(records, load_dataset(against, against_layout, pseudonymize=pseudonymize),
                              pseudonymize, **common)
    if collection is not None:
        with open_index(settings) as index:
            return audit_collection(records, index, collection, collection_model(index, collection, model, "cpu",
                                                                                  settings), pseudonymize, **common)
    return audit_splits(records, pseudonymize, **common)
