"""The query path: one image file → its k most similar archived cases, the kNN vote and the model's view.

The JSON form (`QueryResult.to_json`) is a stable interface:
  {"query": {"path", "view", "sex", "age_band"},
   "collection", "model_fingerprint", "k",
   "neighbors": [{"rank", "id", "score", "hamming", "labels", "label", "path", "file", "dataset", "split",
                  "view", "sex", "age_band", "boxes"}],
   "vote": {"label", "fraction", "positive_fraction", "probability", "corrected_share", "weights",
            "calibrated", "close_case", "in_domain", "domain_distance", "reliable", "warnings", "labelled",
            "skipped_unknown"},
   "prediction": {"label", "probability", "target", "boxes"}}

File names can carry identifiers (RSNA's and many hospital exports' are the PatientID or MRN), so by default
none is printed: a neighbour's `file` is its keyed pseudonym ("f-…"; null in collections with plain paths)
and its `path` is null, except in collections with plain paths (`cbir ingest --keep-paths`, and those made
before paths were pseudonymised), which store it. `query.path` is a keyed pseudonym of the query's file name
as given (null without a key). With `local_paths=True` (`cbir query --local-paths`) `query.path` is the name
as given and a neighbour's `path` is its relative path wherever this machine's file map knows it
(`cbir.index.files`), else null.

Neighbours whose label is unknown (`cbir.index.base.UNKNOWN_TARGET`: `label` null, `labels` [], `target` -1)
are listed but do not vote: `vote.labelled` neighbours voted, `vote.skipped_unknown` were left out, and the
fractions are of the labelled ones (`vote.label` is null when none is labelled).

`prediction.boxes` is present for detection models only: [{"box": [x, y, w, h], "score"}], best first, in the
query image's original pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir.embed import Embedded, embed_and_detect
from cbir.errors import CbirError
from cbir.index.base import Filter, Hit, Index, has_label
from cbir.index.codes import collection_code
from cbir.index.files import FileMap, LocalFiles
from cbir.index.records import FilterValue
from cbir.index.schema import FILTER_ALIASES, check_model
from cbir.io import Pseudonymizer, XrayImage, read_image
from cbir.models import LoadedModel, decode_size
from cbir.threads import single_threaded

NEIGHBOR_FIELDS = ("labels", "label", "path", "file", "dataset", "split", "view", "sex", "age_band", "boxes")
#: A payload → the `path` its neighbour entry shows.
PathOf = Callable[[dict[str, Any]], str | None]


def stored_path(payload: dict[str, Any]) -> str | None:
    """The relative path a payload stores itself (plain paths only), else None."""
    return payload.get("path") or None


def query_name(name: str | Path, pseudonymize: Pseudonymizer | None, local_paths: bool = False) -> str | None:
    """What `query.path` says about the query's file: its name with `local_paths`, else a keyed pseudonym."""
    if local_paths:
        return str(name)
    return pseudonymize.file("query", str(name)) if pseudonymize is not None else None


def parse_filters(items: list[str] | None) -> Filter:
    """`key=value` (repeat a key for any-of; `key!=value` to exclude) → Filter."""
    must: dict[str, list[str]] = {}
    must_not: dict[str, list[str]] = {}
    for item in items or []:
        negate = "!=" in item
        key, sep, value = item.partition("!=" if negate else "=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise CbirError(f"bad filter {item!r}: use key=value or key!=value (e.g. label=Pneumonia)")
        field_name = FILTER_ALIASES.get(key, key)
        (must_not if negate else must).setdefault(field_name, []).append(value)
    unwrap: dict[str, FilterValue] = {k: v[0] if len(v) == 1 else v for k, v in must.items()}
    unwrap_not: dict[str, FilterValue] = {k: v[0] if len(v) == 1 else v for k, v in must_not.items()}
    return Filter(must=unwrap, must_not=unwrap_not)


@dataclass
class QueryResult:
    collection: str
    model_fingerprint: str
    k: int
    neighbors: list[dict[str, Any]]
    vote: dict[str, Any]
    prediction: dict[str, Any]
    query: dict[str, Any] = field(default_factory=dict)
    pixels: np.ndarray | None = field(default=None, repr=False)  # the decoded query, for pictures

    def to_json(self) -> dict[str, Any]:
        return {"query": self.query, "collection": self.collection, "model_fingerprint": self.model_fingerprint,
                "k": self.k, "neighbors": self.neighbors, "vote": self.vote, "prediction": self.prediction}


def search_embedding(index: Index, collection: str, embedded: Embedded, k: int, flt: Filter | None = None,
                     prefilter: int | None = None, hamming_radius: int | None = None) -> list[Hit]:
    use_code = prefilter is not None or hamming_radius is not None
    return index.search(collection, embedded.embedding, k, flt=flt, code=embedded.code if use_code else None,
                        prefilter=prefilter, hamming_radius=hamming_radius)


#: Mean chroma (`XrayImage.colour`) above which a query is a colour picture, not a radiograph: radiographs stored
#: as RGB have equal channels (0), and a few coloured annotation marks stay far below it.
COLOUR_LIMIT = 0.05


def warnings_for(close: bool | None, colour: float, domain_distance: float | None = None,
                 domain_threshold: float | None = None) -> list[str]:
    """Why the vote is unreliable, one short sentence each ([] when nothing is known against it)."""
    out = []
    if close is False:
        out.append("the archive holds no close case: the nearest is less similar than 99 % of validation "
                   "queries' nearest cases")
    if in_domain(domain_distance, domain_threshold) is False:
        out.append(f"unlike the model's training images (feature distance {domain_distance:.2f} above the threshold "
                   f"{domain_threshold:.2f} set on validation images): no close case is likely")
    if colour > COLOUR_LIMIT:
        out.append(f"a colour picture (mean chroma {colour:.2f}), not a radiograph")
    return out


def in_domain(distance: float | None, threshold: float | None) -> bool | None:
    """Whether a query's domain distance (`cbir.models.domain`) is at or below the threshold; None: unknown."""
    return None if distance is None or threshold is None else bool(distance <= threshold)


def vote(hits: list[Hit], target: str, meta: dict[str, Any] | None = None, colour: float = 0.0,
         domain_distance: float | None = None, domain_threshold: float | None = None) -> dict[str, Any]:
    """The neighbours' vote (`cbir.search.vote`): similarity-weighted, corrected for the archive's class
    frequencies, with the probability calibrated on the collection's validation images. Neighbours whose label
    is unknown do not vote: `labelled` did, `skipped_unknown` were left out.

    `label` is the target or the collection's negative label by the corrected rule; `fraction` is the share of
    labelled neighbours that carry `label` and `positive_fraction` the share that carry the target (both
    unweighted); `probability` the calibrated probability of the target; `weights` each neighbour's share of
    the vote, in rank order (0 for an unknown label); `calibrated` whether the collection holds a calibration;
    `close_case` whether the nearest neighbour is at least as similar as the validation queries' nearest
    usually are (`None` uncalibrated); `in_domain` whether the query's backbone features are like the model's
    training images (`domain_distance` at or below `domain_threshold`, `cbir.models.domain`; `None` for a model
    without a domain model); `warnings` says why the vote is unreliable (no close case, out of domain, or a colour
    query: `colour`, its mean chroma, above `COLOUR_LIMIT`), and `reliable` is False when there is any.
    """
    meta = meta or {}
    negative = meta.get("negative_label", f"No {target}")
    body = meta.get("calibration") or {}
    known = [has_label(hit.payload) for hit in hits]
    counted = {"labelled": sum(known), "skipped_unknown": len(hits) - sum(known)}
    nearest = body.get("nearest") or {}
    close = None if "threshold" not in nearest or not hits else bool(float(hits[0].score) >= nearest["threshold"])
    domain = {"in_domain": in_domain(domain_distance, domain_threshold),
              "domain_distance": None if domain_distance is None else round(float(domain_distance), 4)}
    if not any(known):
        close = close if hits else (False if body else None)
        return {"label": None, "fraction": 0.0, "positive_fraction": 0.0, "probability": None,
                "weights": [0.0] * len(hits), "calibrated": bool(body), "close_case": close, **domain,
                "reliable": False, "warnings": warnings_for(close, colour, domain_distance, domain_threshold),
                **counted}
    from cbir.search.vote import VoteCalibration, decide, weights
    calibration = VoteCalibration.from_dict(body.get("vote"))
    scores = np.array([[float(hit.score) if ok else np.nan for hit, ok in zip(hits, known, strict=True)]])
    targets = np.array([[int(hit.payload.get("target", 0)) if ok else -1 for hit, ok in zip(hits, known, strict=True)]])
    decision, probability, share = decide(scores, targets, calibration)
    w = weights(scores, calibration.temperature)[0]
    positive = float((targets[0] == 1).sum() / max(sum(known), 1))
    warned = warnings_for(close, colour, domain_distance, domain_threshold)
    return {"label": target if decision[0] == 1 else negative,
            "fraction": positive if decision[0] == 1 else 1.0 - positive,
            "positive_fraction": positive, "probability": round(float(probability[0]), 6),
            "corrected_share": round(float(share[0]), 6),
            "weights": [round(float(x), 6) for x in w / max(float(w.sum()), 1e-12)],
            "calibrated": bool(body), "close_case": close, **domain, "reliable": not warned, "warnings": warned,
            **counted}


def describe_vote(vote: dict[str, Any], n_neighbours: int) -> str:
    """The kNN vote in words ("Pneumonia (60% of 5 neighbours)"), saying how many neighbours with unknown
    labels were skipped."""
    skipped = int(vote.get("skipped_unknown") or 0)
    if vote["label"] is None:
        return f"none (all {n_neighbours} neighbours have unknown labels)" if skipped else "none (no neighbours)"
    voters = f"{n_neighbours - skipped} labelled neighbours" if skipped else f"{n_neighbours} neighbours"
    return f"{vote['label']} ({vote['fraction']:.0%} of {voters}" + \
        (f"; {skipped} with unknown labels skipped)" if skipped else ")")


def query_image(path: str | Path, loaded: LoadedModel, index: Index, collection: str, k: int = 10,
                flt: Filter | None = None, prefilter: int | None = None, hamming_radius: int | None = None,
                pseudonymize: Pseudonymizer | None = None, local_paths: bool = False) -> QueryResult:
    """Read, embed and search one image file (`local_paths`: see the module docstring)."""
    meta = index.get_meta(collection)
    check_model(meta, loaded, collection)
    image = read_image(path, pseudonymize, decode_size(loaded.config))

    def search(embedded: Embedded) -> list[Hit]:
        hits = search_embedding(index, collection, embedded, k, flt, prefilter, hamming_radius)
        if not hits and index.count(collection) == 0:
            raise CbirError(f"collection {collection!r} is empty: ingest images into it first (cbir ingest)")
        return hits

    name = query_name(path, pseudonymize, local_paths)
    if not local_paths:
        return answer(image, name, loaded, meta, collection, k, search)
    with FileMap.local() as file_map:
        return answer(image, name, loaded, meta, collection, k, search, LocalFiles(meta, file_map).relpath)


def answer(image: XrayImage, name: str | None, loaded: LoadedModel, meta: dict[str, Any], collection: str, k: int,
           search: Callable[[Embedded], list[Hit]], path_of: PathOf = stored_path) -> QueryResult:
    """Embed a read image, search with `search` (an index, or an in-memory copy) and assemble the result, with
    `name` as `query.path` and `path_of(payload)` as each neighbour's `path`. A detector embeds and finds its
    boxes in the same forward pass."""
    embedded, boxes = embed_and_detect(loaded, image)
    with single_threaded():   # one query's matrix-vector products: threads would only wait (cbir.threads)
        embedded.code = collection_code(meta, embedded.embedding, embedded.code)
        hits = search(embedded)
    target, negative = meta.get("target", loaded.config.target), meta.get("negative_label", "negative")
    probability = embedded.probability
    prediction = {"label": target if probability >= 0.5 else negative, "probability": round(probability, 6),
                  "target": target}
    if loaded.task.boxes:
        prediction["boxes"] = boxes
    return QueryResult(
        collection=collection, model_fingerprint=loaded.fingerprint, k=k,
        neighbors=[_neighbor(rank, hit, path_of) for rank, hit in enumerate(hits, start=1)],
        vote=vote(hits, target, meta, image.colour, embedded.domain_distance,
                  loaded.domain.threshold if loaded.domain is not None else None),
        prediction=prediction,
        query={"path": name, "view": image.meta.view, "sex": image.meta.sex,
               "age_band": image.meta.age_band, "shape": list(image.shape)},
        pixels=image.pixels,
    )


def _neighbor(rank: int, hit: Hit, path_of: PathOf) -> dict[str, Any]:
    entry: dict[str, Any] = {"rank": rank, "id": hit.id, "score": round(float(hit.score), 6),
                             "hamming": hit.hamming}
    entry.update({name: hit.payload.get(name) for name in NEIGHBOR_FIELDS})
    entry["path"] = path_of(hit.payload)
    return entry

