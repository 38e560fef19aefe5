"""The model side of `cbir bench`: images/s through decode + preprocessing + forward pass (the ingest
pipeline, decoding in DataLoader workers) against a bare forward pass of the same backbone on preloaded
tensors, the latency of one warm query from a DICOM path to ranked neighbours, and the memory order and batch
of the forward pass (`cbir.bench.layout`)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbir.console import QUIET, Reporter
from cbir.extras import MissingExtraError, missing

DECODES = ("full", "reduced")


def bench_pipeline(backbone: str = "resnet18", image_size: int = 224, n_images: int = 96, batch_size: int = 16,
                   workers: int = 2, source_size: int = 1024, queries: int = 20, serve_queries: int = 0,
                   load: bool = False, rounds: int = 2, reporter: Reporter = QUIET) -> dict[str, Any]:
    """Synthetic JPEG DICOMs of `source_size` px (RSNA's own size is 1024), a randomly initialised `backbone`,
    once per decode path (`ModelConfig.decode`: full, and reduced by DCT scaling), the paths interleaved (bare
    forward, full, reduced; `rounds` times, the median kept; queries alternating) so that a shared machine's load
    falls on both alike. The top-level figures are the full decode's; `decodes` has a row per path.
    `serve_queries` > 0 also times `cbir serve` (a separate process, full decode) with 1 and 2 parallel clients,
    each sending that many queries (`load`: also with one core busy)."""
    from cbir.app.ingest import ingest_records
    from cbir.data.layout import load_dataset
    from cbir.data.synth import synth_dataset
    from cbir.embed import embed_batches
    from cbir.io import Pseudonymizer
    from cbir.models import ModelConfig, create_model, load_checkpoint, save_checkpoint
    from cbir.search.warm import WarmSearcher
    from cbir.store import open_index

    with tempfile.TemporaryDirectory(prefix="cbir-bench-pipeline-") as tmp:
        root = Path(tmp)
        reporter.log(f"  pipeline: writing {n_images} synthetic {source_size}-px DICOMs")
        synth_dataset("rsna", n_images, source_size, root / "data", seed=0)
        model = create_model(ModelConfig(backbone=backbone, image_size=image_size, embed_dim=128, bits=64))
        models = {}
        for decode in DECODES:   # the same weights; only the recorded decode path differs
            model.config.decode = decode
            save_checkpoint(model, root / f"model-{decode}")
            models[decode] = load_checkpoint(root / f"model-{decode}", "cpu")
        records = load_dataset(root / "data", "rsna")
        paths = records.meta["path"].tolist()
        pixels = torch.rand(n_images, 1, image_size, image_size)

        def bare() -> float:
            with torch.inference_mode():
                started = time.perf_counter()
                for start in range(0, n_images, batch_size):
                    models["full"].model(pixels[start:start + batch_size])
                return n_images / (time.perf_counter() - started)

        def embedded(decode: str) -> float:
            started = time.perf_counter()
            for _ in embed_batches(models[decode], paths, batch_size, workers):
                pass
            return n_images / (time.perf_counter() - started)

        with torch.inference_mode():
            models["full"].model(pixels[:batch_size])  # warm-up
        for decode in DECODES:
            for _ in embed_batches(models[decode], paths[:batch_size], batch_size, 0):  # warm-up
                pass
        speeds: dict[str, list[float]] = {"bare": [], **{d: [] for d in DECODES}}
        for _ in range(rounds):
            speeds["bare"].append(bare())
            for decode in DECODES:
                speeds[decode].append(embedded(decode))
        rate = {name: float(np.median(values)) for name, values in speeds.items()}
        reporter.log(f"  pipeline: bare forward {rate['bare']:.1f} images/s; with decoding "
                     + ", ".join(f"{d} {rate[d]:.1f}" for d in DECODES))

        pseudonymize = Pseudonymizer(b"bench-key-bench-key-bench-key-00")
        times: dict[str, list[float]] = {d: [] for d in DECODES}
        for decode in DECODES:
            with open_index(str(root / f"index-{decode}"), writable=True, create=True) as index:
                ingest_records(records, models[decode], index, "bench", pseudonymize, batch_size, workers)
        with open_index(str(root / "index-full")) as full, open_index(str(root / "index-reduced")) as reduced:
            warm = {"full": WarmSearcher(full, "bench", models["full"], pseudonymize, state_dir=None),
                    "reduced": WarmSearcher(reduced, "bench", models["reduced"], pseudonymize, state_dir=None)}
            for path in paths[:3]:
                for searcher in warm.values():
                    searcher.query(path, k=10, prefilter=100)
            for path in paths[3:3 + queries]:
                for decode, searcher in warm.items():
                    started = time.perf_counter()
                    searcher.query(path, k=10, prefilter=100)
                    times[decode].append(1000 * (time.perf_counter() - started))
        rows = [{"decode": d, "images_per_s": round(rate[d], 2),
                 "pipeline_fraction_of_bare": round(rate[d] / rate["bare"], 3),
                 "warm_query_ms": round(float(np.percentile(times[d], 50)), 1),
                 "warm_query_p99_ms": round(float(np.percentile(times[d], 99)), 1)} for d in DECODES]
        reporter.log("  pipeline: warm query p50 " + ", ".join(f"{r['decode']} {r['warm_query_ms']:.1f} ms"
                                                                for r in rows))
        serve = []
        if serve_queries and missing("serve") is not None:
            reporter.warn(str(MissingExtraError("the serve rows", "serve", str(missing("serve")))))
        elif serve_queries:
            serve = bench_serve(root / "index-full", root / "model-full", paths, serve_queries, load, reporter)
    from cbir.bench.layout import bench_layouts
    layouts = bench_layouts(backbone, image_size, rounds=rounds + 1, reporter=reporter)
    full_row = {k: v for k, v in rows[0].items() if k != "decode"}
    return {"serve": serve, "layouts": layouts, "backbone": backbone, "image_size": image_size,
            "source_size": source_size, "n_images": n_images, "batch_size": batch_size, "workers": workers,
            "rounds": rounds,
            "bare_forward_images_per_s": round(rate["bare"], 2), **full_row, "warm_queries": len(times["full"]),
            "decodes": rows}


def bench_serve(index: Path, model: Path, paths: list[str], queries: int, load: bool = False,
                reporter: Reporter = QUIET) -> list[dict[str, Any]]:
    """Start `cbir serve` on `index` (collection "bench") and time POST /query from 1 and then 2 parallel
    clients, `queries` requests each, with DICOMs from `paths` (`load`: both again with one core busy)."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from cbir.bench.run import busy_core

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CBIR_PSEUDONYM_KEY": "bench-key-bench-key-bench-key-00",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "cbir.cli.main", "serve", "--index", str(index), "--collection",
                               "bench", "--model", str(model), "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    bodies = [_multipart(Path(p)) for p in paths]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"cbir serve did not start: {server.stderr.read().decode()[-500:]}"
                                       if server.stderr else "cbir serve did not start") from None
                time.sleep(0.2)

        def client(offset: int, count: int = queries) -> list[float]:
            times = []
            for i in range(count):
                body, boundary = bodies[(offset + i) % len(bodies)]
                request = urllib.request.Request(f"{url}/query", data=body, method="POST", headers={
                    "Content-Type": f"multipart/form-data; boundary={boundary}"})
                started = time.perf_counter()
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                times.append(1000 * (time.perf_counter() - started))
            return times

        client(0, 3)   # warm-up
        rows = []
        for busy in ((False, True) if load else (False,)):
            with busy_core(busy):
                for clients in (1, 2):
                    with ThreadPoolExecutor(clients) as pool:
                        times = [t for part in pool.map(client, [c * 7 for c in range(clients)]) for t in part]
                    rows.append({"clients": clients, "load": busy, "requests": len(times),
                                 "p50_ms": round(float(np.percentile(times, 50)), 1),
                                 "p99_ms": round(float(np.percentile(times, 99)), 1)})
                    reporter.log(f"  serve: {clients} client(s){' under load' if busy else ''}: p50 "
                                 f"{rows[-1]['p50_ms']} ms, p99 {rows[-1]['p99_ms']} ms ({len(times)} requests)")
        return rows
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _multipart(path: Path) -> tuple[bytes, str]:
    """A multipart/form-data body: the file, k=10 and prefilter=100."""
    boundary = "cbir-bench-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in (("k", 10), ("prefilter", 100))]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary
