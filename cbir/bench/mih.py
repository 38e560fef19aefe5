"""Multi-index hashing (MIH) against the full-scan Hamming prefetch, on Qdrant Edge.

MIH splits each K-bit code into m substrings stored as indexed integer payload fields. A code within
Hamming distance R of the query has, by the pigeonhole principle, at least one substring within ⌊R/m⌋ of the
query's substring, so a payload filter over the substrings' neighbourhoods (exact matches when R < m) yields a
candidate set that contains every answer; the `hash` vector then checks the exact distance. The full scan
computes the distance of every code. Both give exactly the same set; this measures which is faster, per
collection size and radius.

    python -m cbir.bench.mih --n 10000,100000 --bits 64 --m 4 --radii 2,3,5,7 --queries 100 --json-out mih.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from itertools import combinations
from pathlib import Path

import numpy as np
import qdrant_edge as qe

HASH = "hash"
EXACT = qe.SearchParams(exact=True)


def clustered_codes(n: int, dim: int, bits: int, seed: int = 0, clusters: int = 200, noise: float = 0.3
                    ) -> np.ndarray:
    """Codes as a trained model's would be: signs of a random projection of clustered embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    emb = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return (emb @ rng.normal(size=(dim, bits)) > 0).astype(np.uint8)


def substrings(codes: np.ndarray, m: int) -> np.ndarray:
    """(n, m) integers: the code cut into m equal pieces, each read as a big-endian unsigned integer."""
    n, bits = codes.shape
    width = bits // m
    weights = 1 << np.arange(width - 1, -1, -1, dtype=np.int64)
    return (codes.reshape(n, m, width).astype(np.int64) * weights).sum(axis=2)


def neighbourhood(value: int, width: int, radius: int) -> list[int]:
    """Every `width`-bit integer within Hamming distance `radius` of `value`."""
    out = [value]
    for r in range(1, radius + 1):
        for flip in combinations(range(width), r):
            out.append(value ^ sum(1 << b for b in flip))
    return out


def build(codes: np.ndarray, m: int, folder: Path) -> tuple[qe.EdgeShard, float]:
    no_graph = qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000)
    config = qe.EdgeConfig(vectors={HASH: qe.EdgeVectorParams(size=codes.shape[1], distance=qe.Distance.Manhattan,
                                                              hnsw_config=no_graph,
                                                              datatype=qe.VectorStorageDatatype.Uint8)},
                           wal_enabled=False)
    shard = qe.EdgeShard.create(str(folder), config)
    for i in range(m):
        shard.update(qe.UpdateOperation.create_field_index(f"mih{i}", qe.PayloadSchemaType.Integer))
    subs = substrings(codes, m)
    started = time.perf_counter()
    for start in range(0, len(codes), 1024):
        points = [qe.Point(str(uuid.UUID(int=i + 1)), {HASH: codes[i].astype(np.float32)},
                           {f"mih{j}": int(subs[i, j]) for j in range(m)})
                  for i in range(start, min(start + 1024, len(codes)))]
        shard.update(qe.UpdateOperation.upsert_points(points))
    shard.flush()
    return shard, time.perf_counter() - started


def radius_query(shard: qe.EdgeShard, code: np.ndarray, radius: int, n: int, mih: int | None) -> set[str]:
    """Ids within Hamming `radius`: a full scan (mih=None) or MIH with `mih` substrings."""
    flt = None
    if mih is not None:
        width = len(code) // mih
        sub = substrings(code[None, :], mih)[0]
        keys: list[qe.ConditionType] = [
            qe.FieldCondition(f"mih{j}", match=qe.MatchAny(neighbourhood(int(sub[j]), width, radius // mih)))
            for j in range(mih)]
        flt = qe.Filter(should=keys)
    query = qe.Query.Nearest(code.astype(np.float32), using=HASH)  # type: ignore[arg-type]  # stub: lists only
    request = qe.QueryRequest(limit=n, query=query, filter=flt,
                              score_threshold=radius + 0.5, with_payload=False, params=EXACT)
    return {str(p.id) for p in shard.query(request)}


def measure(sizes: list[int], bits: int, m: int, radii: list[int], queries: int, dim: int = 128) -> list[dict]:
    rows = []
    for n in sizes:
        codes = clustered_codes(n, dim, bits)
        with tempfile.TemporaryDirectory() as tmp:
            shard, ingest_s = build(codes, m, Path(tmp) / "shard")
            rng = np.random.default_rng(1)
            picks = codes[rng.integers(0, n, queries)]
            for radius in radii:
                truth = [set(np.flatnonzero((codes != q).sum(axis=1) <= radius)) for q in picks]
                row = {"n": n, "bits": bits, "m": m, "radius": radius,
                       "mean_answers": float(np.mean([len(t) for t in truth])), "ingest_points_per_s": n / ingest_s}
                for method, arg in (("full_scan", None), ("mih", m)):
                    times, exact = [], True
                    radius_query(shard, picks[0], radius, n, arg)  # warm
                    for q, want in zip(picks, truth, strict=True):
                        started = time.perf_counter()
                        got = radius_query(shard, q, radius, n, arg)
                        times.append(1000 * (time.perf_counter() - started))
                        exact &= got == {str(uuid.UUID(int=int(i) + 1)) for i in want}
                    row[f"{method}_p50_ms"] = float(np.percentile(times, 50))
                    row[f"{method}_p99_ms"] = float(np.percentile(times, 99))
                    row[f"{method}_exact"] = bool(exact)
                rows.append(row)
                print(json.dumps(row), flush=True)
            shard.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="10000,100000")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--radii", default="2,3,5,7")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--json-out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    rows = measure([int(x) for x in args.n.split(",")], args.bits, args.m, [int(r) for r in args.radii.split(",")],
                   args.queries)
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
