"""`cbir bench --storage`: what thumbnails cost. The same points (cbir's own payloads: labels, coarse metadata,
pseudonyms, code) go into two Qdrant Edge collections, without and with `thumbnail`; each row gives the
collection's size on disk (allocated blocks, after the final flush) per 1,000 points and the stored payload
bytes per point. Thumbnails are made by cbir's own code (`cbir.io.thumbnails`) from real images (`images`, e.g.
../shared/data/real) or else synthetic 1024-px RSNA phantoms, cycled over the points."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cbir.bench.data import synthetic
from cbir.console import QUIET, Reporter
from cbir.io import Pseudonymizer, read_image
from cbir.io.thumbnails import THUMBNAIL_SIZE, encode_thumbnail
from cbir.store.base import Point, stored_payloads
from cbir.store.schema import payload

#: At most this many distinct pictures are encoded; the points cycle through them.
MAX_PICTURES = 64
_SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg")


def storage_pictures(images: Path | None, reporter: Reporter = QUIET) -> tuple[list[str], str]:
    """Base64 thumbnails of up to `MAX_PICTURES` images under `images` (else synthetic ones), and their source."""
    with tempfile.TemporaryDirectory(prefix="cbir-bench-storage-") as tmp:
        if images is None:
            from cbir.data.synth import synth_dataset
            reporter.log("  storage: rendering 32 synthetic 1024-px RSNA DICOMs for the thumbnails")
            synth_dataset("rsna", 32, 1024, Path(tmp), seed=0)
            images, source = Path(tmp), "32 synthetic 1024-px RSNA DICOMs"
        files = sorted(p for p in images.rglob("*") if p.suffix.lower() in _SUFFIXES)[:MAX_PICTURES]
        pictures = [encode_thumbnail(read_image(p).pixels) for p in files]
        if images != Path(tmp):
            source = f"{len(files)} images under {images}"
    if not pictures:
        raise ValueError(f"{images}: no DICOM, PNG or JPEG images found")
    return pictures, source


def bench_storage(sizes: Sequence[int], dim: int, bits: int, pictures: list[str],
                  reporter: Reporter = QUIET) -> list[dict[str, Any]]:
    """One row per size and with/without thumbnails (see the module docstring)."""
    from cbir.store.edge import EdgeIndex

    pseudonymize = Pseudonymizer(b"bench-key-bench-key-bench-key-00")
    rows = []
    for n in sizes:
        data = synthetic(n, dim, bits, 1)
        assert data.points is not None  # `synthetic` makes Points
        for with_thumbnails in (False, True):
            points = [Point(p.id, p.embedding, p.code, _payload(i, p, pseudonymize,
                                                                  pictures[i % len(pictures)] if with_thumbnails
                                                                  else None))
                      for i, p in enumerate(data.points)]
            with tempfile.TemporaryDirectory(prefix="cbir-bench-storage-") as tmp:
                with EdgeIndex(tmp, writable=True, create=True) as index:
                    index.create_collection("bench", dim, bits, {})
                    for start in range(0, n, 1024):
                        index.upsert("bench", points[start:start + 1024])
                disk = _disk_bytes(Path(tmp) / "collections" / "bench")
            payload_bytes = sum(len(json.dumps(body)) for body in stored_payloads(points))
            thumbnail_bytes = sum(len(p.payload["thumbnail"]) for p in points) if with_thumbnails else 0
            rows.append({"n": n, "dim": dim, "bits": bits, "thumbnails": with_thumbnails,
                         "disk_mib": round(disk / 2**20, 2),
                         "disk_mib_per_1000_points": round(disk / 2**20 / n * 1000, 3),
                         "payload_bytes_per_point": round(payload_bytes / n),
                         "thumbnail_bytes_per_point": round(thumbnail_bytes / n)})
            reporter.log(f"  storage: {n:,} points, thumbnails {'on ' if with_thumbnails else 'off'}: "
                         f"{rows[-1]['disk_mib']} MiB on disk ({rows[-1]['disk_mib_per_1000_points']} MiB per 1,000 "
                         f"points), payload {rows[-1]['payload_bytes_per_point']} B/point")
    return rows


def storage_markdown(rows: list[dict[str, Any]], source: str) -> str:
    lines = ["| points | dim | bits | thumbnails | on disk MiB | MiB per 1,000 points | payload B/point | "
             "thumbnail B/point |", "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['dim']} | {r['bits']} | {'yes' if r['thumbnails'] else 'no'} | "
                     f"{r['disk_mib']:.2f} | {r['disk_mib_per_1000_points']:.3f} | {r['payload_bytes_per_point']:,} | "
                     f"{r['thumbnail_bytes_per_point']:,} |")
    lines += ["", f"Thumbnails: {THUMBNAIL_SIZE} px WebP (base64) of {source}; Qdrant Edge, size on disk as "
                  "allocated blocks after the final flush."]
    return "\n".join(lines) + "\n"


def _payload(i: int, point: Point, pseudonymize: Pseudonymizer, thumbnail: str | None) -> dict[str, Any]:
    """A payload as `cbir ingest` writes it for an RSNA image (pseudonymised file, one label, no boxes)."""
    target = i % 4 == 0
    return payload(dataset="rsna", split=("train", "val", "test")[i % 3], relpath=None,
                   file=pseudonymize.file("rsna", f"stage_2_train_images/{i:08d}.dcm"),
                   labels=["Pneumonia" if target else "No Pneumonia"],
                   primary="Pneumonia" if target else "No Pneumonia", target=int(target),
                   meta={"view": "PA" if i % 2 else "AP", "sex": "FM"[i % 2], "age_band": "55-59", "modality": "CR",
                         "pseudonym": pseudonymize(f"patient-{i}")},
                   boxes=[], probability=float(np.float32(i % 1000) / 1000), code=point.code,
                   thumbnail=thumbnail, shape=(1024, 1024) if thumbnail else None)


def _disk_bytes(folder: Path) -> int:
    """Allocated bytes of every file under `folder` (sparse, preallocated files count what they hold)."""
    return sum(os.stat(p).st_blocks * 512 for p in folder.rglob("*") if p.is_file())
