"""Leakage audit: near-duplicate images across splits, datasets or a collection, by their tiny images.

The embedding is the appearance part of the retrieval embedding (`cbir.models.appearance`), which needs no
trained model: each image is read as model input (letterboxed to `INPUT_SIZE` px, standardised), area-averaged
to `SIZE` × `SIZE`, standardised, centred on the mean tiny image of all audited images, weighted towards the
centre (σ = `WINDOW` half-widths) and L2-normalised. Two images are near-duplicates when the cosine of their
vectors is at least `THRESHOLD`. With a collection whose embedding has the appearance part, its stored vectors
are used as they are (centred on the model's training mean instead; `appearance_part`).

The threshold (0.96) was chosen without test data (`threshold_evidence`): on the 698 training images of
`../shared/data/rsna` (default split, one image per patient) and their four re-encodings (`cbir.evaluation.reencode`),
the top 0.1 % of the 243,253 distinct-patient cosines was fitted as log10 P(cos ≥ c) = α ln(1 − c) + β, and the
threshold is the lowest multiple of 0.01 at which that extrapolated rate is at most 1e-7 per pair (about 0.1 false
pair per million pairs, 8 per 10k × 10k images). The highest distinct-patient cosine seen was 0.908. At 0.96 every
JPEG q60 / 400 px copy (lowest cosine 0.9998) and every blurred + gamma copy (0.971) is found, a 1 % crop per side
is, but only 17 % of 3 % crops and 2 % of 5° rotations: a near-duplicate here is the same radiograph re-encoded,
resized or re-windowed, not re-framed. docs/results.md ("Leakage audit") has the figures.

The pixel check (`pixel_check`) is the audit's yardstick, not part of it: both images letterboxed to
`PIXEL_SIZE` px, the best linear intensity map of one onto the other (least squares), and the root mean square of
what it leaves, √(1 − r²)·√(σ_a σ_b) with r the pixels' Pearson correlation and σ their standard deviations.
A pair is pixel-identical when that residual is at most `PIXEL_TOLERANCE` (4 grey levels of 255).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from cbir.app.settings import Settings
from cbir.console import QUIET, Reporter
from cbir.data.loading import iterate_batches, model_view
from cbir.data.records import Records
from cbir.data.transforms import model_input
from cbir.errors import CbirError
from cbir.io import DEFAULT_READER, Pseudonymizer, ReaderPolicy, read_image
from cbir.models import LoadedModel
from cbir.models.appearance import appearance_part, centred, tiny_image
from cbir.models.detector_config import DetectorConfig
from cbir.models.factory import ModelConfig, decode_size
from cbir.store.base import Index
from cbir.store.files import FileMap, LocalFiles
from cbir.store.record import CollectionRecord

#: The tiny image: SIZE × SIZE area averages of an INPUT_SIZE px model input, centre window σ = WINDOW
#: (the appearance part's defaults, `cbir.models.factory.ModelConfig`).
SIZE = 16
WINDOW = 1.0
INPUT_SIZE = 128
#: Cosine at or above which two tiny images are near-duplicates (module docstring, "The threshold").
THRESHOLD = 0.96
#: The pixel check: both images at PIXEL_SIZE px; identical when the linear-fit residual is ≤ PIXEL_TOLERANCE.
PIXEL_SIZE = 256
PIXEL_TOLERANCE = 4 / 255
#: Elements of one block of the similarity matrix (float32): 64 MiB.
BLOCK_ELEMENTS = 1 << 24


@dataclass
class TinyImages:
    """The standardised tiny images (uncentred) of the files that could be read, and those that could not."""

    tiny: np.ndarray              # (n, SIZE²) float32
    rows: np.ndarray              # (n,) positions in the audited list of files
    failures: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)


def read_tiny_images(paths: Sequence[str], size: int = SIZE, input_size: int = INPUT_SIZE, workers: int = 2,
                     batch_size: int = 64, reporter: Reporter = QUIET, label: str = "tiny images",
                     policy: ReaderPolicy = DEFAULT_READER) -> TinyImages:
    """Read every file as a model input (`cbir.data.loading.iterate_batches`, decoded at reduced resolution)
    and keep its tiny image (`cbir.models.appearance.tiny_image`)."""
    tiny: list[np.ndarray] = []
    rows: list[int] = []
    failures: list[tuple[int, str]] = []
    with reporter.task(label, len(paths)) as bar, torch.inference_mode():
        for batch in iterate_batches(paths, input_size, batch_size, workers, reduce_to=input_size, policy=policy):
            if batch.items:
                tiny.append(tiny_image(model_input(batch.pixels), size).numpy())
                rows.extend(item.index for item in batch.items)
            failures.extend((f.index, f.reason) for f in batch.failures)
            bar.advance(len(batch.items) + len(batch.failures))
    stacked = np.concatenate(tiny).astype(np.float32) if tiny else np.zeros((0, size * size), np.float32)
    return TinyImages(stacked, np.asarray(rows, dtype=np.int64), failures)


def unit_vectors(*sets: np.ndarray, size: int = SIZE, window: float = WINDOW) -> list[np.ndarray]:
    """Tiny images → unit appearance vectors (`cbir.models.appearance.centred`), centred on the mean tiny
    image of all the sets together."""
    rows = [s for s in sets if len(s)]
    mean = torch.from_numpy(np.concatenate(rows).mean(axis=0)) if rows else torch.zeros(size * size)
    return [centred(torch.from_numpy(np.asarray(s, np.float32)), mean, size, window).numpy() for s in sets]


@dataclass
class Pairs:
    """Pairs (a[i], b[j]) at or above the threshold, most similar first."""

    i: np.ndarray
    j: np.ndarray
    similarity: np.ndarray

    def __len__(self) -> int:
        return len(self.i)

    def keep(self, mask: np.ndarray) -> Pairs:
        return Pairs(self.i[mask], self.j[mask], self.similarity[mask])


def find_pairs(a: np.ndarray, b: np.ndarray | None = None, threshold: float = THRESHOLD,
               block_elements: int = BLOCK_ELEMENTS) -> Pairs:
    """Every pair of unit vectors with cosine ≥ `threshold`: a × b, or the pairs i < j within `a` when `b` is
    None. Block by block (at most `block_elements` similarities at a time), so 100k × 100k fits in memory."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    other = a if b is None else np.ascontiguousarray(b, dtype=np.float32)
    step = max(1, block_elements // max(len(other), 1))
    found_i, found_j, found_s = [], [], []
    for start in range(0, len(a), step):
        stop = min(start + step, len(a))
        first = start if b is None else 0          # within `a`: only columns from the block's first row on
        sims = a[start:stop] @ other[first:].T
        if b is None:
            sims[np.arange(stop - start)[:, None] >= np.arange(len(other) - first)[None, :]] = -np.inf
        rows, cols = np.nonzero(sims >= threshold)
        found_i.append(rows + start)
        found_j.append(cols + first)
        found_s.append(sims[rows, cols])
    i, j, s = (np.concatenate(x) if x else np.zeros(0) for x in (found_i, found_j, found_s))
    order = np.lexsort((j, i, -s))
    return Pairs(i[order].astype(np.int64), j[order].astype(np.int64), s[order].astype(np.float32))


@dataclass(frozen=True)
class PixelCheck:
    correlation: float    # Pearson r of the two PIXEL_SIZE px images
    residual: float       # RMS left by the best linear intensity map, in [0, 1] units

    @property
    def identical(self) -> bool:
        return self.residual <= PIXEL_TOLERANCE


def pixel_images(paths: Sequence[str], size: int = PIXEL_SIZE, policy: ReaderPolicy = DEFAULT_READER
                 ) -> np.ndarray:
    """(N, size²) float64 letterboxed pixels (`cbir.data.loading.model_view`) of each file, fully decoded."""
    return np.stack([model_view(read_image(p, policy=policy), size)[0].ravel() for p in paths]).astype(np.float64)


def pixel_residuals(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(r, residual) for every pair of rows of a (N, P) and b (M, P), both (N, M): see the module docstring."""
    sa, sb = a.std(axis=1), b.std(axis=1)
    za = (a - a.mean(axis=1, keepdims=True)) / np.maximum(sa, 1e-12)[:, None]
    zb = (b - b.mean(axis=1, keepdims=True)) / np.maximum(sb, 1e-12)[:, None]
    r = np.clip(za @ zb.T / a.shape[1], -1.0, 1.0)
    return r, np.sqrt(1.0 - r ** 2) * np.sqrt(sa[:, None] * sb[None, :])


def pixel_identical_pairs(paths_a: Sequence[str], paths_b: Sequence[str], size: int = 64,
                          tolerance: float = PIXEL_TOLERANCE) -> set[tuple[int, int]]:
    """Every pair (i, j) of files whose pixels at `size` px (decoded at reduced resolution where the format
    allows) are identical up to a linear intensity map (residual ≤ `tolerance`): the exhaustive search that
    measures the audit's recall, all len(a) × len(b) pairs at once."""
    def read(paths: Sequence[str]) -> np.ndarray:
        return np.stack([model_view(read_image(p, None, size), size)[0].ravel() for p in paths]).astype(np.float64)

    _, residual = pixel_residuals(read(paths_a), read(paths_b))
    return {(int(i), int(j)) for i, j in zip(*np.nonzero(residual <= tolerance), strict=True)}


def pixel_check(path_a: str, path_b: str, size: int = PIXEL_SIZE, policy: ReaderPolicy = DEFAULT_READER
                ) -> PixelCheck:
    """Compare two files by their pixels (module docstring)."""
    images = pixel_images([path_a, path_b], size, policy)
    r, residual = pixel_residuals(images[:1], images[1:])
    return PixelCheck(float(r[0, 0]), float(residual[0, 0]))


# -- the audited sides and the result ------------------------------------------------------------------------


@dataclass
class Side:
    """The images of one side of an audit, named as a collection's payloads name them: dataset ids and keyed
    pseudonyms only (plus this machine's files, for the console and the pixel check, never for the CSV)."""

    name: str                     # the folder's or the collection's name, for this machine's console
    datasets: list[str]           # per image, its dataset's id (`cbir.data.identity`)
    files: list[str]              # keyed file pseudonyms (`Pseudonymizer.file`)
    patients: list[str]           # keyed patient pseudonyms ("" when unknown)
    splits: list[str]
    paths: list[str | None]       # local files (None: not on this machine)


def records_side(records: Records, pseudonymize: Pseudonymizer) -> Side:
    meta, dataset = records.meta, records.dataset_id or records.dataset
    return Side(records.dataset, [dataset] * len(meta), [pseudonymize.file(dataset, str(r)) for r in meta["relpath"]],
                [p or "" for p in records.patient_pseudonyms(pseudonymize)], [str(s) for s in meta["split"]],
                [str(p) for p in meta["path"]])


def _subset(side: Side, rows: np.ndarray) -> Side:
    return Side(side.name, *([getattr(side, name)[r] for r in rows]
                             for name in ("datasets", "files", "patients", "splits", "paths")))


@dataclass
class AuditResult:
    mode: str                     # "splits", "datasets" or "collection"
    a: Side
    b: Side
    pairs: Pairs
    threshold: float
    method: str                   # how the vectors were made
    counts: dict[str, int]
    failures: list[str]
    seconds: float = 0.0
    pixels: list[PixelCheck] | None = None
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per pair: pseudonyms, splits and the similarity (what the CSV holds)."""
        out = []
        for n, (i, j, s) in enumerate(zip(self.pairs.i, self.pairs.j, self.pairs.similarity, strict=True)):
            row: dict[str, Any] = {
                "similarity": round(float(s), 5),
                "a_dataset": self.a.datasets[i], "a_file": self.a.files[i], "a_patient": self.a.patients[i],
                "a_split": self.a.splits[i],
                "b_dataset": self.b.datasets[j], "b_file": self.b.files[j], "b_patient": self.b.patients[j],
                "b_split": self.b.splits[j]}
            if self.pixels is not None:
                check = self.pixels[n]
                row |= {"pixel_correlation": round(check.correlation, 6),
                        "pixel_residual": round(check.residual * 255, 3), "pixel_identical": check.identical}
            out.append(row)
        return out

    def summary(self, csv_path: Path | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"mode": self.mode, "pairs": len(self.pairs), "threshold": self.threshold,
                                "method": self.method, "counts": self.counts, "failures": len(self.failures),
                                "seconds": round(self.seconds, 2), "notes": self.notes}
        if self.pixels is not None:
            body["pixel_identical"] = sum(c.identical for c in self.pixels)
        if csv_path is not None:
            body["csv"] = str(csv_path)
        return body


def write_csv(result: AuditResult, path: Path) -> Path:
    """The pairs as CSV: dataset ids, keyed pseudonyms, splits and similarities, never a file name or patient ID
    (`pixel_residual` in grey levels of 255)."""
    rows = result.rows()
    columns = ["similarity", "a_dataset", "a_file", "a_patient", "a_split", "b_dataset", "b_file", "b_patient",
               "b_split"] + (["pixel_correlation", "pixel_residual", "pixel_identical"] if result.pixels is not None
                             else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def audit_splits(records: Records, pseudonymize: Pseudonymizer, threshold: float = THRESHOLD,
                 reporter: Reporter = QUIET, workers: int = 2, pixel: bool = False,
                 settings: Settings | None = None) -> AuditResult:
    """Near-duplicates of one dataset in two different splits (each a leak from training into validation or
    test). Pairs inside one split are counted, not listed: of two patients (`within_split_other_patient`: a
    duplicate under two patient keys) or of one (`within_split_same_patient`: follow-ups)."""
    _require(records, "--data")
    settings = settings or Settings.from_env()
    started = time.perf_counter()
    tiny, failures = _read(records, reporter, workers, settings.reader)
    (vectors,) = unit_vectors(tiny.tiny)
    found = find_pairs(vectors, threshold=threshold)
    side = _subset(records_side(records, pseudonymize), tiny.rows)
    splits, patients = np.asarray(side.splits), np.asarray(side.patients)
    across = splits[found.i] != splits[found.j]
    other_patient = patients[found.i] != patients[found.j]
    counts = {"images": len(records), "audited": len(tiny.rows),
              **{f"{name}_images": int(np.sum(splits == name)) for name in ("train", "val", "test")},
              "within_split_other_patient": int(np.sum(~across & other_patient)),
              "within_split_same_patient": int(np.sum(~across & ~other_patient))}
    result = AuditResult("splits", side, side, found.keep(across), threshold, METHOD, counts, failures,
                         notes=[f"split: {records.split_spec.describe()}"])
    return _finish(result, pixel, started, settings.reader)


def audit_datasets(records: Records, against: Records, pseudonymize: Pseudonymizer, threshold: float = THRESHOLD,
                   reporter: Reporter = QUIET, workers: int = 2, pixel: bool = False,
                   settings: Settings | None = None) -> AuditResult:
    """Near-duplicates between every image of `records` and every image of `against`."""
    _require(records, "--data")
    _require(against, "--against")
    settings = settings or Settings.from_env()
    started = time.perf_counter()
    tiny_a, failures_a = _read(records, reporter, workers, settings.reader)
    tiny_b, failures_b = _read(against, reporter, workers, settings.reader)
    vectors_a, vectors_b = unit_vectors(tiny_a.tiny, tiny_b.tiny)
    found = find_pairs(vectors_a, vectors_b, threshold)
    a = _subset(records_side(records, pseudonymize), tiny_a.rows)
    b = _subset(records_side(against, pseudonymize), tiny_b.rows)
    counts = {"images": len(records), "audited": len(tiny_a.rows), "against_images": len(against),
              "against_audited": len(tiny_b.rows), "images_with_a_duplicate": int(len(np.unique(found.i))),
              "against_with_a_duplicate": int(len(np.unique(found.j)))}
    result = AuditResult("datasets", a, b, found, threshold, METHOD, counts, failures_a + failures_b)
    return _finish(result, pixel, started, settings.reader)


def audit_collection(records: Records, index: Index, collection: str, loaded: LoadedModel,
                     pseudonymize: Pseudonymizer, threshold: float = THRESHOLD, reporter: Reporter = QUIET,
                     workers: int = 2, pixel: bool = False, settings: Settings | None = None) -> AuditResult:
    """Near-duplicates between the images of `records` and the points of a collection, other than the same
    image (same dataset and file: `same_image`) and other than the same patient (`same_patient`).

    When the collection's model has the appearance part, its stored vectors are used (`appearance_part`), and
    the images of `records` are read as the model reads them, through the model's own appearance module.
    Otherwise (a detector, or `--appearance-weight 0`) the stored vectors hold no tiny image, so the archive
    images are read again from the folders the collection records (`cbir.store.files.LocalFiles`); points whose
    files are not on this machine are counted (`archive_files_missing`), and none at all is an error."""
    _require(records, "--data")
    settings = settings or Settings.from_env()
    started = time.perf_counter()
    record = index.record(collection)
    # the stored appearance part is this model's (its training mean)
    record.check_model(loaded.fingerprint, loaded.config.vector_dim, loaded.described)
    config = with_appearance(loaded.config)
    points = list(index.scroll(collection, with_vectors=config is not None))
    if not points:
        raise CbirError(f"collection {collection!r} is empty: nothing to audit against")
    archive = _collection_side(record, points, pseudonymize, settings.state_dir)
    on_disk = np.array([i for i, path in enumerate(archive.paths) if path is not None], dtype=np.int64)
    notes: list[str] = []
    if config is not None:
        method = (f"the collection's stored vectors: the appearance part of its embedding ({config.appearance_size}"
                  f"×{config.appearance_size} tiny image of the model's {config.image_size} px input, centred on the "
                  "model's training mean)")
        tiny = _model_appearance(records, loaded, config, reporter, workers, settings.reader)
        failures = [f"{records.meta['path'].iloc[i]}: {why}" for i, why in tiny.failures]
        query_vectors, kept = tiny.tiny, np.arange(len(points))
        archive_vectors = appearance_part(np.stack([p.embedding for p in points]), config.appearance_size,
                                          config.appearance_weight)
    else:
        if on_disk.size == 0:
            raise CbirError(f"collection {collection!r}: its embedding has no appearance part (a "
                            f"{loaded.config.task} model), so its stored vectors cannot be compared as tiny "
                            f"images, and none of its {len(points)} images is on this machine under the folders it "
                            "was ingested from; audit against the dataset folder with --against instead")
        method = METHOD + "; the archive images read again from the folders the collection was ingested from"
        notes.append(f"collection {collection!r}: its embedding has no appearance part (a {loaded.config.task} "
                     "model), so its images were read again from the folders it was ingested from")
        tiny, failures = _read(records, reporter, workers, settings.reader)
        archive_tiny = read_tiny_images([str(archive.paths[i]) for i in on_disk], workers=workers,
                                        reporter=reporter, label=f"tiny images of {collection}",
                                        policy=settings.reader)
        failures += [f"{archive.paths[on_disk[i]]}: {why}" for i, why in archive_tiny.failures]
        kept = on_disk[archive_tiny.rows]
        query_vectors, archive_vectors = unit_vectors(tiny.tiny, archive_tiny.tiny)
    found = find_pairs(query_vectors, archive_vectors, threshold)
    query_side, archive = _subset(records_side(records, pseudonymize), tiny.rows), _subset(archive, kept)
    pairs = list(zip(found.i, found.j, strict=True))
    same_image = np.array([query_side.files[i] == archive.files[j] and query_side.datasets[i] == archive.datasets[j]
                           for i, j in pairs], dtype=bool)
    same_patient = np.array([query_side.patients[i] == archive.patients[j] != "" for i, j in pairs],
                            dtype=bool) & ~same_image
    found = found.keep(~same_image & ~same_patient)
    counts = {"images": len(records), "audited": len(tiny.rows), "archive_points": len(points),
              "archive_audited": int(kept.size), "archive_files_missing": len(points) - int(on_disk.size),
              "same_image": int(same_image.sum()), "same_patient": int(same_patient.sum()),
              "images_with_a_duplicate": int(len(np.unique(found.i)))}
    result = AuditResult("collection", query_side, archive, found, threshold, method, counts, failures,
                         notes=notes)
    return _finish(result, pixel, started, settings.reader)


def _collection_side(record: CollectionRecord, points: list[Any], pseudonymize: Pseudonymizer, state_dir: Path
                     ) -> Side:
    """A collection's points as an audit side: their payloads' dataset ids and pseudonyms (a plain-path payload's
    file pseudonym made here), and where this machine has their files."""
    side = Side(record.name, [], [], [], [], [])
    with FileMap.local(state_dir) as file_map:
        files = LocalFiles(record, file_map)
        for point in points:
            body = point.payload
            dataset = str(body.get("dataset") or "")
            found = files.find(body)
            side.datasets.append(dataset)
            side.files.append(str(body.get("file") or pseudonymize.file(dataset, str(body.get("path") or point.id))))
            side.patients.append(str(body.get("pseudonym") or ""))
            side.splits.append(str(body.get("split") or ""))
            side.paths.append(None if found is None else str(found))
    return side


def with_appearance(config: ModelConfig | DetectorConfig) -> ModelConfig | None:
    """`config` when its retrieval embedding has the appearance part, else None (detectors, weight 0)."""
    return config if isinstance(config, ModelConfig) and config.has_appearance else None


def _model_appearance(records: Records, loaded: LoadedModel, config: ModelConfig, reporter: Reporter,
                      workers: int, policy: ReaderPolicy) -> TinyImages:
    """The appearance vectors of `records` as the model makes them (input size, decoding, intensity, training
    mean): what ingest stores in the embedding's appearance part, without the backbone."""
    module = getattr(loaded.model, "appearance", None)
    assert module is not None  # `config` has the appearance part
    paths = records.meta["path"].tolist()
    vectors: list[np.ndarray] = []
    rows: list[int] = []
    failures: list[tuple[int, str]] = []
    device = module.mean.device
    with reporter.task(f"appearance of {records.dataset}", len(paths)) as bar, torch.inference_mode():
        for batch in iterate_batches(paths, config.image_size, 64, workers, reduce_to=decode_size(config),
                                     policy=policy):
            if batch.items:
                x = model_input(batch.pixels.to(device), config.intensity)
                vectors.append(module(x).cpu().numpy())
                rows.extend(item.index for item in batch.items)
            failures.extend((f.index, f.reason) for f in batch.failures)
            bar.advance(len(batch.items) + len(batch.failures))
    stacked = np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, module.dim), np.float32)
    return TinyImages(stacked, np.asarray(rows, dtype=np.int64), failures)


def _finish(result: AuditResult, pixel: bool, started: float, policy: ReaderPolicy) -> AuditResult:
    """Add the pixel check of every pair when asked (both sides' files must be at hand), and the time."""
    if pixel:
        missing = sum(result.a.paths[i] is None or result.b.paths[j] is None
                      for i, j in zip(result.pairs.i, result.pairs.j, strict=True))
        if missing:
            raise CbirError(f"--pixel-check: the files of {missing} pairs are not on this machine")
        result.pixels = [pixel_check(str(result.a.paths[i]), str(result.b.paths[j]), policy=policy)
                         for i, j in zip(result.pairs.i, result.pairs.j, strict=True)]
    result.seconds = time.perf_counter() - started
    return result


def _read(records: Records, reporter: Reporter, workers: int, policy: ReaderPolicy
          ) -> tuple[TinyImages, list[str]]:
    tiny = read_tiny_images(records.meta["path"].tolist(), workers=workers, reporter=reporter,
                            label=f"tiny images of {records.dataset}", policy=policy)
    return tiny, [f"{records.meta['path'].iloc[i]}: {why}" for i, why in tiny.failures]


def _require(records: Records, what: str) -> None:
    if len(records) == 0:
        raise CbirError(f"{records.root}: no images to audit ({what})")


METHOD = (f"tiny images ({SIZE}×{SIZE} of a {INPUT_SIZE} px model input, centre window σ {WINDOW:g}, centred on "
          "the audited images' mean)")


# -- inside evaluate and reproduce ---------------------------------------------------------------------------


class _Query(Protocol):
    embedding: np.ndarray
    pseudonym: str | None


Q = TypeVar("Q", bound=_Query)


def drop_duplicate_queries(queries: list[Q], archive_embeddings: np.ndarray | None, archive_patients: np.ndarray,
                           model_config: ModelConfig | DetectorConfig, reporter: Reporter = QUIET,
                           threshold: float = THRESHOLD
                           ) -> tuple[list[Q], dict[str, Any]]:
    """The queries without those that have a near-duplicate of another patient in the archive (by the
    appearance part of the stored embeddings), and what was done, for the report (`duplicates`). A model whose
    embedding has no appearance part is not audited: a warning says so, and the report."""
    config = with_appearance(model_config)
    if config is None or archive_embeddings is None or not queries:
        note = ("not run: the model's embedding has no appearance part, so queries that have a near-duplicate in "
                "the archive are still among them")
        reporter.warn(f"leakage audit {note}")
        return queries, {"audited": False, "excluded": 0, "note": note}
    size, weight = config.appearance_size, config.appearance_weight
    found = find_pairs(appearance_part(np.stack([q.embedding for q in queries]), size, weight),
                       appearance_part(archive_embeddings, size, weight), threshold)
    own = np.array([q.pseudonym or "\0" for q in queries], dtype=object)[found.i] == \
        np.asarray(archive_patients, dtype=object)[found.j]
    duplicated = set(found.i[~own].tolist())
    kept = [q for n, q in enumerate(queries) if n not in duplicated]
    note = (f"{len(duplicated)} of {len(queries)} queries left out: a near-duplicate of another patient's image "
            f"is in the archive (appearance cosine ≥ {threshold:g}, cbir audit)")
    if duplicated:
        reporter.warn(f"leakage audit: {note}")
    else:
        reporter.log(f"leakage audit: {note}")
    if not kept:
        raise CbirError(f"every query has a near-duplicate in the archive ({len(queries)} queries): nothing left "
                        "to evaluate")
    return kept, {"audited": True, "excluded": len(duplicated), "threshold": threshold, "note": note}


def leaked_files(records: Records, against: Records, pseudonymize: Pseudonymizer, threshold: float = THRESHOLD,
                 reporter: Reporter = QUIET, workers: int = 2) -> tuple[set[str], AuditResult]:
    """The files (paths) of `records` that have a near-duplicate in `against`, to leave out of a model's training
    data when `against` holds its queries; and the audit."""
    result = audit_datasets(records, against, pseudonymize, threshold, reporter, workers)
    return {str(result.a.paths[i]) for i in result.pairs.i}, result


# -- how THRESHOLD was chosen -------------------------------------------------------------------------------


def threshold_evidence(originals: np.ndarray, copies: dict[str, np.ndarray], rate: float = 1e-7,
                       grid: float = 0.01, tail: float = 1e-3) -> dict[str, Any]:
    """Choose the threshold from tiny images (`read_tiny_images`, uncentred) of training images of distinct
    patients, one each (`originals`, (N, d)), and of re-encoded copies of them (name → (N, d), row i a copy of
    original i; `cbir.evaluation.reencode`).

    The cosines of all pairs of originals are the distinct-patient distribution; its top `tail` is fitted as
    log10 P(cos ≥ c) = α · ln(1 − c) + β, which extrapolates to archives far larger than the sample. The threshold
    is the lowest multiple of `grid` at which the fitted rate is at most `rate` per pair; the recall of each kind
    of copy (cosine with its own original at or above it) says what the threshold keeps."""
    vectors = unit_vectors(originals, *copies.values())
    sims = vectors[0] @ vectors[0].T
    distinct = np.sort(sims[np.triu_indices(len(sims), 1)])[::-1]
    top = max(10, int(len(distinct) * tail))
    alpha, beta = np.polyfit(np.log1p(-np.minimum(distinct[:top], 1 - 1e-6)),
                             np.log10(np.arange(1, top + 1) / len(distinct)), 1)

    def fitted(c: float) -> float:
        return float(10 ** (alpha * math.log1p(-min(c, 1 - 1e-6)) + beta))

    candidates = np.round(np.arange(0.5, 1.0, grid), 6)
    threshold = float(next((c for c in candidates if fitted(c) <= rate), candidates[-1]))
    own = {name: np.sum(vectors[0] * v, axis=1) for name, v in zip(copies, vectors[1:], strict=True)}
    return {"threshold": threshold, "rate": rate, "fit": {"alpha": float(alpha), "beta": float(beta)},
            "distinct_pairs": len(distinct), "distinct_max": float(distinct[0]),
            "distinct_above": int(np.sum(distinct >= threshold)), "fitted_rate": fitted(threshold),
            "recall": {name: float(np.mean(c >= threshold)) for name, c in own.items()},
            "copy_min": {name: float(c.min()) for name, c in own.items()},
            "copy_median": {name: float(np.median(c)) for name, c in own.items()}}
