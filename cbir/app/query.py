"""The query use-case: one image file → its k nearest archived cases, the neighbours' calibrated vote and the
model's own calibrated probability, as the dict that `cbir query --json` prints (docs: "Query JSON")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbir.app.open import collection_model, open_index
from cbir.app.settings import Settings
from cbir.io import load_pseudonymizer
from cbir.search import parse_filters, query_image
from cbir.store.teams import team_collection
from cbir.threads import limit_process


@dataclass(frozen=True)
class QueryOptions:
    """What to search and how (`cbir query`'s options)."""

    k: int = 10
    filters: list[str] = field(default_factory=list)   # key=value / key!=value, as `--filter`
    prefilter: int | None = None                       # keep the N nearest by Hamming distance first
    hamming_radius: int | None = None                  # or the codes within this Hamming distance
    include_self: bool = False                         # let an archived copy of the query vote
    local_paths: bool = False                          # show this machine's file names (never stored)
    montage: Path | None = None                        # also write a PNG montage here
    device: str = "auto"


def query(image: str | Path, collection: str | None = None, model: Path | None = None,
          options: QueryOptions | None = None, settings: Settings | None = None, team: str | None = None
          ) -> dict[str, Any]:
    """Query `collection` (default `settings.collection`) with one DICOM, PNG or JPEG file; `model` defaults to
    the one the collection records. Returns the query JSON (with `montage` when one was written)."""
    settings = settings or Settings.from_env()
    options = options or QueryOptions()
    name = team_collection(collection or settings.collection, team)
    limit_process(1)   # one query: BLAS on one thread (cbir/threads.py)
    pseudonymize = load_pseudonymizer()
    flt = parse_filters(options.filters, pseudonymize)
    with open_index(settings) as index:
        loaded = collection_model(index, name, model, options.device, settings)
        result = query_image(image, loaded, index, name, options.k, flt, options.prefilter, options.hamming_radius,
                             pseudonymize, options.local_paths, options.include_self, policy=settings.reader,
                             state_dir=settings.state_dir)
        payload = result.to_json()
        if options.montage is not None:
            from cbir.report.montage import write_montage
            from cbir.search.pictures import neighbor_pictures
            pictures = neighbor_pictures(index, name, payload["neighbors"], settings.state_dir)
            assert result.pixels is not None  # `query_image` keeps the decoded query
            write_montage(payload, result.pixels, pictures, options.montage)
            payload["montage"] = str(options.montage)
    return payload
