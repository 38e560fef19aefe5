"""Parallel image loading for training and ingest: decode + letterbox in DataLoader workers."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cbir.data.transforms import Geometry, letterbox
from cbir.errors import BadInputError
from cbir.io import DEFAULT_READER, Pseudonymizer, ReaderPolicy, SafeMeta, XrayImage, read_image
from cbir.io.thumbnails import encode_thumbnail


@dataclass
class Loaded:
    """One decoded image, resized for the model, with what ingest needs to know about it."""

    index: int
    pixels: np.ndarray          # float32 (S, S) in [0, 1]
    geometry: Geometry
    meta: SafeMeta
    instance_key: str | None
    digest: str = ""            # hash of the decoded pixels: tells a duplicate UID from a conflicting one
    thumbnail: str | None = None  # base64 WebP of the decoded pixels (`cbir.io.thumbnails`), when asked for


@dataclass
class Failed:
    index: int
    path: str
    reason: str


def model_view(image: XrayImage, size: int) -> tuple[np.ndarray, Geometry]:
    """A read image as a model's S×S input, with its geometry in the stored image's pixels (also when it was
    decoded at reduced resolution): the one place where an image becomes model input."""
    return letterbox(image.pixels, size, image.full_shape)


class ImageFiles(Dataset):
    """Files → `Loaded` (or `Failed`, so that one bad file never stops a batch). `reduce_to`: see
    `cbir.io.read_image` (a model's `cbir.models.decode_size`); `policy`: what the reader accepts."""

    def __init__(self, paths: Sequence[str], size: int, pseudonymize: Pseudonymizer | None = None,
                 thumbnails: bool = False, reduce_to: int | None = None,
                 policy: ReaderPolicy = DEFAULT_READER) -> None:
        self.paths = list(paths)
        self.policy = policy
        self.size = size
        self.pseudonymize = pseudonymize
        self.thumbnails = thumbnails
        self.reduce_to = reduce_to

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Loaded | Failed:
        path = self.paths[index]
        try:
            image = read_image(path, self.pseudonymize, self.reduce_to, self.policy)
            pixels, geometry = model_view(image, self.size)
            thumbnail = encode_thumbnail(image.pixels) if self.thumbnails else None
        except BadInputError as exc:
            return Failed(index, path, exc.reason)
        except Exception as exc:  # noqa: BLE001 - one file must never stop a batch, in a worker above all
            return Failed(index, path, f"cannot be processed ({type(exc).__name__}: {str(exc)[:160]})".replace(
                "\n", " "))
        digest = hashlib.sha256(np.ascontiguousarray(image.pixels).tobytes()).hexdigest()[:32]
        return Loaded(index, pixels, geometry, image.meta, image.instance_key, digest, thumbnail)


@dataclass
class Batch:
    pixels: torch.Tensor        # (B, 1, S, S) float32 in [0, 1]
    items: list[Loaded]
    failures: list[Failed]


def _collate(items: list[Any]) -> Batch:
    good = [it for it in items if isinstance(it, Loaded)]
    bad = [it for it in items if isinstance(it, Failed)]
    pixels = torch.from_numpy(np.stack([it.pixels for it in good])[:, None]) if good else torch.empty(0)
    return Batch(pixels, good, bad)


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, _worker_id: int = 0) -> None:
    """In a worker process: be killed when the process that started it dies (Linux's parent-death signal), and
    exit now if it is already gone. A worker that outlived a killed ingest kept its copy of the open index and
    blocked a re-run; elsewhere the DataLoader's own check of its parent (every few seconds) is what remains."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def iterate_batches(paths: Sequence[str], size: int, batch_size: int = 32, workers: int = 2,
                    pseudonymize: Pseudonymizer | None = None, thumbnails: bool = False,
                    reduce_to: int | None = None, policy: ReaderPolicy = DEFAULT_READER) -> Iterator[Batch]:
    """Batches in input order; decoding overlaps with the consumer when workers > 0. `thumbnails` also makes
    each image's thumbnail in the worker that decoded it; `reduce_to` and `policy`: see `ImageFiles`."""
    dataset = ImageFiles(paths, size, pseudonymize, thumbnails, reduce_to, policy)
    workers = max(0, min(workers, len(dataset) // max(batch_size, 1)))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate, persistent_workers=False,
                        prefetch_factor=4 if workers else None,
                        worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers else None)
    yield from loader
