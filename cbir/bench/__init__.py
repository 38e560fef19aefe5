"""Benchmarks (measurements, not tests): run as modules, e.g. `python -m cbir.bench.mih`."""
