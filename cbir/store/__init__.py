"""The store: one `Index` facade over Qdrant Edge (embedded, the default), qdrant-client (a server, or its local
mode) and the in-memory engine, with the search planner. It knows points, payloads, filters and a collection's
record; it imports nothing from the models, the data or the embedding (`docs/architecture.md`). The names below
load their module on first use, so that the light modules of the package (settings, locations) load no NumPy."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cbir.store.base import Filter, Hit, Index, Point
    from cbir.store.edge_files import FlushPolicy
    from cbir.store.location import DEFAULT_LOCATION, open_index
    from cbir.store.server_settings import ServerSettings

_WHERE = {"Filter": "cbir.store.base", "Hit": "cbir.store.base", "Index": "cbir.store.base",
          "Point": "cbir.store.base", "FlushPolicy": "cbir.store.edge_files", "DEFAULT_LOCATION": "cbir.store.location",
          "open_index": "cbir.store.location", "ServerSettings": "cbir.store.server_settings"}
__all__ = ["DEFAULT_LOCATION", "Filter", "FlushPolicy", "Hit", "Index", "Point", "ServerSettings", "open_index"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'cbir.store' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
