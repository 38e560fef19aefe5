"""Index migrations, applied in order by `cbir migrate` (see `cbir.index.migrate`)."""

#: The package name that `cbir.index.migrate.discover` scans for `NNNN_name` modules.
PACKAGE = __name__
