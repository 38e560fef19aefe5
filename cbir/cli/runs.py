"""`cbir demo`, `cbir serve`, `cbir reproduce` and `cbir study`: whole runs over the use-cases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cbir.cli.common import (
    AnyModalityOpt,
    CollectionOpt,
    DeviceOpt,
    IndexOpt,
    KOpt,
    LayoutOpt,
    LocalPathsOpt,
    MaxPixelsOpt,
    RegexOpt,
    TeamOpt,
    guarded,
    heavy_imports,
    make_reporter,
    out,
    settings,
)
from cbir.errors import CbirError


def register(app: typer.Typer) -> None:
    for command in (demo, serve, reproduce, study, compare):
        app.command()(guarded(command))


def demo(ctx: typer.Context, out_dir: Annotated[Path, typer.Option("--out", help="demo folder")] = Path("cbir-demo"),
         n: Annotated[int, typer.Option("--n", min=40, help="synthetic images")] = 400,
         size: Annotated[int, typer.Option("--size", min=32, help="their side, and the model's input size")] = 64,
         epochs: Annotated[int, typer.Option("--epochs", min=1, help="training epochs")] = 8,
         backbone: Annotated[str, typer.Option(
             "--backbone", help="any timm model name (from random weights)")] = "resnet10t",
         index: IndexOpt = None) -> None:
    """Synth → train → ingest → query → montage → evaluate, in a few minutes on a CPU."""
    from cbir.demo import run_demo
    result = run_demo(out_dir, n=n, size=size, epochs=epochs, backbone=backbone, index=index,
                      reporter=make_reporter(), settings=settings(ctx))
    out.print("")
    for line in result.lines():
        out.print(line, markup=False)


def serve(ctx: typer.Context, index: IndexOpt = None, collection: CollectionOpt = None, team: TeamOpt = None,
          model: Annotated[Path | None, typer.Option(
              "--model", show_default=False, help="run folder [default: the collection's model]")] = None,
          host: Annotated[str, typer.Option("--host", help="the address to listen on")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", min=1, max=65535, help="the port to listen on")] = 8000,
          device: DeviceOpt = "auto",
          max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", min=1, help="largest upload")] = 64,
          max_pixels: MaxPixelsOpt = None, any_modality: AnyModalityOpt = False,
          local_paths: LocalPathsOpt = False,
          token_file: Annotated[Path | None, typer.Option(
              "--token-file", help="a file holding the bearer token every request must carry (else "
              "$CBIR_SERVE_TOKEN; required unless --host is a loopback address)")] = None,
          allow_hosts: Annotated[list[str] | None, typer.Option(
              "--allow-host", show_default=False, help="a host name the server answers to (the Host header), "
              "repeatable [default: this machine's names on loopback, the bound address otherwise]")] = None
          ) -> None:
    """Keep the model and the collection warm and answer queries over HTTP (POST /query, GET /health,
    API docs at /docs). Cases show as their image files where this machine has them, else as the thumbnails
    stored with them (cbir ingest --thumbnails). On any address but loopback it needs a token (never given on
    the command line, where `ps` shows it)."""
    from cbir.extras import require
    require("serve", "cbir serve")
    with heavy_imports():
        import uvicorn

        from cbir.app.serving import open_searcher
        from cbir.serve import create_app
        from cbir.serve.access import access_for, serve_token
    access = access_for(host, serve_token(token_file), allow_hosts or [])
    with open_searcher(settings(ctx, index, max_pixels, any_modality), collection, team, model, device,
                       local_paths) as searcher:
        out.print(f"serving {searcher.collection!r} ({len(searcher.memory):,} points, model "
                  f"{searcher.loaded.fingerprint}) on http://{host}:{port} (API docs: /docs)"
                  + ("; with a token: open /?token=… once in the browser, or send Authorization: Bearer …"
                     if access.token else ""), markup=False)
        uvicorn.run(create_app(searcher, max_upload_mb * 2**20, access=access), host=host, port=port,
                    log_level="warning")


def reproduce(data: Annotated[Path, typer.Option("--data", help="RSNA (or folder) dataset")],
              out_dir: Annotated[Path, typer.Option("--out", help="results folder")],
              layout: LayoutOpt = "auto",
              nih: Annotated[Path | None, typer.Option("--nih", help="NIH dataset for the multilabel row")] = None,
              backbone: Annotated[str | None, typer.Option(
                  "--backbone", help="[default: cbir train's; the detector: resnet18]")] = None,
              image_size: Annotated[int | None, typer.Option(
                  "--image-size", min=16, help="[default: cbir train's; the detector: 128]")] = None,
              nih_image_size: Annotated[int | None, typer.Option(
                  "--nih-image-size", min=16, help="image size of the multilabel model (default --image-size)")
              ] = None,
              epochs: Annotated[int | None, typer.Option(
                  "--epochs", min=1, help="per model [default: cbir train's; the detector: 10]")] = None,
              folds: Annotated[int, typer.Option(
                  "--folds", min=0, help="k-fold cross-validation by patient (0: one hold-out split)")] = 5,
              val_fraction: Annotated[float, typer.Option(
                  "--val-fraction", min=0.0, max=0.5,
                  help="share of all patients in validation, inside the training folds")] = 0.1,
              seed: Annotated[int, typer.Option("--seed", help="split and initialisation seed")] = 0,
              bits: Annotated[int, typer.Option("--bits", min=16, max=256, help="code bits of every approach")] = 64,
              k: KOpt = 10,
              tasks: Annotated[list[str] | None, typer.Option("--task", help="only these approaches")] = None,
              device: DeviceOpt = "auto",
              patient_regex: RegexOpt = None,
              reuse: Annotated[bool, typer.Option(
                  "--reuse", help="keep models already trained in --out with these settings")] = False,
              doc: Annotated[Path | None, typer.Option(
                  "--doc", help="also write the table into this Markdown file (its own section)")] = None,
              readme: Annotated[Path | None, typer.Option(
                  "--readme", help="also write the binary row's headline into this file's headline section")
              ] = None) -> None:
    """Redo the seed's table (the results table of the thesis this project started from: the four approaches on
    the RSNA challenge; docs/results.md) by k-fold cross-validation by patient: train the approaches, ingest and
    evaluate each per fold, and write results.md/results.json (mean ± sd over folds and pooled 95 % intervals)."""
    from cbir.reproduce import ReproduceOptions, run_reproduce
    if folds == 1:
        raise CbirError("--folds must be 0 (one hold-out split) or at least 2")
    options = ReproduceOptions(data=data, out=out_dir, layout=layout, nih=nih, backbone=backbone,
                               image_size=image_size, nih_image_size=nih_image_size, epochs=epochs, device=device,
                               bits=bits, k=k, tasks=tasks, patient_regex=patient_regex, reuse=reuse, folds=folds,
                               val_fraction=val_fraction, seed=seed, doc=doc, readme=readme)
    results = run_reproduce(options, reporter=make_reporter())
    out.print((out_dir / "results.md").read_text(), markup=False)
    out.print(f"results: {out_dir / 'results.md'} ({len(results['tasks'])} approaches, "
              f"{len({r['fold'] for r in results['folds']})} folds, {results['seconds'] / 60:.1f} min)", markup=False)


def study(name: Annotated[str, typer.Argument(
              help="selection, hash-weights, detector, pooling, shift, appearance, ssl-method or "
              "label-efficiency")],
          out_dir: Annotated[Path, typer.Option("--out", help="study folder")],
          data: Annotated[Path | None, typer.Option("--data", help="dataset folder")] = None,
          other: Annotated[Path | None, typer.Option("--other", help="shift: the second dataset (Kermany)")] = None,
          models: Annotated[Path | None, typer.Option(
              "--models", help="appearance: take each fold's binary model from this `cbir reproduce` models folder "
              "(its split must be the study's)")] = None,
          init: Annotated[list[Path] | None, typer.Option(
              "--init", help="ssl-method: the `cbir pretrain` runs to compare (repeatable); label-efficiency and "
              "shift's pretrain recipe: the pretrained run")] = None,
          layout: LayoutOpt = "auto",
          folds: Annotated[int, typer.Option("--folds", min=2, help="cross-validation folds by patient")] = 5,
          use_folds: Annotated[list[int] | None, typer.Option("--use-fold", help="only these folds (repeatable)")
                               ] = None,
          val_fraction: Annotated[float, typer.Option(
              "--val-fraction", min=0.05, max=0.5, help="share of each training fold used for validation")] = 0.2,
          seed: Annotated[int, typer.Option("--seed", help="split and initialisation seed")] = 0,
          backbone: Annotated[str, typer.Option("--backbone", help="any timm model name")] = "resnet18",
          image_size: Annotated[int, typer.Option("--image-size", min=16, help="model input size")] = 128,
          epochs: Annotated[int, typer.Option("--epochs", min=1, help="training epochs per model")] = 15,
          batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="images per training step")] = 32,
          device: DeviceOpt = "auto",
          recipes: Annotated[str | None, typer.Option(
              "--recipes", help="shift: only these recipes, comma-separated (the others' rows of an earlier "
              "shift.json in --out are kept)")] = None,
          doc: Annotated[Path | None, typer.Option("--doc", help="also write the study's section of this "
                                                   "Markdown file (e.g. docs/results.md)")] = None,
          render: Annotated[bool, typer.Option(
              "--render", help="only rebuild NAME.md (and --doc's section) from --out's NAME.json")] = False) -> None:
    """Measure a default on validation folds only (test patients are never loaded); writes NAME.md/NAME.json."""
    from cbir.studies import STUDIES, StudyOptions
    from cbir.studies.common import rerender
    if name not in STUDIES:
        raise CbirError(f"unknown study {name!r} (choose from {', '.join(sorted(STUDIES))})")
    if render:
        out.print(rerender(name, StudyOptions(data=data or Path("."), out=out_dir, doc=doc))["markdown"],
                  markup=False)
        return
    if data is None:
        raise CbirError("--data is required (the dataset to study)")
    if name == "shift" and other is None:
        raise CbirError("study shift needs --other, the second dataset (e.g. a Kermany train folder)")
    chosen = [r.strip() for r in (recipes or "").split(",") if r.strip()]
    if chosen:
        if name != "shift":
            raise CbirError("--recipes is for study shift only")
        from cbir.studies.shift import selected_recipes
        selected_recipes(chosen, list(init or []))  # an unknown name fails before any data is read
    bad = [f for f in use_folds or [] if not 1 <= f <= folds]
    if bad:
        raise CbirError(f"--use-fold {bad[0]}: folds are 1..{folds}")
    options = StudyOptions(data=data, out=out_dir, layout=layout, folds=folds, use_folds=list(use_folds or []),
                           val_fraction=val_fraction, seed=seed, backbone=backbone, image_size=image_size,
                           epochs=epochs, batch_size=batch_size, device=device, doc=doc, other=other,
                           models=models, recipes=chosen, init=list(init or []))
    result = STUDIES[name](options, make_reporter())
    out.print(result["markdown"], markup=False)


def compare(run_a: Annotated[Path, typer.Argument(help="run A: a cbir reproduce, cbir study or cbir evaluate folder")],
            run_b: Annotated[Path, typer.Argument(help="run B, on the same queries (e.g. the old recipe)")],
            name_a: Annotated[str | None, typer.Option("--name-a", help="what A is, in the table [default: "
                                                       "its folder]")] = None,
            name_b: Annotated[str | None, typer.Option("--name-b", help="what B is [default: its folder]")] = None,
            doc: Annotated[Path | None, typer.Option("--doc", help="also write the table into this Markdown file, "
                                                     "as section compare-SECTION")] = None,
            section: Annotated[str | None, typer.Option(
                "--section", help="the section's name [default: A's and B's names]")
                               ] = None,
            json_out: Annotated[Path | None, typer.Option("--json", help="also write the figures here")] = None
            ) -> None:
    """Is A better than B? Each evaluation both runs hold, paired query by query: every measure of A and B and
    A − B with a 95 % patient-bootstrap interval that draws the patients once for both; A is better or worse only
    where it excludes 0. The folds of a cbir reproduce run pool into one row."""
    import json
    import shlex

    from cbir.app.compare import compare_runs
    from cbir.report.doc import slug, update_section
    from cbir.report.paired import render_comparison
    first, second = name_a or run_a.name, name_b or run_b.name
    for target in (json_out, doc):   # before any work: a file that cannot be written is a user error
        if target is not None and not target.parent.is_dir():
            raise CbirError(f"{target}: its folder does not exist")
    result = compare_runs(run_a, run_b)
    command = f"cbir compare {result['a']} {result['b']} --name-a {shlex.quote(first)} --name-b {shlex.quote(second)}"
    markdown = render_comparison(result, first, second, command)
    out.print(markdown, markup=False)
    if json_out is not None:
        json_out.write_text(json.dumps(result | {"name_a": first, "name_b": second}, indent=2) + "\n")
    if doc is not None:
        update_section(doc, "compare-" + slug(section or f"{first}-vs-{second}"), markdown)
