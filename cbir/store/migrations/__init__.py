"""Index migrations, applied in order by `cbir migrate` (see `cbir.store.migrate`)."""

#: The package name that `cbir.store.migrate.discover` scans for `NNNN_name` modules.
PACKAGE = __name__
