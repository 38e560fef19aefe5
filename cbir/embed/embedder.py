"""Run a loaded model over images in batches; decoding overlaps with the forward pass."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cbir.data.loading import Failed, Loaded, iterate_batches, model_view
from cbir.data.transforms import Geometry
from cbir.io import DEFAULT_READER, Pseudonymizer, ReaderPolicy, SafeMeta, XrayImage
from cbir.models import LoadedModel, decode_size
from cbir.models.detector_config import DetectorConfig
from cbir.models.device import inference_batch


@dataclass
class Embedded:
    index: int                  # position in the input sequence
    embedding: np.ndarray       # float32 (dim,)
    code: np.ndarray            # uint8 (bits,)
    probabilities: np.ndarray   # float32 (num_outputs,)
    meta: SafeMeta
    instance_key: str | None
    geometry: Geometry
    target_index: int = 0       # column of the target in `probabilities`
    digest: str = ""            # hash of the decoded pixels (see `cbir.data.loading.Loaded`)
    thumbnail: str | None = None  # base64 WebP, when asked for (see `cbir.io.thumbnails`)
    domain_distance: float | None = None  # `cbir.models.domain` distance (queries only)
    in_domain: bool | None = None         # at or below the model's domain threshold; None: no domain model
    calibrated: float | None = None       # the target's calibrated probability (`cbir.models.calibration`)

    @property
    def raw_probability(self) -> float:
        """The model's raw sigmoid of the target: a score (class-weighted training shifts it), not a probability."""
        return float(self.probabilities[self.target_index])

    @property
    def probability(self) -> float:
        """The model's probability of the target (e.g. Pneumonia), whatever the task: calibrated where the
        checkpoint holds a calibration, else the raw score."""
        return self.raw_probability if self.calibrated is None else self.calibrated


@torch.inference_mode()
def _forward(loaded: LoadedModel, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings, codes and probabilities of a decoded batch, in forward passes of `inference_batch` images."""
    step = inference_batch(next(loaded.model.parameters()).device)
    parts = []
    for start in range(0, len(pixels), step):
        out, _ = loaded.task.embed(loaded.model, loaded.config, pixels[start:start + step])
        parts.append((out.embedding.cpu().numpy(), out.code.cpu().numpy(),
                      loaded.model.probabilities(out.logits).cpu().numpy()))
    emb, codes, probs = (np.concatenate(column) for column in zip(*parts, strict=True))
    return emb, codes, probs


def embed_batches(loaded: LoadedModel, paths: Sequence[str], batch_size: int = 32, workers: int = 2,
                  pseudonymize: Pseudonymizer | None = None, thumbnails: bool = False,
                  policy: ReaderPolicy = DEFAULT_READER) -> Iterator[tuple[list[Embedded], list[Failed]]]:
    """Per batch: the embedded images (with their thumbnails when asked) and the files that could not be read
    (`policy`: what the reader accepts)."""
    size = loaded.config.image_size
    for batch in iterate_batches(paths, size, batch_size, workers, pseudonymize, thumbnails,
                                 decode_size(loaded.config), policy):
        if not batch.items:
            yield [], batch.failures
            continue
        emb, codes, probs = _forward(loaded, batch.pixels)
        target = loaded.config.target_index
        items = [_embedded(item, emb[i], codes[i], probs[i], target) for i, item in enumerate(batch.items)]
        yield [_calibrate(loaded, item) for item in items], batch.failures


def embed_image(loaded: LoadedModel, image: XrayImage) -> Embedded:
    """Embed one already-read image (the query path)."""
    return embed_and_detect(loaded, image)[0]


@torch.inference_mode()
def embed_and_detect(loaded: LoadedModel, image: XrayImage
                     ) -> tuple[Embedded, list[dict[str, float | list[float]]]]:
    """One forward pass: the embedding (with its domain distance when the model has a domain model), and for a
    detector its boxes, best first, as {"box": [x, y, w, h], "score"} in the original image's pixels (above the
    checkpoint's box threshold); [] for other models."""
    pixels, geometry = model_view(image, loaded.config.image_size)
    x = torch.from_numpy(pixels)[None, None]
    out, detections = loaded.task.embed(loaded.model, loaded.config, x)
    emb, codes = out.embedding.cpu().numpy(), out.code.cpu().numpy()
    probs = loaded.model.probabilities(out.logits).cpu().numpy()
    boxes: list[dict[str, float | list[float]]] = []
    if detections is not None:
        from cbir.models.detection import boxes_to_original, filter_detections  # torchvision's detection models

        assert isinstance(loaded.config, DetectorConfig)  # detections: a detector's
        found = filter_detections(detections[0], loaded.config.box_threshold)
        boxes = [{"box": [round(float(v), 1) for v in box], "score": round(float(score), 4)}
                 for box, score in zip(boxes_to_original(found["boxes"].cpu().numpy(), geometry),
                                       found["scores"].cpu().numpy(), strict=True)]
    embedded = Embedded(0, emb[0], codes[0], probs[0], image.meta, image.instance_key, geometry,
                        loaded.config.target_index)
    _calibrate(loaded, embedded)
    domain = loaded.domain
    if domain is not None and out.domain is not None:
        embedded.domain_distance = float(domain.score(out.domain.float().cpu().numpy())[0])
        embedded.in_domain = embedded.domain_distance <= domain.threshold
    return embedded, boxes


def detect_image(loaded: LoadedModel, image: XrayImage) -> list[dict[str, float | list[float]]]:
    """A detector's boxes for one read image (see `embed_and_detect`); [] for models without boxes."""
    return embed_and_detect(loaded, image)[1]


def _embedded(item: Loaded, emb: np.ndarray, code: np.ndarray, probs: np.ndarray, target: int) -> Embedded:
    return Embedded(item.index, emb, code, probs, item.meta, item.instance_key, item.geometry, target, item.digest,
                    item.thumbnail)


def _calibrate(loaded: LoadedModel, item: Embedded) -> Embedded:
    """Set the item's calibrated probability where the checkpoint has a calibration."""
    if loaded.calibration is not None:
        item.calibrated = float(loaded.calibration.apply(item.raw_probability))
    return item
