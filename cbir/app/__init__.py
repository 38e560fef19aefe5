"""Use-cases: the workflows (ingest, calibrate, query, evaluate) composed from io, data, models, embed and store,
each with its invariants, so the CLI, `reproduce`, the studies, `demo`, `serve` and a Python caller behave alike."""
