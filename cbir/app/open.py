"""Opening what a use-case works on: the index its settings name, and the model of a collection."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cbir.app.settings import Settings
from cbir.errors import CbirError
from cbir.store.location import open_index as open_store

if TYPE_CHECKING:
    from cbir.models import LoadedModel
    from cbir.store.base import Index


def open_index(settings: Settings, writable: bool = False, create: bool = False) -> Index:
    """The index at `settings.index`, reached with `settings.server` (a server) or flushed as
    `settings.edge_flush` (Qdrant Edge)."""
    return open_store(settings.index, writable=writable, create=create, server=settings.server,
                      flush=settings.edge_flush)


def collection_model(index: Index, collection: str, model: Path | None, device: str, settings: Settings
                     ) -> LoadedModel:
    """The model given as `model`, else the one the collection's record names: only on an embedded index (its
    record was written on this machine) or from a folder under `settings.model_dirs`. A record on a shared server
    is written by whoever may write there, and a checkpoint can carry code (TorchScript or torch.export
    encoders), so its path is never loaded without the user's say-so."""
    from cbir.models import load_checkpoint
    from cbir.models.device import resolve_device
    if model is None:
        record = index.record(collection)
        path = record.model_path
        if not path:
            raise CbirError(f"collection {collection!r} records no model path (imported from a snapshot, which "
                            f"carries none); pass --model with the model of fingerprint {record.model_fingerprint}")
        if getattr(index, "is_server", False) and not settings.allows_model_dir(Path(path)):
            raise CbirError(f"collection {collection!r} is on a shared server, and its record names model folder "
                            f"{path}: pass --model to load it (or list its parent folder in $CBIR_MODEL_DIRS)")
        model = Path(path)
    return load_checkpoint(model, resolve_device(device))
