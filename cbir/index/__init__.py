"""Vector index backends: Qdrant Edge (embedded, default) and qdrant-client (server or local mode)."""

from __future__ import annotations

import os

from cbir.index.base import Filter, Hit, Index, Point

__all__ = ["DEFAULT_LOCATION", "Filter", "Hit", "Index", "Point", "open_index", "resolve_location"]

DEFAULT_LOCATION = "./cbir-index"


def resolve_location(location: str | None) -> str:
    """`location`, else `$CBIR_INDEX`, else `./cbir-index`."""
    return location or os.environ.get("CBIR_INDEX") or DEFAULT_LOCATION


def open_index(location: str | None, writable: bool = False, create: bool = False,
               api_key: str | None = None, timeout: int | None = None, ca_cert: str | None = None) -> Index:
    """Open the index at `location` (see `resolve_location`).

    `http(s)://…` is a Qdrant server, reached with `api_key`, `timeout` and `ca_cert` or else
    $CBIR_QDRANT_API_KEY, $CBIR_QDRANT_TIMEOUT and $CBIR_QDRANT_CA_CERT; `:memory:` and `local:PATH` are
    qdrant-client's local mode; anything else is a Qdrant Edge directory. `create=True` (which needs
    `writable=True`) makes a missing index instead of failing.
    """
    loc = resolve_location(location)
    if loc.startswith(("http://", "https://")) or loc == ":memory:" or loc.startswith("local:"):
        from cbir.index.client import ClientIndex, ServerSettings  # lazily: qdrant-client is slow to import

        settings = ServerSettings.from_env(api_key, timeout, ca_cert)
        return ClientIndex(loc, writable=writable, create=create, settings=settings)
    from cbir.index.edge import EdgeIndex

    return EdgeIndex(loc, writable=writable, create=create)
