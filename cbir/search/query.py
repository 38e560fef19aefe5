"""The query path: one image file → its k most similar archived cases, the kNN vote and the model's view.

The JSON form (`QueryResult.to_json`) is a stable interface:
  {"query": {"path", "view", "sex", "age_band", "shape", "label"},
   "collection", "model_fingerprint", "k",
   "neighbors": [{"rank", "id", "score", "hamming", "labels", "label", "target", "path", "file", "dataset",
                  "split", "view", "sex", "age_band", "boxes", "self_match"}],
   "vote": {"label", "probability", "operating_point", "target", "fraction", "positive_fraction",
            "corrected_share", "weights", "effective_neighbours", "nearest_case", "calibrated",
            "uncalibrated_because", "close_case", "in_domain", "domain_distance", "reliable", "warnings",
            "labelled", "skipped_unknown", "self_matches", "included_self"},
   "prediction": {"label", "probability", "target", "calibrated", "operating_point", "raw_score", "boxes"}}

`prediction.probability` is the model's calibrated probability of the target (`cbir.models.calibration`;
`calibrated` false for checkpoints without a calibration: then it is the raw score) and `prediction.label` that
probability read at `operating_point`; `raw_score` is the sigmoid before calibration.

`query.label` is the query's own label where the caller knows it (the demo), else null. A neighbour with
`self_match` is the query itself (`SELF_SCORE`); it does not vote unless `--include-self`.

File names can carry identifiers (RSNA's and many hospital exports' are the PatientID or MRN), so by default
none is printed: a neighbour's `file` is its keyed pseudonym ("f-…"; null in collections with plain paths)
and its `path` is null, except in collections with plain paths (`cbir ingest --keep-paths`, and those made
before paths were pseudonymised), which store it. `query.path` is a keyed pseudonym of the query's file name
as given (null without a key). With `local_paths=True` (`cbir query --local-paths`) `query.path` is the name
as given and a neighbour's `path` is its relative path wherever this machine's file map knows it
(`cbir.store.files`), else null.

Neighbours whose label is unknown (`cbir.store.base.UNKNOWN_TARGET`: `label` null, `labels` [], `target` -1)
are listed but do not vote: `vote.labelled` neighbours voted, `vote.skipped_unknown` were left out, and the
fractions are of the labelled ones (`vote.label` is null when none is labelled).

`prediction.boxes` is present for detection models only: [{"box": [x, y, w, h], "score"}], best first, in the
query image's original pixels.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir.embed import Embedded, embed_and_detect
from cbir.embed.codes import collection_code
from cbir.errors import CbirError
from cbir.io import DEFAULT_READER, Pseudonymizer, ReaderPolicy, XrayImage, load_pseudonymizer, read_image
from cbir.models import LoadedModel, decode_size
from cbir.store.base import Filter, Hit, Index, has_label
from cbir.store.files import FileMap, LocalFiles
from cbir.store.record import CollectionRecord
from cbir.store.records import FilterValue
from cbir.store.schema import FILTER_ALIASES, check_filter, payload_values
from cbir.threads import single_threaded

NEIGHBOR_FIELDS = ("labels", "label", "target", "path", "file", "dataset", "split", "view", "sex", "age_band",
                   "boxes")
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


#: A patient pseudonym as payloads store it (`cbir.io.phi.Pseudonymizer`).
PSEUDONYM = re.compile(r"p-[0-9a-f]{20}")


def parse_filters(items: list[str] | None, pseudonymize: Pseudonymizer | None = None) -> Filter:
    """`key=value` (repeat a key for any-of; `key!=value` to exclude) → Filter. A `patient=` value is a PatientID
    (or a label file's patient), compared as its keyed pseudonym, as payloads store it (`pseudonymize`, else this
    machine's key); a value that already is a pseudonym ("p-" and 20 hex digits, as query JSON shows) is kept."""
    must: dict[str, list[str]] = {}
    must_not: dict[str, list[str]] = {}
    for item in items or []:
        negate = "!=" in item
        key, sep, value = item.partition("!=" if negate else "=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise CbirError(f"bad filter {item!r}: use key=value or key!=value (e.g. label=Pneumonia)")
        field_name = FILTER_ALIASES.get(key, key)
        if field_name == "pseudonym" and not PSEUDONYM.fullmatch(value):
            pseudonymize = pseudonymize or load_pseudonymizer()
            value = str(pseudonymize(value))
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


def vote(hits: list[Hit], target: str, record: CollectionRecord | None = None, colour: float = 0.0,
         domain_distance: float | None = None, domain_threshold: float | None = None,
         uncalibrated_because: str | None = None) -> dict[str, Any]:
    """The neighbours' vote (`cbir.search.vote`): similarity-weighted, corrected for the archive's class
    frequencies, with the probability calibrated on the collection's validation images. Neighbours whose label
    is unknown do not vote: `labelled` did, `skipped_unknown` were left out.

    `probability` is the calibrated probability of the target and `label` that probability read at
    `operating_point` (the target when `probability` ≥ it, else the collection's negative label;
    `cbir.search.vote`), so the two never disagree. `fraction` is the share of labelled neighbours that carry
    `label` and `positive_fraction` the share that carry the target (both unweighted); `weights` each
    neighbour's share of the vote, in rank order (0 for an unknown label), and `effective_neighbours` how many
    equally weighted neighbours they amount to; `nearest_case` is true when that is below
    `cbir.search.vote.NEAREST_CASE` (the label is the nearest case's, not a vote). `calibrated` says whether the
    probability is calibrated: the collection holds a calibration and the query's k, filter and prefilter are
    those it was fitted with (else `uncalibrated_because` says what differs, and a warning too). `close_case`
    whether the nearest neighbour is at least as similar as the validation queries' nearest usually are (`None`
    uncalibrated); `in_domain` whether the query's backbone features are like the model's training images
    (`domain_distance` at or below `domain_threshold`, `cbir.models.domain`; `None` for a model without a domain
    model); `warnings` says why the vote is unreliable (no close case, out of domain, a colour query: `colour`,
    its mean chroma, above `COLOUR_LIMIT`, or an uncalibrated probability), and `reliable` is False when there
    is any.
    """
    from cbir.search.vote import NEAREST_CASE, VoteCalibration, decide, effective_neighbours, weights
    negative = (record.negative_label if record is not None else None) or f"No {target}"
    body = (record.vote_calibration if record is not None else None) or {}
    calibration = VoteCalibration.from_dict(body.get("vote"))
    known = [has_label(hit.payload) for hit in hits]
    counted = {"labelled": sum(known), "skipped_unknown": len(hits) - sum(known)}
    nearest = body.get("nearest") or {}
    close = None if "threshold" not in nearest or not hits else bool(float(hits[0].score) >= nearest["threshold"])
    domain = {"in_domain": in_domain(domain_distance, domain_threshold),
              "domain_distance": None if domain_distance is None else round(float(domain_distance), 4)}
    state = {"target": target, "calibrated": bool(body) and uncalibrated_because is None,
             "uncalibrated_because": uncalibrated_because, "operating_point": round(calibration.operating_point, 6)}
    if not any(known):
        close = close if hits else (False if body else None)
    warned = warnings_for(close, colour, domain_distance, domain_threshold)
    if uncalibrated_because:
        warned.append(f"the probability is not calibrated for this query: {uncalibrated_because}")
    if not any(known):
        return {"label": None, "fraction": 0.0, "positive_fraction": 0.0, "probability": None,
                "weights": [0.0] * len(hits), "effective_neighbours": 0.0, "nearest_case": False, **state,
                "close_case": close, **domain, "reliable": False, "warnings": warned, **counted}
    scores = np.array([[float(hit.score) if ok else np.nan for hit, ok in zip(hits, known, strict=True)]])
    targets = np.array([[int(hit.payload.get("target", 0)) if ok else -1 for hit, ok in zip(hits, known, strict=True)]])
    decision, probability, share = decide(scores, targets, calibration)
    w = weights(scores, calibration.temperature)[0]
    effective = float(effective_neighbours(w))
    positive = float((targets[0] == 1).sum() / max(sum(known), 1))
    return {"label": target if decision[0] == 1 else negative,
            "fraction": positive if decision[0] == 1 else 1.0 - positive,
            "positive_fraction": positive, "probability": round(float(probability[0]), 6),
            "corrected_share": round(float(share[0]), 6),
            "weights": [round(float(x), 6) for x in w / max(float(w.sum()), 1e-12)],
            "effective_neighbours": round(effective, 3), "nearest_case": bool(effective < NEAREST_CASE), **state,
            "close_case": close, **domain, "reliable": not warned, "warnings": warned, **counted}


def describe_vote(vote: dict[str, Any], n_neighbours: int) -> str:
    """The vote in words, saying what decided it ("Pneumonia: P(Pneumonia) = 0.41, calibrated; Pneumonia from
    0.25 on; 10 neighbours, weighted like 3.2", or that it is a nearest-case label), and how many neighbours with
    unknown labels or self-matches were left out."""
    skipped = int(vote.get("skipped_unknown") or 0)
    selves = int(vote.get("self_matches") or 0) if not vote.get("included_self") else 0
    voting = n_neighbours - selves
    if vote["label"] is None:
        return f"none (all {voting} neighbours have unknown labels)" if skipped else "none (no neighbours)"
    voters = f"{voting - skipped} labelled neighbours" if skipped else f"{voting} neighbours"
    left = [f"{skipped} with unknown labels skipped"] if skipped else []
    left += [f"{selves} self-match{'es' if selves > 1 else ''} left out"] if selves else []
    tail = f"; {'; '.join(left)}" if left else ""
    if "operating_point" not in vote:   # a result from before the probability decided the label
        return f"{vote['label']} ({vote['fraction']:.0%} of {voters}{tail})"
    how = "calibrated" if vote.get("calibrated") else "not calibrated"
    target = vote.get("target") or "the target"
    if vote.get("nearest_case"):
        basis = (f"a nearest-case label: the nearest of {voters} carries {max(vote['weights'] or [0]):.0%} of "
                 "the weight")
    else:
        basis = f"{voters}, weighted like {vote.get('effective_neighbours', 0):.1f}"
    return (f"{vote['label']}: P({target}) = {vote['probability']:.2f}, {how}; {target} from "
            f"{vote['operating_point']:.2f} on; {basis}{tail}")


@dataclass(frozen=True)
class Search:
    """How one query searches: k neighbours, a payload filter, a Hamming prefilter, and whether a self-match
    (`SELF_SCORE`) votes."""

    k: int = 10
    flt: Filter | None = None
    prefilter: int | None = None
    hamming_radius: int | None = None
    include_self: bool = False

    @property
    def fetch(self) -> int:
        """How many to fetch: one more than k, so that k others remain when a self-match is left out."""
        return self.k if self.include_self else self.k + 1


#: A neighbour at least this similar is the query itself (the same instance, or a pixel duplicate of it): the
#: same pixels give the same embedding, up to float rounding (cosine ≥ 1 − 1e-6), while two different images of
#: one patient stay far below (docs/results.md, the audit's similarities).
SELF_SCORE = 0.9999


def query_image(path: str | Path, loaded: LoadedModel, index: Index, collection: str, k: int = 10,
                flt: Filter | None = None, prefilter: int | None = None, hamming_radius: int | None = None,
                pseudonymize: Pseudonymizer | None = None, local_paths: bool = False, include_self: bool = False,
                known_label: str | None = None, policy: ReaderPolicy = DEFAULT_READER,
                state_dir: Path | None = None) -> QueryResult:
    """Read (as `policy` allows), embed and search one image file (`local_paths`: see the module docstring; the
    names come from the local file map in `state_dir`; `include_self`, `known_label`: see `answer`)."""
    record = index.record(collection)
    record.check_model(loaded.fingerprint, loaded.config.vector_dim, loaded.described)
    if flt:
        check_filter(flt, collection, lambda field, value: index.count(collection, Filter(must={field: value})),
                     lambda field: payload_values((p.payload for p in index.scroll(collection, with_vectors=False)),
                                                  field))
    image = read_image(path, pseudonymize, decode_size(loaded.config), policy)
    how = Search(k, flt, prefilter, hamming_radius, include_self)

    def search(embedded: Embedded) -> list[Hit]:
        hits = search_embedding(index, collection, embedded, how.fetch, flt, prefilter, hamming_radius)
        if not hits and index.count(collection) == 0:
            raise CbirError(f"collection {collection!r} is empty: ingest images into it first (cbir ingest)")
        return hits

    name = query_name(path, pseudonymize, local_paths)
    if not local_paths:
        return answer(image, name, loaded, record, how, search, known_label=known_label)
    if state_dir is None:
        raise CbirError("local_paths needs the folder of this machine's file map (state_dir)")
    with FileMap.local(state_dir) as file_map:
        return answer(image, name, loaded, record, how, search, LocalFiles(record, file_map).relpath,
                      known_label=known_label)


def answer(image: XrayImage, name: str | None, loaded: LoadedModel, record: CollectionRecord, how: Search,
           search: Callable[[Embedded], list[Hit]], path_of: PathOf = stored_path,
           known_label: str | None = None) -> QueryResult:
    """Embed a read image, search with `search` (an index, or an in-memory copy; it fetches `how.fetch`) and
    assemble the result, with `name` as `query.path` and `path_of(payload)` as each neighbour's `path`. A
    detector embeds and finds its boxes in the same forward pass.

    A neighbour at least `SELF_SCORE` similar is the query itself: it is listed with `self_match: true` and
    left out of the vote (`vote.self_matches` counts them) unless `how.include_self`. `known_label`, the query's
    own label where the caller knows it (the demo, an evaluation), shows as `query.label` beside the vote."""
    embedded, boxes = embed_and_detect(loaded, image)
    with single_threaded():   # one query's matrix-vector products: threads would only wait (cbir.threads)
        embedded.code = collection_code(record, embedded.embedding, embedded.code)
        hits = search(embedded)
    selves = [float(hit.score) >= SELF_SCORE for hit in hits]
    if how.include_self or not any(selves):
        hits, selves = hits[:how.k], selves[:how.k]
    voters = hits if how.include_self else [hit for hit, own in zip(hits, selves, strict=True) if not own][:how.k]
    target, negative = record.target or loaded.config.target, record.negative_label or "negative"
    from cbir.search.calibrate import mismatch
    verdict = vote(voters, target, record, image.colour, embedded.domain_distance,
                   loaded.domain.threshold if loaded.domain is not None else None,
                   mismatch(record.vote_calibration, how.k, how.flt, how.prefilter, how.hamming_radius))
    verdict |= {"self_matches": sum(selves), "included_self": how.include_self}
    probability = embedded.probability
    prediction = {"label": target if probability >= loaded.operating_point else negative,
                  "probability": round(probability, 6), "target": target,
                  "calibrated": loaded.calibration is not None, "operating_point": round(loaded.operating_point, 6),
                  "raw_score": round(embedded.raw_probability, 6)}
    if loaded.task.boxes:
        prediction["boxes"] = boxes
    return QueryResult(
        collection=record.name, model_fingerprint=loaded.fingerprint, k=how.k,
        neighbors=[_neighbor(rank, hit, path_of) | {"self_match": own}
                   for rank, (hit, own) in enumerate(zip(hits, selves, strict=True), start=1)],
        vote=verdict,
        prediction=prediction,
        query={"path": name, "view": image.meta.view, "sex": image.meta.sex, "age_band": image.meta.age_band,
               "shape": list(image.shape), "label": known_label},
        pixels=image.pixels,
    )


def _neighbor(rank: int, hit: Hit, path_of: PathOf) -> dict[str, Any]:
    entry: dict[str, Any] = {"rank": rank, "id": hit.id, "score": round(float(hit.score), 6),
                             "hamming": hit.hamming}
    entry.update({name: hit.payload.get(name) for name in NEIGHBOR_FIELDS})
    entry["path"] = path_of(hit.payload)
    return entry

