"""Where an index is, and opening it (the engine's module loads only when one is opened)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cbir.store.edge_files import FlushPolicy
from cbir.store.server_settings import ServerSettings

if TYPE_CHECKING:
    from cbir.store.base import Index

DEFAULT_LOCATION = "./cbir-index"


def open_index(location: str | None = None, writable: bool = False, create: bool = False,
               server: ServerSettings | None = None, flush: FlushPolicy | None = None) -> Index:
    """Open the index at `location` (default `./cbir-index`).

    `http(s)://…` is a Qdrant server, reached with `server` (key, timeout, CA bundle, retries); `:memory:` and
    `local:PATH` are qdrant-client's local mode; anything else is a Qdrant Edge directory, whose writers flush
    as `flush` says. `create=True` (which needs `writable=True`) makes a missing index instead of failing.
    Nothing here reads the environment: `cbir.app.settings.Settings` does, once.
    """
    loc = location or DEFAULT_LOCATION
    if loc.startswith(("http://", "https://")) or loc == ":memory:" or loc.startswith("local:"):
        from cbir.store.client import ClientIndex  # lazily: qdrant-client is slow to import

        return ClientIndex(loc, writable=writable, create=create, settings=server)
    from cbir.store.edge import EdgeIndex

    return EdgeIndex(loc, writable=writable, create=create, flush=flush)
