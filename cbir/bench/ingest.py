"""Ingest into Qdrant Edge through `EdgeIndex.upsert` + `release`: the flush schedule that doubles with the
collection (`cbir.store.edge_files.FlushSchedule`) against the old one (every `FLUSH_POINTS` points), in
interleaved rounds of the same run, since the machine may be shared. Wall and CPU seconds, flushes, load.

    python -m cbir.bench.ingest --n 100000 --rounds 6
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time

from cbir.bench.data import synthetic
from cbir.store import edge
from cbir.store.base import Point
from cbir.store.edge_files import FlushSchedule

BATCH = 2048   # points per `upsert` call, as `cbir bench` loads


class CountingSchedule(FlushSchedule):
    """A `FlushSchedule` that counts its flushes."""

    count = 0

    def flushed(self, name: str) -> None:
        self.count += 1
        super().flushed(name)


def load(points: list[Point], grow: bool) -> dict[str, float]:
    """Create a collection, upsert `points` in batches of `BATCH`, release it; the figures of one run."""
    folder = tempfile.mkdtemp(prefix="cbir-ingest-")
    try:
        index = edge.EdgeIndex(os.path.join(folder, "edge"), writable=True, create=True)
        index._flushes = schedule = CountingSchedule(edge.FLUSH_POINTS, edge.FLUSH_SECONDS, grow)
        dim, bits = points[0].embedding.size, points[0].code.size
        index.create_collection("bench", dim, bits, {})
        gc.collect()
        load_before = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(points), BATCH):
            index.upsert("bench", points[start:start + BATCH])
        index.release("bench")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        index.close()
        return {"points_per_s": len(points) / wall, "wall_s": wall, "cpu_s": cpu, "flushes": schedule.count + 1,
                "load": (load_before + os.getloadavg()[0]) / 2}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    points = synthetic(args.n, args.dim, args.bits, queries=1).points
    assert points is not None
    for round_ in range(args.rounds):
        for grow in (True, False) if round_ % 2 else (False, True):
            r = load(points, grow)
            print(f"{'doubling' if grow else 'old':8s} {r['points_per_s']:7,.0f} points/s  wall {r['wall_s']:5.2f} s  "
                  f"cpu {r['cpu_s']:5.2f} s  flushes {r['flushes']:2.0f}  load {r['load']:.2f}", flush=True)


if __name__ == "__main__":
    main()
