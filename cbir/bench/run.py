"""`cbir bench`: every engine and method on the same data and queries, in one run; a table and JSON."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cbir.bench.data import FILTER_20, BenchData, exact_top
from cbir.bench.engines import (
    EdgeHnswEngine,
    Engine,
    FaissEngine,
    IndexEngine,
    MemoryEngine,
    NumpyEngine,
    faiss_available,
)
from cbir.console import QUIET, Reporter

#: qdrant-client's local mode scans in Python; above this many points it is skipped (with a warning).
LOCAL_MODE_CAP = 20_000
#: A method stops after this many seconds of queries (at least `MIN_QUERIES` are timed); rows say how many ran.
METHOD_BUDGET_S = 20.0
MIN_QUERIES = 3


@dataclass
class Row:
    engine: str
    method: str
    n: int
    filter: str
    p50_ms: float
    p99_ms: float
    recall_at_10: float
    ingest_points_per_s: float
    build_s: float = 0.0
    queries: int = 0


def recall(got: list[int], truth: np.ndarray) -> float:
    """|got ∩ truth| / |truth| for one query."""
    return len(set(got) & set(truth.tolist())) / max(1, len(truth))


def run_engine(engine: Engine, data: BenchData, k: int, prefilter: int, radius: int, truth: dict[str, list],
               reporter: Reporter = QUIET) -> list[Row]:
    """Load the data into `engine` and time each of its methods with and without the 20 % filter."""
    reporter.log(f"  {engine.name}: loading {len(data.points):,} points")
    ingest, build = engine.load(data)
    rows = []
    try:
        for method, search in engine.methods(k, prefilter, radius).items():
            for label, flt in (("none", None), ("label=a (20%)", FILTER_20)):
                if flt is not None and not engine.filters:
                    continue
                search(data.queries[0], data.query_codes[0], flt)  # warm-up
                times, recalls = [], []
                for q, c, want in zip(data.queries, data.query_codes, truth[label], strict=True):
                    started = time.perf_counter()
                    got = search(q, c, flt)
                    times.append(1000 * (time.perf_counter() - started))
                    recalls.append(recall(got, want))
                    if len(times) >= MIN_QUERIES and sum(times) > 1000 * METHOD_BUDGET_S:
                        break
                rows.append(Row(engine.name, method, len(data.points), label,
                                round(float(np.percentile(times, 50)), 3), round(float(np.percentile(times, 99)), 3),
                                round(float(np.mean(recalls)), 4), round(ingest, 1), round(build, 2), len(times)))
                reporter.log(f"    {method:26s} filter {label:14s} p50 {rows[-1].p50_ms:8.3f} ms  "
                             f"recall@10 {rows[-1].recall_at_10:.3f}")
    finally:
        engine.close()
    return rows


def bench_vectors(data: BenchData, k: int = 10, prefilter: int = 1000, radius: int | None = None,
                  hnsw: bool = True, reporter: Reporter = QUIET) -> list[Row]:
    """All engines on one data set."""
    n = len(data.points)
    bits = data.points[0].code.size
    radius = bits // 4 if radius is None else radius
    emb = data.embeddings
    mask = np.array([p.payload.get("label") == FILTER_20.must["label"] for p in data.points])
    truth = {"none": [exact_top(emb, None, q, k) for q in data.queries],
             "label=a (20%)": [exact_top(emb, mask, q, k) for q in data.queries]}
    engines: list[Engine] = [MemoryEngine(), NumpyEngine(), IndexEngine("edge")]
    if hnsw:
        engines.append(EdgeHnswEngine())
    if n <= LOCAL_MODE_CAP:
        engines.append(IndexEngine("local"))
    else:
        reporter.warn(f"qdrant-client local mode skipped at {n:,} points (it scans in Python; cap {LOCAL_MODE_CAP:,})")
    if faiss_available():
        engines.append(FaissEngine())
    else:
        reporter.warn("faiss-cpu is not installed (pip install 'cbir[bench]'): FAISS rows skipped")
    rows = []
    for engine in engines:
        rows += run_engine(engine, data, k, prefilter, radius, truth, reporter)
    return rows


def machine() -> dict[str, Any]:
    import os

    import torch
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def to_json(rows: list[Row], pipeline: dict[str, Any] | None, settings: dict[str, Any]) -> dict[str, Any]:
    return {"rows": [asdict(r) for r in rows], "pipeline": pipeline or {}, "settings": settings,
            "machine": machine()}


def markdown(result: dict[str, Any]) -> str:
    """The rows as a Markdown table (for docs/performance.md), then the pipeline line."""
    lines = ["| engine | method | n | filter | p50 ms | p99 ms | recall@10 | ingest points/s | build s | queries |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['engine']} | {r['method']} | {r['n']:,} | {r['filter']} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['recall_at_10']:.3f} | {r['ingest_points_per_s']:,.0f} | "
                     f"{r['build_s']:.1f} | {r['queries']} |")
    p = result.get("pipeline") or {}
    if p:
        lines += ["", f"Pipeline ({p['backbone']} at {p['image_size']} px, {p['n_images']} synthetic "
                      f"{p['source_size']}-px JPEG DICOMs, batch {p['batch_size']}, {p['workers']} decode workers): "
                      f"{p['images_per_s']} images/s with decoding vs {p['bare_forward_images_per_s']} for the bare "
                      f"forward pass ({100 * p['pipeline_fraction_of_bare']:.0f} %); warm query "
                      f"{p['warm_query_ms']} ms p50, {p['warm_query_p99_ms']} ms p99 ({p['warm_queries']} queries)."]
    return "\n".join(lines) + "\n"
