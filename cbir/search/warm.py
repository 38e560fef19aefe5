"""A warm searcher: the model loaded and the collection in memory, for processes that answer many queries
(`cbir serve`, `cbir bench`). A query then costs decode + one forward pass + an in-memory search.

It answers from several threads at once: forward passes run in parallel (the model is only read), searches and
reloads of the in-memory copy one at a time, and so do reads of stored thumbnails (`cbir serve`'s /thumbnail): the
filter masks, the thumbnail cache and the index are shared.
A query reads one consistent copy (metadata, vectors and pictures together) even while a reload replaces it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cbir.embed import Embedded
from cbir.errors import CbirError, IndexError_, ModelMismatchError
from cbir.io import DEFAULT_READER, Pseudonymizer, ReaderPolicy, XrayImage, read_image
from cbir.models import LoadedModel, decode_size
from cbir.search.pictures import CasePictures, Picture
from cbir.search.query import QueryResult, Search, answer, query_name, stored_path
from cbir.store.base import Filter, Hit, Index
from cbir.store.files import FileMap, LocalFiles
from cbir.store.memory import MemoryIndex
from cbir.store.record import CollectionRecord
from cbir.store.schema import check_filter, payload_values


@dataclass(frozen=True)
class _Copy:
    """The collection as loaded: replaced as a whole, so that a query never mixes two loads."""

    record: CollectionRecord
    memory: MemoryIndex
    pictures: CasePictures


class WarmSearcher:
    """`query(path)` like `cbir query`, from memory; `refresh()` reloads when the collection changed.
    `local_paths` shows file names as `cbir query --local-paths` does; `state_dir` holds this machine's file map
    (None: no map, so cases show only as stored thumbnails or plain paths); `policy`: what the reader accepts."""

    def __init__(self, index: Index, collection: str, loaded: LoadedModel,
                 pseudonymize: Pseudonymizer | None = None, local_paths: bool = False, *,
                 state_dir: Path | None, policy: ReaderPolicy = DEFAULT_READER) -> None:
        self.index, self.collection, self.loaded, self.pseudonymize = index, collection, loaded, pseudonymize
        self.local_paths, self.policy = local_paths, policy
        # one search, reload or stored-thumbnail read at a time (see the module docstring); reentrant, since a
        # search's thumbnail prefetch takes it again
        self._lock = threading.RLock()
        record = index.record(collection)
        record.check_model(loaded.fingerprint, loaded.config.vector_dim, loaded.described)
        # no state folder: only stored thumbnails and plain paths show cases
        self.file_map = FileMap.local(state_dir) if state_dir is not None else None
        self._copy = _Copy(record, MemoryIndex.load(index, collection),
                           CasePictures(index, collection, LocalFiles(record, self.file_map), guard=self._lock))
        self._version = self._stamp()
        self.loaded_at = time.time()
        #: Why the searcher answers nothing (the collection was rebuilt with another model); None when it answers.
        self.stale: str | None = None

    @property
    def record(self) -> CollectionRecord:
        return self._copy.record

    @property
    def memory(self) -> MemoryIndex:
        return self._copy.memory

    @property
    def pictures(self) -> CasePictures:
        return self._copy.pictures

    def _stamp(self) -> tuple[str, int, int]:
        """What tells a changed collection: its version (the alias), its point count and its record's revision
        (every change of the record counts one: a new calibration, a reindex's model). The collection is
        released afterwards, so that an embedded index stays writable by `cbir ingest` while this process serves
        from memory."""
        try:
            return (self.index.resolve(self.collection), self.index.count(self.collection),
                    self.index.record(self.collection).revision)
        finally:
            self.index.release(self.collection)

    def refresh(self) -> bool:
        """Reload if the alias moved, the point count or the record changed; returns whether it reloaded. While
        another process writes the collection, the current copy keeps answering; searches wait for a reload. When
        the collection now holds another model's vectors (a reindex), `stale` says so and the searcher answers
        nothing (`query_image` raises `ModelMismatchError`) until the collection matches the model again: a
        mix of two models' answers is never served."""
        with self._lock:
            try:
                stamp = self._stamp()
                if stamp == self._version:
                    return False
                record = self.index.record(self.collection)
                record.check_model(self.loaded.fingerprint, self.loaded.config.vector_dim, self.loaded.described)
                memory = MemoryIndex.load(self.index, self.collection)
                self.index.release(self.collection)
            except ModelMismatchError as exc:
                self.stale, self._version = str(exc), stamp
                self.index.release(self.collection)
                return False
            except IndexError_:
                return False
            self.stale = None
            self._copy = _Copy(record, memory, CasePictures(self.index, self.collection,
                                                            LocalFiles(record, self.file_map), guard=self._lock))
            self._version, self.loaded_at = stamp, time.time()
            return True

    def picture(self, point_id: str) -> Picture | None:
        """A point's image file where this machine has it, else its stored thumbnail, else None (also for an
        unknown point)."""
        copy = self._copy
        position = copy.memory.position.get(point_id)
        if position is None:
            return None
        return copy.pictures.picture(point_id, copy.memory.payloads[position])

    def query(self, path: str | Path, k: int = 10, flt: Filter | None = None, prefilter: int | None = None,
              hamming_radius: int | None = None, include_self: bool = False) -> QueryResult:
        return self.query_image(self.read(path), str(path), k, flt, prefilter, hamming_radius, include_self)

    def read(self, path: str | Path) -> XrayImage:
        """An image file read as this model's inputs are (`cbir.models.decode_size`)."""
        return read_image(path, self.pseudonymize, decode_size(self.loaded.config), self.policy)

    def query_image(self, image: XrayImage, name: str, k: int = 10, flt: Filter | None = None,
                    prefilter: int | None = None, hamming_radius: int | None = None,
                    include_self: bool = False) -> QueryResult:
        """Search for a read image; `name` (its file's name) shows as `query.path` only with `local_paths`, else
        as its keyed pseudonym. The neighbours' stored thumbnails are fetched meanwhile, in one request. Safe to
        call from several threads: their forward passes overlap, their searches take turns."""
        if self.stale:
            raise ModelMismatchError(self.stale)
        copy = self._copy
        how = Search(k, flt, prefilter, hamming_radius, include_self)
        if flt:   # counted by the copy's own cached filter masks, the ones its search uses
            memory = copy.memory
            check_filter(flt, self.collection,
                         lambda field, value: memory.matching(Filter(must={field: value})),
                         lambda field: payload_values(memory.payloads, field))
        if not len(copy.memory):
            raise CbirError(f"collection {self.collection!r} is empty: ingest images into it first (cbir ingest)")

        def search(embedded: Embedded) -> list[Hit]:
            use_code = prefilter is not None or hamming_radius is not None
            with self._lock:
                hits = copy.memory.search(embedded.embedding, how.fetch, flt, embedded.code if use_code else None,
                                          prefilter, hamming_radius)
                if copy.record.thumbnails:
                    copy.pictures.prefetch([(hit.id, hit.payload) for hit in hits])
            return hits

        path_of = copy.pictures.files.relpath if self.local_paths else stored_path
        return answer(image, query_name(name, self.pseudonymize, self.local_paths), self.loaded, copy.record,
                      how, search, path_of)

    def close(self) -> None:
        """Close the local file map (the index is the caller's)."""
        if self.file_map is not None:
            self.file_map.close()

