"""What every command module shares: the consoles, the one-line error guard, the option types and the settings.

Exit codes: 0 success; 1 finished, but some input files failed (listed above the summary); 2 a user error (bad
argument, file, dataset, index or model), printed as one line; 3 an internal error; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import traceback
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console

from cbir.app.settings import DEFAULT_COLLECTION, Settings
from cbir.errors import CbirError, printable

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

IndexOpt = Annotated[str | None, typer.Option(
    "--index", envvar="CBIR_INDEX", show_envvar=True, show_default=False,
    help="the index: a folder (Qdrant Edge), http(s)://host:6333 (a server), local:PATH or :memory: "
    "[default: ./cbir-index]")]
CollectionOpt = Annotated[str | None, typer.Option(
    "--collection", envvar="CBIR_COLLECTION", show_envvar=True, show_default=False,
    help=f"the collection (what `cbir index info` lists) [default: {DEFAULT_COLLECTION}]")]
TeamOpt = Annotated[str | None, typer.Option(
    "--team", envvar="CBIR_TEAM", show_envvar=True, help="your team: uses the team's own collection, TEAM.COLLECTION")]
LayoutOpt = Annotated[str, typer.Option(
    "--layout", help="rsna, nih, folder (one folder per class), plain (every image, labels unknown) or auto "
    "(never plain)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (a GPU when there is one), cpu, cuda or cuda:N")]
KOpt = Annotated[int, typer.Option("--k", min=1, max=1000, help="how many nearest cases")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON on stdout instead of the table")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="processes that decode images (0: none)")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="images per forward pass")]
MaxPixelsOpt = Annotated[int | None, typer.Option(
    "--max-pixels", min=4, envvar="CBIR_MAX_PIXELS", show_envvar=True, show_default=False,
    help="refuse images with more pixels than this [default: 80,000,000]")]
AnyModalityOpt = Annotated[bool, typer.Option(
    "--any-modality", envvar="CBIR_ANY_MODALITY", show_envvar=True,
    help="experts: also embed DICOMs that are not chest radiographs (MR, CT, US, a hand, …; default: CR, DX, "
    "OT/SC of the chest)")]
RegexOpt = Annotated[str | None, typer.Option(
    "--patient-regex", help="folder layout: regex (on the file name) whose first group is the patient; plain "
    "layout: on the path below the root")]
SeedOpt = Annotated[int | None, typer.Option(
    "--seed", show_default=False, help="split seed [default: the model's split]")]
ValFractionOpt = Annotated[float | None, typer.Option(
    "--val-fraction", min=0.0, max=0.95, show_default=False,
    help="share of patients in validation [default: the model's split; train: 0.1]")]
TestFractionOpt = Annotated[float | None, typer.Option(
    "--test-fraction", min=0.0, max=0.95, show_default=False,
    help="share of patients held out as test; 0 trains on all but validation [default: the model's split; "
    "train: 0.2]")]
FoldsOpt = Annotated[int | None, typer.Option(
    "--folds", min=0, help="k-fold split by patient: k folds, --fold i is the test split (0: hold-out)")]
FoldOpt = Annotated[int | None, typer.Option("--fold", min=0, help="with --folds: the test fold, 1..k")]
LocalPathsOpt = Annotated[bool, typer.Option(
    "--local-paths", help="show the file names this machine ingested (from its local file map) and the query's; "
    "they may identify patients")]
OtherSplitOpt = Annotated[bool, typer.Option(
    "--other-split", help="experts: allow a split that differs from the one the model was trained with")]
DatasetIdOpt = Annotated[str | None, typer.Option(
    "--dataset-id", show_default=False, help="name the dataset in the index by this id (1-48 letters, digits, "
    "'.', '_', '-') [default: a keyed hash of its files' names and sizes, or the id the collection records for "
    "this folder]")]
LabelMapOpt = Annotated[list[str] | None, typer.Option(
    "--label-map", help="FROM=TO: call the data's label FROM by the collection's name TO (repeatable), e.g. "
    "COVID='No Pneumonia'; labels the collection does not know are refused otherwise")]


def guarded(func: F) -> F:
    """Turn user errors into one line and exit code 2, and anything else into exit code 3."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CbirError as exc:
            err.print(f"error: {printable(str(exc))}", markup=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence for users
            if os.environ.get("CBIR_DEBUG"):
                traceback.print_exc()
            detail = printable(str(exc).splitlines()[0]) if str(exc) else ""
            err.print(f"internal error: {type(exc).__name__}: {detail} (set CBIR_DEBUG=1 for the traceback)",
                      markup=False)
            raise typer.Exit(3) from None
    return cast(F, wrapper)  # functools.wraps keeps the signature typer reads


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """Import torch, timm, pydicom and the rest without garbage-collection passes over them: collection pauses
    while they load (their tens of thousands of new objects set off full passes), and what is loaded is then
    frozen (`gc.freeze`), so no later pass walks it, not even the last one at exit. Freezes once per process.
    Measured on `cbir query`: docs/performance.md."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()
        if enabled:
            gc.enable()


def make_reporter(quiet: bool = False) -> Any:
    from cbir.console import Reporter
    return Reporter(quiet=quiet, console=err)


def settings(ctx: typer.Context, index: str | None = None, max_pixels: int | None = None,
             any_modality: bool = False) -> Settings:
    """The settings the main callback read (`Settings.from_env` plus the server options), with this command's
    options on top."""
    base = ctx.find_root().obj
    if not isinstance(base, Settings):   # a command invoked without the callback (not through `cbir`)
        base = Settings.from_env()
    return base.with_options(index=index, max_pixels=max_pixels, any_modality=any_modality)


def split_options(seed: int | None, val_fraction: float | None, test_fraction: float | None,
                  folds: int | None, fold: int | None) -> dict[str, Any]:
    return {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction, "folds": folds,
            "fold": fold}
