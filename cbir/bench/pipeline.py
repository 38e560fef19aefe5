"""The model side of `cbir bench`: images/s through decode + preprocessing + forward pass (the ingest
pipeline, decoding in DataLoader workers) against a bare forward pass of the same backbone on preloaded
tensors, and the latency of one warm query from a DICOM path to ranked neighbours."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbir.console import QUIET, Reporter


def bench_pipeline(backbone: str = "resnet18", image_size: int = 224, n_images: int = 96, batch_size: int = 16,
                   workers: int = 2, source_size: int = 1024, queries: int = 20,
                   reporter: Reporter = QUIET) -> dict[str, Any]:
    """Synthetic JPEG DICOMs of `source_size` px (RSNA's own size is 1024), a randomly initialised `backbone`."""
    from cbir.data.layout import load_dataset
    from cbir.data.synth import synth_dataset
    from cbir.embed import embed_batches
    from cbir.index import open_index
    from cbir.index.ingest import ingest_records
    from cbir.io import Pseudonymizer
    from cbir.models import ModelConfig, create_model, load_checkpoint, save_checkpoint
    from cbir.search.warm import WarmSearcher

    with tempfile.TemporaryDirectory(prefix="cbir-bench-pipeline-") as tmp:
        root = Path(tmp)
        reporter.log(f"  pipeline: writing {n_images} synthetic {source_size}-px DICOMs")
        synth_dataset("rsna", n_images, source_size, root / "data", seed=0)
        save_checkpoint(create_model(ModelConfig(backbone=backbone, image_size=image_size, embed_dim=128, bits=64)),
                        root / "model")
        loaded = load_checkpoint(root / "model", "cpu")
        records = load_dataset(root / "data", "rsna")
        paths = records.meta["path"].tolist()

        pixels = torch.rand(n_images, 1, image_size, image_size)
        with torch.inference_mode():
            loaded.model(pixels[:batch_size])  # warm-up
            started = time.perf_counter()
            for start in range(0, n_images, batch_size):
                loaded.model(pixels[start:start + batch_size])
            bare = n_images / (time.perf_counter() - started)
        reporter.log(f"  pipeline: bare forward {bare:.1f} images/s")

        for _ in embed_batches(loaded, paths[:batch_size], batch_size, 0):  # warm-up
            pass
        started = time.perf_counter()
        for _ in embed_batches(loaded, paths, batch_size, workers):
            pass
        full = n_images / (time.perf_counter() - started)
        reporter.log(f"  pipeline: decode + preprocess + forward {full:.1f} images/s")

        pseudonymize = Pseudonymizer(b"bench-key-bench-key-bench-key-00")
        with open_index(str(root / "index"), writable=True, create=True) as index:
            ingest_records(records, loaded, index, "bench", pseudonymize, batch_size, workers)
            warm = WarmSearcher(index, "bench", loaded, pseudonymize)
            for path in paths[:3]:
                warm.query(path, k=10, prefilter=100)
            times = []
            for path in paths[3:3 + queries]:
                started = time.perf_counter()
                warm.query(path, k=10, prefilter=100)
                times.append(1000 * (time.perf_counter() - started))
        reporter.log(f"  pipeline: warm query p50 {np.percentile(times, 50):.1f} ms")
    return {"backbone": backbone, "image_size": image_size, "source_size": source_size, "n_images": n_images,
            "batch_size": batch_size, "workers": workers, "images_per_s": round(full, 2),
            "bare_forward_images_per_s": round(bare, 2), "pipeline_fraction_of_bare": round(full / bare, 3),
            "warm_query_ms": round(float(np.percentile(times, 50)), 1),
            "warm_query_p99_ms": round(float(np.percentile(times, 99)), 1), "warm_queries": len(times)}
