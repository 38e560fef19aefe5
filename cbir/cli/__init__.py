"""The `cbir` command line: a thin Typer app over the `cbir` library."""
