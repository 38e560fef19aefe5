"""What a collection records about itself, point IDs, payloads, and the compatibility checks."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

from cbir.errors import CbirError
from cbir.store.base import pack_code

POINT_NAMESPACE = uuid.UUID("5f0c9a52-0d3c-4d1e-9a4c-6b1c3e0f2a77")

#: CLI filter keys → payload fields.
FILTER_ALIASES = {"label": "labels", "age": "age_band", "patient": "pseudonym"}
#: Payload fields a filter may name → whether each value must be one the collection holds (a small vocabulary;
#: pseudonyms and file pseudonyms are opaque, so a value there is not checked).
FILTER_FIELDS = {"labels": True, "label": True, "dataset": True, "split": True, "view": True, "sex": True,
                 "age_band": True, "modality": True, "team": True, "pseudonym": False, "file": False, "path": False}


def check_filter(flt: Any, collection: str, count: Callable[[str, Any], int],
                 vocabulary: Callable[[str], set[str]]) -> None:
    """Refuse, in one line, a filter that names a field the payloads do not have, or a value that no image of
    the collection holds (`count(field, value)` is 0), suggesting the values that match it ignoring case (or
    listing what there is): a typo must never read as "no neighbours". `vocabulary(field)` is only asked on the
    way to an error."""
    user_names = {field: key for key, field in FILTER_ALIASES.items()}
    for conditions in (flt.must, flt.must_not):
        for field, value in conditions.items():
            name = user_names.get(field, field)
            if field not in FILTER_FIELDS:
                keys = sorted({user_names.get(f, f) for f in FILTER_FIELDS if FILTER_FIELDS[f]} | {"patient"})
                raise CbirError(f"unknown filter key {name!r} for collection {collection!r}: use one of "
                                f"{', '.join(keys)}")
            if not FILTER_FIELDS[field]:
                continue
            for item in value if isinstance(value, list | tuple) else [value]:
                if count(field, item):
                    continue
                seen = sorted(str(v) for v in vocabulary(field))
                close = [v for v in seen if v.lower() == str(item).lower()]
                hint = (f"did you mean {name}={close[0]}?" if close else
                        f"it holds {', '.join(seen[:12])}{' …' if len(seen) > 12 else ''}" if seen else
                        f"no image has a {name}")
                raise CbirError(f"filter {name}={item}: no image in collection {collection!r} has it; {hint}")


def payload_values(payloads: Iterable[dict[str, Any]], field: str) -> set[str]:
    """The distinct values of a payload field (each element of a list field)."""
    out: set[str] = set()
    for body in payloads:
        value = body.get(field)
        out.update(str(v) for v in (value if isinstance(value, list) else [value]) if v is not None)
    return out


def point_id(dataset: str, instance_key: str | None, relpath: str, file: str | None = None) -> str:
    """Deterministic: the same image always gets the same ID, from its SOPInstanceUID (as a one-way instance
    key), else from its file's keyed pseudonym `file` (collections with pseudonymised paths, so the ID of a file
    named by an MRN cannot be recomputed from a guessed MRN), else from its relative path (plain paths)."""
    if instance_key:
        name = f"{dataset}:uid:{instance_key}"
    elif file:
        name = f"{dataset}:file:{file}"
    else:
        name = f"{dataset}:path:{relpath}"
    return str(uuid.uuid5(POINT_NAMESPACE, name))


def payload(*, dataset: str, split: str, relpath: str | None, file: str | None, labels: list[str],
            primary: str | None, target: int, meta: dict[str, Any], boxes: list, probability: float, code: Any,
            probabilities: dict[str, float] | None = None, team: str | None = None,
            thumbnail: str | None = None, shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """The stored payload: labels and coarse metadata only, never a raw identifier.

    The image file is named by `file` (its keyed pseudonym) or, with plain paths, by `relpath` (`path`); the
    other one is None. `probability` is the model's probability of the collection's target for every task;
    multilabel models also store `probabilities` (label name → probability). `thumbnail` (base64 WebP, see
    `cbir.io.thumbnails`) comes with `shape`, the original image's [height, width], which maps `boxes` onto it.
    """
    body = {
        "dataset": dataset,
        "split": split,
        "path": relpath,
        "file": file,
        "labels": labels,
        "label": primary,
        "target": int(target),
        "view": meta.get("view"),
        "sex": meta.get("sex"),
        "age_band": meta.get("age_band"),
        "modality": meta.get("modality"),
        "pseudonym": meta.get("pseudonym"),
        "boxes": [[round(float(v), 1) for v in box] for box in boxes],
        "probability": round(float(probability), 6),
        "hash": pack_code(code),
        "team": team,
    }
    if probabilities is not None:
        body["probabilities"] = {name: round(float(p), 6) for name, p in probabilities.items()}
    if thumbnail is not None:
        body["thumbnail"] = thumbnail
        body["shape"] = [int(v) for v in shape] if shape is not None else None
    return body
