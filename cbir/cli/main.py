"""`cbir`: the command line. Argument parsing and printing only: each command builds the settings and options of
a use-case in `cbir.app` (or a study, a benchmark) and prints what it returns. The commands live in one module per
group: `data` (synth, pretrain, audit), `train`, `archive` (ingest, query, evaluate), `index` (index …, migrate),
`runs` (demo, serve, reproduce, study) and `bench`. Exit codes: `cbir.cli.common`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cbir.app.settings import Settings, read_api_key_file
from cbir.cli import archive, bench, data, index, runs, train
from cbir.cli.common import guarded
from cbir.cli.index import index_app
from cbir.errors import CbirError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown", help="Content-based image retrieval for chest X-rays.")


@app.callback()
@guarded
def _settings(
        ctx: typer.Context,
        api_key: Annotated[str | None, typer.Option(
            "--api-key", hidden=True, help="refused: a key on the command line shows in ps and shell history")
        ] = None,
        api_key_file: Annotated[Path | None, typer.Option(
            "--api-key-file", envvar="CBIR_QDRANT_API_KEY_FILE", show_envvar=True,
            help="Qdrant server: a file holding the API key or a team's JWT (else $CBIR_QDRANT_API_KEY; a "
                 "read-only token can query but not ingest)")] = None,
        timeout: Annotated[int | None, typer.Option(
            "--timeout", envvar="CBIR_QDRANT_TIMEOUT", show_envvar=True, min=1, show_default=False,
            help="Qdrant server: seconds per request [default: qdrant-client's]")] = None,
        ca_cert: Annotated[str | None, typer.Option(
            "--ca-cert", envvar="CBIR_QDRANT_CA_CERT", show_envvar=True,
            help="Qdrant server over https://: CA bundle of a private certificate authority")] = None) -> None:
    """Content-based image retrieval for chest X-rays."""
    if api_key is not None:
        raise CbirError("--api-key puts the key on the command line, where ps and shell history show it: set "
                        "$CBIR_QDRANT_API_KEY, or give a file with --api-key-file (or $CBIR_QDRANT_API_KEY_FILE)")
    key = read_api_key_file(api_key_file) if api_key_file is not None else None
    ctx.obj = Settings.from_env().with_options(api_key=key, timeout=timeout, ca_cert=ca_cert)


for module in (data, train, archive, runs, bench):
    module.register(app)
index.register(app)
app.add_typer(index_app, name="index")


def main() -> None:
    # Idle OpenMP threads sleep instead of spinning, so DataLoader workers that decode images get the cores
    # (measured on 2 cores: ingest 69 % of the bare forward pass's throughput instead of 63 %;
    # docs/performance.md). OpenMP reads only its environment, before torch loads: the one variable cbir sets.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
