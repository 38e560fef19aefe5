"""The serve use-case: a warm searcher over one collection (the model loaded, the collection in memory), for
`cbir serve` and any long-lived process that answers many queries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cbir.app.open import collection_model, open_index
from cbir.app.settings import Settings
from cbir.io import load_pseudonymizer
from cbir.search.warm import WarmSearcher
from cbir.store.teams import team_collection
from cbir.threads import limit_process


@contextmanager
def open_searcher(settings: Settings, collection: str | None = None, team: str | None = None,
                  model: Path | None = None, device: str = "auto", local_paths: bool = False
                  ) -> Iterator[WarmSearcher]:
    """A `WarmSearcher` for `collection` (default `settings.collection`), reading uploads as `settings.reader`
    allows and this machine's files through its file map; closed, with its index, on exit."""
    limit_process(1)   # single queries from request threads: BLAS on one thread, set once (cbir/threads.py)
    name = team_collection(collection or settings.collection, team)
    index = open_index(settings)
    try:
        loaded = collection_model(index, name, model, device, settings)
        searcher = WarmSearcher(index, name, loaded, load_pseudonymizer(), local_paths=local_paths,
                                state_dir=settings.state_dir, policy=settings.reader)
        try:
            yield searcher
        finally:
            searcher.close()
    finally:
        index.close()
