"""cbir: content-based image retrieval for chest X-rays. The Python API (`cbir.api`): `open_index`, `ingest`,
`query`, `evaluate` and `Settings`, the same use-cases that the `cbir` command calls."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cbir.api import evaluate, ingest, open_index, query
    from cbir.app.settings import Settings

__version__ = "0.1.0"
__all__ = ["Settings", "evaluate", "ingest", "open_index", "query"]


def __getattr__(name: str) -> Any:
    """The API's names load `cbir.api` on first use: `import cbir.io` alone stays light."""
    if name == "Settings":
        return importlib.import_module("cbir.app.settings").Settings
    if name in __all__:
        return getattr(importlib.import_module("cbir.api"), name)
    raise AttributeError(f"module 'cbir' has no attribute {name!r}")
