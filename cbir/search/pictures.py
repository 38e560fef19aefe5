"""The picture of an archived case, for the viewer and montages: its image file where this machine has it (the
team that ingested, `cbir.store.files.LocalFiles`), else the thumbnail stored with its point (`cbir ingest
--thumbnails`), which is all that other teams, or anyone once the archive folder is gone, can see."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbir.errors import BadInputError, IndexError_
from cbir.io import read_image
from cbir.io.thumbnails import thumbnail_pixels
from cbir.store.base import THUMBNAIL, Index
from cbir.store.files import FileMap, LocalFiles

#: Stored thumbnails kept in memory (a few KB each).
CACHE_SIZE = 4096


@dataclass
class Picture:
    pixels: np.ndarray          # grey float32 in [0, 1]
    boxes: list[list[float]]    # the case's boxes, [x, y, w, h] in these pixels
    source: str                 # "file" or "thumbnail"


class CasePictures:
    """Pictures of one collection's points; stored thumbnails are fetched in one request per batch and cached."""

    def __init__(self, index: Index, collection: str, files: LocalFiles, cache_size: int = CACHE_SIZE,
                 guard: contextlib.AbstractContextManager[Any] | None = None) -> None:
        self.index, self.collection, self.files = index, collection, files
        self.cache_size = cache_size
        #: Held while the index is read and the cache changes: a warm searcher's lock, so that reads from
        #: several threads take turns with its searches and reloads (image files are read outside it).
        self._guard = guard if guard is not None else threading.Lock()
        self._stored: OrderedDict[str, dict[str, Any] | None] = OrderedDict()  # id → payload with a thumbnail

    def picture(self, point_id: str, payload: dict[str, Any]) -> Picture | None:
        """The case's image file if this machine has it and it reads, else its stored thumbnail, else None."""
        path = self.files.find(payload)
        if path is not None:
            try:
                return Picture(read_image(path).pixels, [list(b) for b in payload.get("boxes") or []], "file")
            except BadInputError:
                pass   # changed or damaged since it was ingested: the thumbnail shows what was ingested
        stored = self._thumbnail_payloads([point_id]).get(point_id)
        if stored is None:
            return None
        try:
            pixels = thumbnail_pixels(stored[THUMBNAIL])
        except ValueError:
            return None
        shape = stored.get("shape") or pixels.shape
        scale = pixels.shape[1] / max(float(shape[1]), 1.0)
        boxes = [[float(v) * scale for v in box] for box in stored.get("boxes") or []]
        return Picture(pixels, boxes, "thumbnail")

    def prefetch(self, hits: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Fetch, in one request, the stored thumbnails of those (id, payload) that this machine has no file of
        (best effort: while another process writes an embedded collection, `picture` asks again later)."""
        with contextlib.suppress(IndexError_):
            self._thumbnail_payloads([point_id for point_id, payload in hits if self.files.find(payload) is None])

    def _thumbnail_payloads(self, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        with self._guard:
            missing = [i for i in dict.fromkeys(ids) if i not in self._stored]
            if missing:
                try:
                    found = {p.id: p.payload for p in self.index.retrieve(self.collection, missing)}
                finally:
                    self.index.release(self.collection)   # an embedded index stays writable by `cbir ingest`
                for point_id in missing:
                    payload = found.get(point_id)
                    self._stored[point_id] = payload if payload and payload.get(THUMBNAIL) else None
                while len(self._stored) > self.cache_size:
                    self._stored.popitem(last=False)
            return {i: self._stored.get(i) for i in ids}


def neighbor_pictures(index: Index, collection: str, neighbors: Sequence[dict[str, Any]], state_dir: Path
                      ) -> list[Picture | None]:
    """The picture of each neighbour of a query result (its JSON entries), for a montage; this machine's files
    are found through its file map in `state_dir`."""
    with FileMap.local(state_dir) as file_map:
        pictures = CasePictures(index, collection, LocalFiles(index.record(collection), file_map))
        hits = [(str(n["id"]), n) for n in neighbors]
        pictures.prefetch(hits)
        return [pictures.picture(point_id, entry) for point_id, entry in hits]
