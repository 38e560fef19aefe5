"""Which dataset of a collection a folder is: the id its points, roots and split records are stored under.

A dataset's id is the keyed id of its fingerprint, or the one the user gave (`cbir.data.identity`). One rule
keeps existing collections working: a folder that the collection already records as a root (`roots` in its
metadata) keeps the dataset name recorded for it, so an interrupted, repeated or grown ingest finds its points
again by the same point IDs, and a collection made when datasets were named by their folder (``"chest_xray"``,
``"rsna"``) keeps that name for the points it holds and for new points of the same folder. A user-given
``--dataset-id`` always wins.
"""

from __future__ import annotations

from typing import Any

from cbir.data.identity import dataset_id
from cbir.data.records import Records
from cbir.data.splits import describe_record, same_data, split_differences
from cbir.errors import CbirError
from cbir.io import Pseudonymizer
from cbir.store.record import CollectionRecord


def collection_dataset(record: CollectionRecord, records: Records, pseudonymize: Pseudonymizer) -> Records:
    """`records` under the dataset id this collection (`record`; `CollectionRecord.new` for a new one) knows them
    by: the user's
    `--dataset-id`, else the name recorded for the same root folder with the same layout, else its own id
    (computed here for records built without one)."""
    if records.dataset_id_given:
        return records
    root = str(records.root)
    for name, roots in record.roots.items():
        held = record.split(name)
        if root in roots and (held is None or held.get("layout") in (None, records.layout)):
            return records if name == records.dataset_id else records.with_dataset_id(name)
    if records.dataset_id:
        return records
    return records.with_dataset_id(dataset_id(records.layout, records.meta, pseudonymize))


def split_of(record: CollectionRecord, model_split: dict[str, Any]) -> dict[str, Any] | None:
    """The collection's split record of the dataset `model_split` (a checkpoint's) describes: by its id, else the
    one of the same images (`same_data`) recorded under another name, e.g. in a collection named by folders."""
    held = record.split(str(model_split.get("dataset")))
    if held is not None or not model_split.get("dataset_digest"):
        return held
    return next((r for r in record.splits.values() if same_data(r, model_split)), None)


def record_split(meta: dict[str, Any], record: dict[str, Any], collection: str) -> bool:
    """Record the split of the dataset being ingested; refuse one that differs from what the collection
    already holds for that dataset (the points already in it keep their `split`, so the two would disagree).
    Returns whether `meta` changed."""
    dataset = record["dataset"]
    held = CollectionRecord(collection, meta).split(dataset)
    if held is not None:
        why = split_differences(held, record)
        if why:
            raise CbirError(f"collection {collection!r} holds dataset {dataset} split as {describe_record(held)}, "
                            f"but this ingest splits them as {describe_record(record)} ({'; '.join(why)}); ingest "
                            "into a new collection (or --reindex it)")
        if held == record:
            return False
    meta["splits"] = {**(meta.get("splits") or {}), dataset: record}
    return True
