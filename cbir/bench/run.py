"""`cbir bench`: every engine and method on the same data and queries, in one run; a table and JSON."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
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
    ReducedMemoryEngine,
    faiss_available,
)
from cbir.bench.layout import layouts_markdown
from cbir.bench.targets import targets_markdown
from cbir.console import QUIET, Reporter
from cbir.threads import single_threaded

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
    load: bool = False           # a second process kept one core busy while the row ran (`--load`)
    threads: int = 1             # BLAS/OpenMP threads of the search (single queries: 1)
    resident_mib: float | None = None   # in-memory engines: resident memory the loaded index added
    raw_mib: float | None = None        # the float32 embeddings alone (n × dim × 4 bytes)
    prefilter: int | None = None        # N of a top-N method (`PREFILTER_METHODS`); None for the others
    recall_ci95: float = 0.0            # half-width of recall@10's 95 % interval over the queries (normal approx.)
    vs_memory: float | None = None      # p50 ÷ cbir-memory's p50 at the same method (`COUNTERPART`), n, filter, N, load
    copied: float | None = None         # share of the row's queries that the index's in-memory copy answered
    one_shot_ms: float | None = None    # a fresh index opened, one query answered, closed (a one-shot `cbir query`)


@dataclass
class BatchRow:
    """Throughput of a whole batch of queries with every thread (what an evaluation or a batch job sees)."""
    engine: str
    method: str
    n: int
    batch: int
    queries_per_s: float
    threads: int
    load: bool = False


#: Methods whose answer depends on the prefilter's N: one row per N of `--prefilter`.
PREFILTER_METHODS = ("topn_prefilter_rerank", "binary_flat_rerank", "topn_codes_only", "binary_flat_only")

#: Engines that run in this process, whose rows `--load` repeats with one core busy.
IN_PROCESS = ("cbir-memory", "numpy", "faiss")
#: The cbir-memory method a row's ratio compares with, where it is named differently.
COUNTERPART = {"binary_flat_rerank": "topn_prefilter_rerank", "binary_flat_only": "topn_codes_only",
               "hnsw_knn": "exact_knn"}


@contextlib.contextmanager
def busy_core(active: bool = True) -> Iterator[None]:
    """A second process that keeps one core busy (a Python spin loop) while the block runs."""
    if not active:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.3)    # let it reach the spin loop
        yield
    finally:
        spinner.kill()
        spinner.wait()


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@contextlib.contextmanager
def one_thread(engine: Engine) -> Iterator[None]:
    """Single queries on one thread: BLAS through `cbir.threads`, FAISS's OpenMP through its own setter."""
    restore = None
    if isinstance(engine, FaissEngine):
        import faiss
        restore = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
    try:
        with single_threaded():
            yield
    finally:
        if restore is not None:
            import faiss
            faiss.omp_set_num_threads(restore)


def recall(got: list[int], truth: np.ndarray) -> float:
    """|got ∩ truth| / |truth| for one query."""
    return len(set(got) & set(truth.tolist())) / max(1, len(truth))


def searches(engine: Engine, k: int, prefilters: Sequence[int], radius: int) -> list[tuple[str, int | None, Any]]:
    """(method, N or None, search) for every method of `engine`; a top-N method once per N."""
    found: list[tuple[str, int | None, Any]] = []
    for i, n in enumerate(prefilters):
        for method, search in engine.methods(k, n, radius).items():
            if method in PREFILTER_METHODS:
                found.append((method, n, search))
            elif i == 0:
                found.append((method, None, search))
    return found


def run_engine(engine: Engine, data: BenchData, k: int, prefilter: int | Sequence[int], radius: int,
               truth: dict[str, list],
               reporter: Reporter = QUIET, loads: tuple[bool, ...] = (False,),
               batch_rows: list[BatchRow] | None = None) -> list[Row]:
    """Load the data into `engine` and time each of its methods with and without the 20 % filter, one query at a
    time on one thread, once per entry of `loads` (True: with one core busy), a top-N method once per N of
    `prefilter`; batched throughput rows (every thread) go to `batch_rows`."""
    prefilters = [prefilter] if isinstance(prefilter, int) else list(prefilter)
    reporter.log(f"  {engine.name}: loading {len(data):,} points")
    import cbir.store.memory  # noqa: F401 - imported before the resident memory is measured
    before = resident_bytes()
    ingest, build = engine.load(data)
    resident = raw = None
    if isinstance(engine, MemoryEngine):
        memory = engine.memory
        shared = memory.embeddings.nbytes if np.shares_memory(memory.embeddings, data.embeddings) else 0
        resident = round((resident_bytes() - before + shared) / 2**20, 1)
        raw = round(data.embeddings.nbytes / 2**20, 1)
    rows = []
    try:
        for load in loads:
            with busy_core(load):
                for method, n, search in searches(engine, k, prefilters, radius):
                    for label, flt in (("none", None), ("label=a (20%)", FILTER_20)):
                        if flt is not None and not engine.filters:
                            continue
                        asked = engine.answered()
                        with one_thread(engine):
                            times, recalls = _time_queries(search, data, flt, truth[label])
                            once = engine.one_shot(method, k, n or prefilters[0], radius, data, flt)
                        rows.append(Row(engine.name, method, len(data), label,
                                        round(float(np.percentile(times, 50)), 3),
                                        round(float(np.percentile(times, 99)), 3),
                                        round(float(np.mean(recalls)), 4), round(ingest, 1), round(build, 2),
                                        len(times), load, 1, resident, raw, n, ci95(recalls),
                                        copied=_copied(asked, engine.answered()),
                                        one_shot_ms=None if once is None else round(once, 1)))
                        shown = method + ("" if n is None else f" N={n}")
                        reporter.log(f"    {shown:26s} filter {label:14s} {'load' if load else 'idle'} "
                                     f"p50 {rows[-1].p50_ms:8.3f} ms  p99 {rows[-1].p99_ms:8.3f} ms  "
                                     f"recall@10 {rows[-1].recall_at_10:.3f}")
                if batch_rows is not None:
                    for method, batch in engine.batched(k).items():
                        batch(data.queries[:8])  # warm-up
                        started = time.perf_counter()
                        batch(data.queries)
                        qps = len(data.queries) / (time.perf_counter() - started)
                        batch_rows.append(BatchRow(engine.name, method, len(data), len(data.queries),
                                                   round(qps, 1), _threads(engine), load))
                        reporter.log(f"    {method:26s} batch of {len(data.queries)} {'load' if load else 'idle'} "
                                     f"{qps:,.0f} queries/s")
    finally:
        engine.close()
    return rows


def _copied(before: Counter[str] | None, after: Counter[str] | None) -> float | None:
    """The share of the requests between two `Engine.answered` counts that a copy answered."""
    if before is None or after is None:
        return None
    done = after - before
    return round(done["copy"] / max(1, done["copy"] + done["native"]), 3)


def add_ratios(rows: list[Row]) -> None:
    """Set each row's `vs_memory`: its p50 over cbir-memory's at the same method (or its `COUNTERPART`), n, filter,
    N and load, where this run has that row."""
    memory = {(r.method, r.n, r.filter, r.prefilter, r.load): r.p50_ms for r in rows if r.engine == "cbir-memory"}
    for r in rows:
        base = memory.get((COUNTERPART.get(r.method, r.method), r.n, r.filter, r.prefilter, r.load))
        if base:
            r.vs_memory = round(r.p50_ms / base, 2)


def ci95(values: list[float]) -> float:
    """Half-width of the 95 % interval of the mean of `values` (1.96 standard errors; 0 for fewer than 2)."""
    if len(values) < 2:
        return 0.0
    return round(1.96 * float(np.std(values, ddof=1)) / np.sqrt(len(values)), 4)


def _time_queries(search: Any, data: BenchData, flt: Any, truth: list) -> tuple[list[float], list[float]]:
    search(data.queries[0], data.query_codes[0], flt)  # warm-up
    times, recalls = [], []
    for q, c, want in zip(data.queries, data.query_codes, truth, strict=True):
        started = time.perf_counter()
        got = search(q, c, flt)
        times.append(1000 * (time.perf_counter() - started))
        recalls.append(recall(got, want))
        if len(times) >= MIN_QUERIES and sum(times) > 1000 * METHOD_BUDGET_S:
            break
    return times, recalls


def _threads(engine: Engine) -> int:
    if isinstance(engine, FaissEngine):
        import faiss
        return int(faiss.omp_get_max_threads())
    from cbir.threads import blas_threads
    return max(blas_threads(), default=1)


def bench_vectors(data: BenchData, k: int = 10, prefilter: int | Sequence[int] = 1000, radius: int | None = None,
                  hnsw: bool = True, reporter: Reporter = QUIET, load: bool = False, in_process_only: bool = False,
                  batch_rows: list[BatchRow] | None = None) -> list[Row]:
    """All engines on one data set (`in_process_only`: cbir-memory, NumPy and FAISS, e.g. at 1M points, or for
    arrays-only data). `load=True` repeats the in-process engines' rows with one core busy."""
    n = len(data)
    bits = data.codes.shape[1]
    radius = bits // 4 if radius is None else radius
    emb = data.embeddings
    mask = data.labels == FILTER_20.must["label"]
    with single_threaded():   # the ground truth, one query at a time (many threads would wait for a busy core)
        truth = {"none": [exact_top(emb, None, q, k) for q in data.queries],
                 "label=a (20%)": [exact_top(emb, mask, q, k) for q in data.queries]}
    engines: list[Engine] = [MemoryEngine(), ReducedMemoryEngine("f16"), ReducedMemoryEngine("i8"), NumpyEngine()]
    in_process_only = in_process_only or data.points is None
    if not in_process_only:
        engines.append(IndexEngine("edge"))
        if hnsw:
            engines.append(EdgeHnswEngine())
        if n <= LOCAL_MODE_CAP:
            engines.append(IndexEngine("local"))
        else:
            reporter.warn(f"qdrant-client local mode skipped at {n:,} points (it scans in Python; "
                          f"cap {LOCAL_MODE_CAP:,})")
    if faiss_available():
        engines.append(FaissEngine())
    else:
        reporter.warn("faiss-cpu is not installed (pip install 'cbir[bench]'): FAISS rows skipped")
    rows = []
    for engine in engines:
        loads = (False, True) if load and engine.name in IN_PROCESS else (False,)
        rows += run_engine(engine, data, k, prefilter, radius, truth, reporter, loads, batch_rows)
    add_ratios(rows)
    return rows


def machine() -> dict[str, Any]:
    import os

    import torch
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def to_json(rows: list[Row], pipeline: dict[str, Any] | None, settings: dict[str, Any],
            batch_rows: list[BatchRow] | None = None) -> dict[str, Any]:
    return {"rows": [asdict(r) for r in rows], "batched": [asdict(r) for r in batch_rows or []],
            "pipeline": pipeline or {}, "settings": settings, "machine": machine()}


def markdown(result: dict[str, Any]) -> str:
    """The rows as a Markdown table (for docs/performance.md), then the batched rows, the pipeline line and the
    serve rows."""
    lines = ["| engine | method | n | filter | load | p50 ms | p99 ms | × memory p50 | recall@10 | ingest points/s | "
             "build s | queries | copy answered | one-shot ms | memory MiB (raw float32) |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        memory = f"{r['resident_mib']:,.0f} ({r['raw_mib']:,.0f})" if r.get("resident_mib") is not None else ""
        lines.append(f"| {r['engine']} | {_method(r)} | {r['n']:,} | {r['filter']} | "
                     f"{'yes' if r.get('load') else 'no'} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {_shown(r.get('vs_memory'), '{:.2f}×')} | "
                     f"{r['recall_at_10']:.3f} ± {r.get('recall_ci95', 0):.3f} | "
                     f"{r['ingest_points_per_s']:,.0f} | "
                     f"{r['build_s']:.1f} | {r['queries']} | {_shown(r.get('copied'), '{:.0%}')} | "
                     f"{_shown(r.get('one_shot_ms'), '{:,.1f}')} | {memory} |")
    lines += ["", ratio_summary(result["rows"])]
    if result.get("batched"):
        lines += ["", "Batched (the whole query set in one call, every thread):", "",
                  "| engine | method | n | batch | threads | load | queries/s |", "|---|---|---:|---:|---:|---|---:|"]
        lines += [f"| {b['engine']} | {b['method']} | {b['n']:,} | {b['batch']} | {b['threads']} | "
                  f"{'yes' if b['load'] else 'no'} | {b['queries_per_s']:,.0f} |" for b in result["batched"]]
    p = result.get("pipeline") or {}
    if p:
        lines += ["", f"Pipeline ({p['backbone']} at {p['image_size']} px, {p['n_images']} synthetic "
                      f"{p['source_size']}-px JPEG DICOMs, batch {p['batch_size']}, {p['workers']} decode workers): "
                      f"{p['images_per_s']} images/s with decoding vs {p['bare_forward_images_per_s']} for the bare "
                      f"forward pass ({100 * p['pipeline_fraction_of_bare']:.0f} %); warm query "
                      f"{p['warm_query_ms']} ms p50, {p['warm_query_p99_ms']} ms p99 ({p['warm_queries']} queries)."]
        if p.get("decodes"):
            lines += ["", f"By decode path (`ModelConfig.decode`; interleaved, median of {p['rounds']} rounds; "
                          f"bare forward {p['bare_forward_images_per_s']} images/s):", "",
                      "| decode | images/s | of bare forward | warm query p50 ms | p99 ms |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {d['decode']} | {d['images_per_s']} | {100 * d['pipeline_fraction_of_bare']:.0f} % | "
                      f"{d['warm_query_ms']:.1f} | {d['warm_query_p99_ms']:.1f} |" for d in p["decodes"]]
        if p.get("layouts"):
            lines += layouts_markdown(p["layouts"], p["backbone"], p["image_size"], p["rounds"] + 1)
        if p.get("serve"):
            lines += ["", "`cbir serve` (a separate process; POST /query with a DICOM, k=10, prefilter 100):", "",
                      "| clients | load | requests | p50 ms | p99 ms |", "|---:|---|---:|---:|---:|"]
            lines += [f"| {s['clients']} | {'yes' if s['load'] else 'no'} | {s['requests']} | {s['p50_ms']:.1f} | "
                      f"{s['p99_ms']:.1f} |" for s in p["serve"]]
    lines += ["", "Targets (issue 15), from this run:", "", targets_markdown(result).rstrip()]
    return "\n".join(lines) + "\n"


def _shown(value: float | None, form: str) -> str:
    return "" if value is None else form.format(value)


def ratio_summary(rows: list[dict[str, Any]]) -> str:
    """One line per engine and size: the range of its p50 ratios to cbir-memory (idle rows), and its worst row."""
    parts = []
    for engine, n in dict.fromkeys((r["engine"], r["n"]) for r in rows if r["engine"] != "cbir-memory"):
        mine = [r for r in rows if (r["engine"], r["n"]) == (engine, n) and r.get("vs_memory") is not None
                and not r.get("load")]
        if mine:
            worst = max(mine, key=lambda r: r["vs_memory"])
            within = sum(r["vs_memory"] <= 2 for r in mine)
            parts.append(f"{engine} at {n:,}: {min(r['vs_memory'] for r in mine):.2f}–{worst['vs_memory']:.2f}× "
                         f"(worst: {_method(worst)}, filter {worst['filter']}; {within} of {len(mine)} rows ≤ 2×)")
    return "p50 as a multiple of cbir-memory's (same method, n, filter, N; idle): " + ("; ".join(parts) or "none") + "."


def _method(row: dict[str, Any]) -> str:
    return row["method"] + (f" N={row['prefilter']:,}" if row.get("prefilter") else "")
