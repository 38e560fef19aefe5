"""The query path: one image file → its k most similar archived cases, the kNN vote and the model's view.

The JSON form (`QueryResult.to_json`) is a stable interface:
  {"query": {"path", "view", "sex", "age_band"},
   "collection", "model_fingerprint", "k",
   "neighbors": [{"rank", "id", "score", "hamming", "labels", "label", "path", "dataset", "split",
                  "view", "sex", "age_band", "boxes"}],
   "vote": {"label", "fraction", "positive_fraction", "labelled", "skipped_unknown"},
   "prediction": {"label", "probability", "target", "boxes"}}

Neighbours whose label is unknown (`cbir.index.base.UNKNOWN_TARGET`: `label` null, `labels` [], `target` -1)
are listed but do not vote: `vote.labelled` neighbours voted, `vote.skipped_unknown` were left out, and the
fractions are of the labelled ones (`vote.label` is null when none is labelled).

`prediction.boxes` is present for detection models only: [{"box": [x, y, w, h], "score"}], best first, in the
query image's original pixels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir.embed import Embedded, embed_and_detect
from cbir.errors import CbirError
from cbir.index.base import Filter, Hit, Index, has_label
from cbir.index.codes import collection_code
from cbir.index.schema import FILTER_ALIASES, check_model
from cbir.io import Pseudonymizer, XrayImage, read_image
from cbir.models import LoadedModel

NEIGHBOR_FIELDS = ("labels", "label", "path", "dataset", "split", "view", "sex", "age_band", "boxes")


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
    unwrap = {k: v[0] if len(v) == 1 else v for k, v in must.items()}
    return Filter(must=unwrap, must_not={k: v[0] if len(v) == 1 else v for k, v in must_not.items()})


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


def vote(hits: list[Hit], target: str) -> dict[str, Any]:
    """Majority label among the labelled neighbours (ties go to the better-ranked label); neighbours whose
    label is unknown are skipped and counted."""
    voters = [hit for hit in hits if has_label(hit.payload)]
    counted = {"labelled": len(voters), "skipped_unknown": len(hits) - len(voters)}
    if not voters:
        return {"label": None, "fraction": 0.0, "positive_fraction": 0.0, **counted}
    labels = [str(hit.payload.get("label")) for hit in voters]
    counts = Counter(labels)
    best = max(counts.values())
    winner = next(label for label in labels if counts[label] == best)
    positive = sum(1 for hit in voters if int(hit.payload.get("target", 0)) == 1)
    return {"label": winner, "fraction": best / len(voters), "positive_fraction": positive / len(voters), **counted}


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
                pseudonymize: Pseudonymizer | None = None) -> QueryResult:
    """Read, embed and search one image file."""
    meta = index.get_meta(collection)
    check_model(meta, loaded, collection)
    image = read_image(path, pseudonymize)

    def search(embedded: Embedded) -> list[Hit]:
        hits = search_embedding(index, collection, embedded, k, flt, prefilter, hamming_radius)
        if not hits and index.count(collection) == 0:
            raise CbirError(f"collection {collection!r} is empty: ingest images into it first (cbir ingest)")
        return hits

    return answer(image, str(path), loaded, meta, collection, k, search)


def answer(image: XrayImage, name: str, loaded: LoadedModel, meta: dict[str, Any], collection: str, k: int,
           search: Callable[[Embedded], list[Hit]]) -> QueryResult:
    """Embed a read image, search with `search` (an index, or an in-memory copy) and assemble the result.
    A detector embeds and finds its boxes in the same forward pass."""
    embedded, boxes = embed_and_detect(loaded, image)
    embedded.code = collection_code(meta, embedded.embedding, embedded.code)
    hits = search(embedded)
    target, negative = meta.get("target", loaded.config.target), meta.get("negative_label", "negative")
    probability = embedded.probability
    prediction = {"label": target if probability >= 0.5 else negative, "probability": round(probability, 6),
                  "target": target}
    if loaded.config.task == "detection":
        prediction["boxes"] = boxes
    return QueryResult(
        collection=collection, model_fingerprint=loaded.fingerprint, k=k,
        neighbors=[_neighbor(rank, hit) for rank, hit in enumerate(hits, start=1)],
        vote=vote(hits, target),
        prediction=prediction,
        query={"path": name, "view": image.meta.view, "sex": image.meta.sex,
               "age_band": image.meta.age_band, "shape": list(image.shape)},
        pixels=image.pixels,
    )


def _neighbor(rank: int, hit: Hit) -> dict[str, Any]:
    entry: dict[str, Any] = {"rank": rank, "id": hit.id, "score": round(float(hit.score), 6),
                             "hamming": hit.hamming}
    entry.update({name: hit.payload.get(name) for name in NEIGHBOR_FIELDS})
    return entry

