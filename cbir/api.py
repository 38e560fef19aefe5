"""The Python API: the same use-cases that the CLI calls, for a notebook or a script.

    import cbir
    settings = cbir.Settings.from_env()          # $CBIR_INDEX, $CBIR_MAX_PIXELS, … read once
    result = cbir.query("new-film.dcm", collection="mine", k=10, settings=settings)
    report = cbir.evaluate(collection="mine", out="eval-mine", settings=settings)
    with cbir.open_index(settings=settings) as index:
        print(index.count("mine"))

`query` returns the dict that `cbir query --json` prints, `evaluate` the report that `cbir evaluate --json` prints
(with `per_query`), `ingest` the summary whose `line` `cbir ingest` prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbir.app.settings import Settings

if TYPE_CHECKING:
    from cbir.app.ingest import IngestSummary
    from cbir.store.base import Index


def open_index(location: str | None = None, writable: bool = False, create: bool = False,
               settings: Settings | None = None) -> Index:
    """The index at `location` (default: `settings.index`, i.e. $CBIR_INDEX or ./cbir-index)."""
    from cbir.app.open import open_index as open_settings
    return open_settings((settings or Settings.from_env()).with_options(index=location), writable, create)


def query(image: str | Path, collection: str | None = None, k: int = 10, filters: list[str] | None = None,
          model: str | Path | None = None, prefilter: int | None = None, hamming_radius: int | None = None,
          montage: str | Path | None = None, include_self: bool = False, device: str = "auto",
          settings: Settings | None = None, team: str | None = None) -> dict[str, Any]:
    """The k nearest archived cases of one DICOM, PNG or JPEG file, the neighbours' calibrated vote and the
    model's calibrated probability (`cbir query`)."""
    from cbir.app.query import QueryOptions
    from cbir.app.query import query as run_query
    options = QueryOptions(k, list(filters or []), prefilter, hamming_radius, include_self, False,
                           Path(montage) if montage else None, device)
    return run_query(image, collection, Path(model) if model else None, options, settings, team)


def evaluate(collection: str | None = None, queries: str | Path | None = None, out: str | Path = "cbir-report",
             k: int = 10, model: str | Path | None = None, robustness: bool = False, device: str = "auto",
             settings: Settings | None = None, team: str | None = None) -> dict[str, Any]:
    """Stage 1 and stage 2 with 95 % intervals and the majority baseline (`cbir evaluate`): on the model's
    held-out test patients, or on the dataset folder `queries`; writes report.md/json into `out`."""
    from cbir.app.folders import evaluate as run_evaluate
    return run_evaluate(collection, Path(model) if model else None, Path(queries) if queries else None, Path(out),
                        k, robustness=robustness, device=device, settings=settings, team=team)


def ingest(data: str | Path, model: str | Path, collection: str | None = None, layout: str = "auto",
           settings: Settings | None = None, team: str | None = None, **options: Any) -> IngestSummary:
    """Embed and upsert every image of the folder `data` (`cbir ingest`; `options` are
    `cbir.app.folders.IngestOptions`' fields), then calibrate the collection's vote."""
    from cbir.app.folders import DatasetOptions, IngestOptions
    from cbir.app.folders import ingest as run_ingest
    return run_ingest(Path(data), Path(model), collection, DatasetOptions(layout), IngestOptions(**options), settings,
                      team)
