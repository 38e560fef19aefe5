"""`cbir synth`, `cbir pretrain` and `cbir audit`: commands on datasets, before or beside an index."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cbir.cli.common import (
    AnyModalityOpt,
    FoldOpt,
    FoldsOpt,
    IndexOpt,
    LayoutOpt,
    LocalPathsOpt,
    MaxPixelsOpt,
    RegexOpt,
    SeedOpt,
    TestFractionOpt,
    ValFractionOpt,
    WorkersOpt,
    guarded,
    heavy_imports,
    make_reporter,
    out,
    settings,
    split_options,
)
from cbir.cli.train import check_packaged
from cbir.errors import CbirError


def register(app: typer.Typer) -> None:
    for command in (synth, pretrain, audit):
        app.command()(guarded(command))


def synth(layout: LayoutOpt = "rsna",
          n: Annotated[int, typer.Option("--n", min=1, help="number of images")] = 200,
          size: Annotated[int, typer.Option("--size", min=16, max=2048, help="image side in pixels")] = 256,
          out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("synth"),
          seed: Annotated[int, typer.Option("--seed", help="random seed of the images and labels")] = 0,
          labels: Annotated[Path | None, typer.Option("--labels", help="drive it from a real label CSV")] = None,
          ) -> None:
    """Write a synthetic dataset in the real on-disk layout (rsna: DICOM + CSV; nih: PNG + CSV)."""
    from cbir.data.synth import synth_dataset
    if layout not in ("rsna", "nih"):
        raise CbirError(f"--layout must be rsna or nih for synth, not {layout!r}")
    if labels is not None and not labels.is_file():
        raise CbirError(f"{labels}: label CSV not found")
    reporter = make_reporter()
    with reporter.task(f"synth {layout}", n) as bar:
        summary = synth_dataset(layout, n, size, out_dir, seed=seed, labels_csv=labels, progress=bar.advance)
    out.print(f"wrote {summary.n_images} {layout} images ({size} px) to {out_dir}", markup=False)


def pretrain(data: Annotated[list[Path], typer.Option(
                 "--data", help="image folders (rsna, nih, folder layout or plain images); repeat, or list several "
                 "after one --data")],
             out_dir: Annotated[Path, typer.Option("--out", help="run folder for the backbone")],
             extra: Annotated[list[Path] | None, typer.Argument(help="more image folders", show_default=False)
                              ] = None,
             backbone: Annotated[str, typer.Option("--backbone", help="any timm model name")] = "resnet18",
             image_size: Annotated[int, typer.Option("--image-size", min=16, help="input size of the views")] = 64,
             method: Annotated[str, typer.Option(
                 "--method", help="vicreg or simclr (NT-Xent); vicreg won on validation patients")] = "vicreg",
             epochs: Annotated[int, typer.Option("--epochs", min=1, help="passes over the images")] = 10,
             minutes: Annotated[float | None, typer.Option(
                 "--minutes", help="stop after this many minutes of training (the schedule ends there)")] = None,
             batch_size: Annotated[int, typer.Option(
                 "--batch-size", min=2, help="images per step (pairs of views)")] = 128,
             lr: Annotated[float, typer.Option("--lr", help="learning rate")] = 1e-3,
             patient_p: Annotated[float, typer.Option(
                 "--patient-p", help="probability that the second view is another image of the same patient")
             ] = 0.5,
             intensity: Annotated[str, typer.Option("--intensity", help="standardize, equalize or clahe")
                                  ] = "standardize",
             device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
             workers: WorkersOpt = 2,
             seed: Annotated[int, typer.Option("--seed", help="seed of the views and the initialisation")] = 0,
             random_init: Annotated[bool, typer.Option(
                 "--random-init", help="start from random weights, not the packaged ImageNet weights that "
                 "tf_efficientnet_lite0/1/2 start from otherwise")] = False) -> None:
    """Learn a backbone from images without labels (SimCLR or VICReg; two images of one patient are positives
    where the layout names patients); `cbir train --init RUN` fine-tunes from it. A backbone with packaged
    ImageNet weights starts from them (ImageNet continued on your images). Unreadable files are named and
    skipped."""
    with heavy_imports():
        from cbir.train.pretrain import PretrainSettings
        from cbir.train.pretrain import pretrain as run_pretrain
    settings = PretrainSettings(backbone=backbone, image_size=image_size, intensity=intensity, method=method,
                                epochs=epochs, minutes=minutes, batch_size=batch_size, lr=lr, patient_p=patient_p,
                                seed=seed, workers=workers, device=device, random_init=random_init)
    settings.validate()
    if not random_init:
        check_packaged(backbone)
    roots = [*data, *(extra or [])]
    result = run_pretrain(roots, out_dir, settings, make_reporter())
    last = f", last epoch's loss {result.history[-1]['loss']:.4f}" if result.history else ""
    out.print(f"backbone {backbone} ({method}, {result.epochs:g} epochs, {result.n_images} images{last}) saved to "
              f"{out_dir} in {result.seconds:.0f} s; sha256 {result.sha256[:16]}", markup=False)
    if result.failures:
        out.print(f"{len(result.failures)} files skipped (named above)", markup=False)
        raise typer.Exit(1)


def audit(ctx: typer.Context,
          data: Annotated[Path, typer.Option("--data", help="the dataset to audit (the queries)")],
          layout: LayoutOpt = "auto",
          against: Annotated[Path | None, typer.Option(
              "--against", help="a second dataset: near-duplicates between the two (default: across the splits of "
              "--data)")] = None,
          against_layout: Annotated[str, typer.Option("--against-layout", help="layout of --against")] = "auto",
          collection: Annotated[str | None, typer.Option(
              "--collection", help="an ingested collection: near-duplicates between --data and its points")] = None,
          index: IndexOpt = None,
          model: Annotated[Path | None, typer.Option(
              "--model", help="with --collection: its model (default: the one it records)")] = None,
          threshold: Annotated[float | None, typer.Option(
              "--threshold", min=0.0, max=1.0, show_default=False, help="cosine of the tiny images from which two "
              "images are near-duplicates [default: 0.96, docs/results.md, \"Leakage audit\"]")] = None,
          seed: SeedOpt = None, val_fraction: ValFractionOpt = None, test_fraction: TestFractionOpt = None,
          folds: FoldsOpt = None, fold: FoldOpt = None, patient_regex: RegexOpt = None,
          csv_out: Annotated[Path, typer.Option(
              "--csv", help="write the pairs here (keyed pseudonyms only)")] = Path("cbir-audit.csv"),
          pixel: Annotated[bool, typer.Option(
              "--pixel-check", help="also compare each pair's pixels at 256 px (linear-fit residual)")] = False,
          show: Annotated[int, typer.Option("--show", min=0, help="print at most this many pairs")] = 20,
          workers: WorkersOpt = 2,
          as_json: Annotated[bool, typer.Option("--json", help="print JSON on stdout instead of the list")] = False,
          local_paths: LocalPathsOpt = False, max_pixels: MaxPixelsOpt = None,
          any_modality: AnyModalityOpt = False) -> None:
    """Leakage audit: near-duplicate images (by their tiny images, no model needed) across the splits of --data,
    between --data and --against, or between --data and a --collection. Writes the pairs as CSV (pseudonyms)."""
    with heavy_imports():
        from cbir.app.audit import write_csv
        from cbir.app.folders import AuditOptions, DatasetOptions, audit
    log = make_reporter(quiet=as_json)
    result = audit(data, DatasetOptions(layout, split_options(seed, val_fraction, test_fraction, folds, fold),
                                        patient_regex=patient_regex), against, against_layout, collection, model,
                   AuditOptions(threshold, pixel, workers), settings(ctx, index, max_pixels, any_modality), log)
    write_csv(result, csv_out)
    for failure in result.failures:
        log.warn(failure)
    if as_json:
        sys.stdout.write(json.dumps(result.summary(csv_out), indent=2) + "\n")
    else:
        _print_audit(result, csv_out, show, local_paths)
    if result.failures:
        raise typer.Exit(1)


def _print_audit(result: Any, csv_out: Path, show: int, local_paths: bool) -> None:
    where = {"splits": f"in two splits of {result.a.name}", "datasets": f"between {result.a.name} and {result.b.name}",
             "collection": f"between {result.a.name} and collection {result.b.name!r}"}[result.mode]
    out.print(f"{len(result.pairs)} near-duplicate pairs {where} (cosine ≥ {result.threshold:g})", markup=False)
    for n, row in enumerate(result.rows()[:show]):
        i, j = result.pairs.i[n], result.pairs.j[n]
        a = (result.a.paths[i] if local_paths else None) or row["a_file"]
        b = (result.b.paths[j] if local_paths else None) or row["b_file"]
        pixels = (f"  pixels {'identical' if row['pixel_identical'] else 'differ'} "
                  f"({row['pixel_residual']:.1f}/255)" if result.pixels is not None else "")
        out.print(f"  {row['similarity']:.4f}  {a} ({row['a_split']})  ~  {b} ({row['b_split']}){pixels}",
                  markup=False)
    if len(result.pairs) > show:
        out.print(f"  … and {len(result.pairs) - show} more in the CSV", markup=False)
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result.counts.items())
    out.print(f"{counts}; {result.seconds:.1f} s", markup=False)
    out.print(f"vectors: {result.method}", markup=False)
    for note in result.notes:
        out.print(f"note: {note}", markup=False)
    out.print(f"pairs: {csv_out} (keyed pseudonyms only{'' if local_paths else '; --local-paths prints file names'})",
              markup=False)
