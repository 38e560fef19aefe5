"""Index migrations, applied in order by `cbir migrate` (see `cbir.index.migrate`)."""
