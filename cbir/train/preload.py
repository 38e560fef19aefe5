"""Decode a split's images once into memory, for the epochs of a training run."""

from __future__ import annotations

import numpy as np
import torch

from cbir.console import Reporter
from cbir.data.loading import iterate_batches
from cbir.data.records import Records
from cbir.errors import DatasetError
from cbir.train.settings import TrainSettings


def preload(records: Records, size: int, settings: TrainSettings, reporter: Reporter, label: str,
            reduce_to: int | None = None) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Decode every image once into memory (float16), so epochs cost only the forward/backward pass;
    `reduce_to`: the model's `cbir.models.decode_size`."""
    images: list[torch.Tensor] = []
    keep: list[int] = []
    failures: list[str] = []
    paths = records.meta["path"].tolist()
    with reporter.task(f"decode {label}", len(paths)) as bar:
        for batch in iterate_batches(paths, size, batch_size=64, workers=settings.workers, reduce_to=reduce_to,
                                     policy=settings.reader):
            if batch.items:
                images.append(batch.pixels.half())
                keep.extend(item.index for item in batch.items)
            failures.extend(f"{f.path}: {f.reason}" for f in batch.failures)
            bar.advance(len(batch.items) + len(batch.failures))
    for line in failures:
        reporter.warn(line)
    if not keep:
        raise DatasetError(f"{records.root}: no readable images in the {label} split")
    return torch.cat(images), np.asarray(keep), failures
