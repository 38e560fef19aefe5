"""`cbir`: synth, train, ingest, query, evaluate, index info and demo.

Exit codes: 0 success; 1 finished, but some input files failed (listed above the summary);
2 a user error (bad argument, file, dataset, index or model), printed as one line; 3 an internal error.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.table import Table

from cbir.errors import CbirError, printable

# Idle OpenMP threads sleep instead of spinning, so DataLoader workers that decode images get the cores
# (measured on 2 cores: ingest 69 % of the bare forward pass's throughput instead of 63 %; docs/performance.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Content-based image retrieval for chest X-rays.")
index_app = typer.Typer(no_args_is_help=True, help="Inspect the index.")
app.add_typer(index_app, name="index")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_COLLECTION = os.environ.get("CBIR_COLLECTION", "cbir")
IndexOpt = Annotated[str | None, typer.Option("--index", help="Index location: a directory (Qdrant Edge), "
                                              "http(s)://host:6333, local:PATH or :memory: [$CBIR_INDEX]")]
CollectionOpt = Annotated[str, typer.Option("--collection", help="Collection name [$CBIR_COLLECTION]")]
TeamOpt = Annotated[str | None, typer.Option("--team", envvar="CBIR_TEAM", show_envvar=True,
                                             help="your team: uses the team's own collection, TEAM.COLLECTION")]
LayoutOpt = Annotated[str, typer.Option("--layout", help="rsna, nih, folder, plain (every image, labels unknown) "
                                        "or auto (never plain)")]
MaxPixelsOpt = Annotated[int | None, typer.Option(
    "--max-pixels", min=4, envvar="CBIR_MAX_PIXELS", show_envvar=True,
    help="refuse images with more pixels than this (default 80,000,000)")]
AnyModalityOpt = Annotated[bool, typer.Option(
    "--any-modality", envvar="CBIR_ANY_MODALITY", show_envvar=True,
    help="experts: also embed DICOMs that are not radiographs (MR, CT, US, …; default: CR, DX, OT/SC only)")]
RegexOpt = Annotated[str | None, typer.Option(
    "--patient-regex", help="folder layout: regex (on the file name) whose first group is the patient; plain "
    "layout: on the path below the root")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="split seed (default: the model's split; train: 0)")]
ValFractionOpt = Annotated[float | None, typer.Option(
    "--val-fraction", min=0.0, max=0.95, help="share of patients in validation (train default 0.1)")]
TestFractionOpt = Annotated[float | None, typer.Option(
    "--test-fraction", min=0.0, max=0.95,
    help="share of patients held out as test (train default 0.2; 0 trains on all but validation)")]
FoldsOpt = Annotated[int | None, typer.Option(
    "--folds", min=0, help="k-fold split by patient: k folds, --fold i is the test split (0: hold-out)")]
FoldOpt = Annotated[int | None, typer.Option("--fold", min=0, help="with --folds: the test fold, 1..k")]
LocalPathsOpt = Annotated[bool, typer.Option(
    "--local-paths", help="show the file names this machine ingested (from its local file map) and the query's; "
    "they may identify patients")]
OtherSplitOpt = Annotated[bool, typer.Option(
    "--other-split", help="experts: allow a split that differs from the one the model was trained with")]
DatasetIdOpt = Annotated[str | None, typer.Option(
    "--dataset-id", help="name the dataset in the index by this id (1-48 letters, digits, '.', '_', '-'; default: "
    "a keyed hash of its files' names and sizes, or the id the collection records for this folder)")]


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
def _heavy_imports() -> Iterator[None]:
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


def _reporter(quiet: bool = False) -> Any:
    from cbir.console import Reporter
    return Reporter(quiet=quiet, console=err)


_SERVER: dict[str, Any] = {}


@app.callback()
@guarded
def _server_options(
        api_key: Annotated[str | None, typer.Option(
            "--api-key", hidden=True, help="refused: a key on the command line shows in ps and shell history")
        ] = None,
        api_key_file: Annotated[Path | None, typer.Option(
            "--api-key-file", envvar="CBIR_QDRANT_API_KEY_FILE", show_envvar=True,
            help="Qdrant server: a file holding the API key or a team's JWT (else $CBIR_QDRANT_API_KEY; a "
                 "read-only token can query but not ingest)")] = None,
        timeout: Annotated[int | None, typer.Option(
            "--timeout", envvar="CBIR_QDRANT_TIMEOUT", show_envvar=True, min=1,
            help="Qdrant server: seconds per request (qdrant-client's default when unset)")] = None,
        ca_cert: Annotated[str | None, typer.Option(
            "--ca-cert", envvar="CBIR_QDRANT_CA_CERT", show_envvar=True,
            help="Qdrant server over https://: CA bundle of a private certificate authority")] = None) -> None:
    """Content-based image retrieval for chest X-rays."""
    if api_key is not None:
        raise CbirError("--api-key puts the key on the command line, where ps and shell history show it: set "
              "$CBIR_QDRANT_API_KEY, or give a file with --api-key-file (or $CBIR_QDRANT_API_KEY_FILE)")
    _SERVER.update(api_key=_api_key(api_key_file), timeout=timeout, ca_cert=ca_cert)


def _api_key(path: Path | None) -> str | None:
    """The Qdrant API key or JWT: from the file `path`, else $CBIR_QDRANT_API_KEY; never from argv."""
    if path is None:
        return os.environ.get("CBIR_QDRANT_API_KEY") or None
    try:
        return path.read_text().strip() or None
    except OSError as exc:
        raise CbirError(f"{path}: cannot read the API key file ({exc.strerror})") from None


def _open(location: str | None, writable: bool = False, create: bool = False) -> Any:
    from cbir.index import open_index
    return open_index(location, writable=writable, create=create, **_SERVER)


def _set_reader_limits(limit: int | None, any_modality: bool = False) -> None:
    """The pixel limit and the modality override reach the readers (and their worker processes) through
    $CBIR_MAX_PIXELS and $CBIR_ANY_MODALITY."""
    if limit is not None:
        os.environ["CBIR_MAX_PIXELS"] = str(limit)
    if any_modality:
        os.environ["CBIR_ANY_MODALITY"] = "1"


def _split_options(seed: int | None, val_fraction: float | None, test_fraction: float | None,
                   folds: int | None, fold: int | None) -> dict[str, Any]:
    return {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction, "folds": folds,
            "fold": fold}


def _load_model(model: Path | None, index: Any, collection: str, device: str) -> Any:
    """The model given with --model, else the one the collection's record names: only on an embedded index (its
    record was written on this machine) or from a folder under $CBIR_MODEL_DIRS. A record on a shared server is
    written by whoever may write there, and a checkpoint can carry code (TorchScript or torch.export encoders),
    so its path is never loaded without the user's say-so."""
    from cbir.models import load_checkpoint
    from cbir.models.device import resolve_device
    if model is None:
        record = index.record(collection)
        path = record.model_path
        if not path:
            raise CbirError(f"collection {collection!r} records no model path (imported from a snapshot, which "
                            f"carries none); pass --model with the model of fingerprint {record.model_fingerprint}")
        if getattr(index, "is_server", False) and not _allowed_model_dir(Path(path)):
            raise CbirError(f"collection {collection!r} is on a shared server, and its record names model folder "
                            f"{path}: pass --model to load it (or list its parent folder in $CBIR_MODEL_DIRS)")
        model = Path(path)
    return load_checkpoint(model, resolve_device(device))


def _allowed_model_dir(path: Path) -> bool:
    """Whether `path` lies under a folder of $CBIR_MODEL_DIRS (os.pathsep-separated)."""
    allowed = [Path(p).expanduser().resolve() for p in os.environ.get("CBIR_MODEL_DIRS", "").split(os.pathsep) if p]
    target = path.expanduser().resolve()
    return any(target.is_relative_to(folder) for folder in allowed)


@app.command()
@guarded
def synth(layout: LayoutOpt = "rsna",
          n: Annotated[int, typer.Option("--n", min=1, help="number of images")] = 200,
          size: Annotated[int, typer.Option("--size", min=16, max=2048, help="image side in pixels")] = 256,
          out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("synth"),
          seed: Annotated[int, typer.Option("--seed")] = 0,
          labels: Annotated[Path | None, typer.Option("--labels", help="drive it from a real label CSV")] = None,
          ) -> None:
    """Write a synthetic dataset in the real on-disk layout (rsna: DICOM + CSV; nih: PNG + CSV)."""
    from cbir.data.synth import synth_dataset
    if layout not in ("rsna", "nih"):
        raise CbirError(f"--layout must be rsna or nih for synth, not {layout!r}")
    if labels is not None and not labels.is_file():
        raise CbirError(f"{labels}: label CSV not found")
    reporter = _reporter()
    with reporter.task(f"synth {layout}", n) as bar:
        summary = synth_dataset(layout, n, size, out_dir, seed=seed, labels_csv=labels, progress=bar.advance)
    out.print(f"wrote {summary.n_images} {layout} images ({size} px) to {out_dir}", markup=False)


@app.command()
@guarded
def train(data: Annotated[Path, typer.Option("--data", help="dataset folder")],
          out_dir: Annotated[Path, typer.Option("--out", help="run folder for the checkpoint")],
          layout: LayoutOpt = "auto",
          task: Annotated[str, typer.Option("--task", help="binary, hash (trained K-bit codes), multilabel "
                                            "(one output per label; RSNA has only Pneumonia) or detection "
                                            "(FCOS on the RSNA boxes)")] = "binary",
          backbone: Annotated[str | None, typer.Option(
              "--backbone", help="any timm model name [default: tf_efficientnet_lite0, from packaged ImageNet "
              "weights]")] = None,
          encoder: Annotated[Path | None, typer.Option(
              "--encoder", help="a frozen encoder file instead of a trained backbone: TorchScript, torch.export "
              "(.pt2), ONNX (.onnx, the 'onnx' extra), timm weights with --encoder-arch, or a `cbir pretrain` run "
              "folder; only the head trains")
          ] = None,
          encoder_arch: Annotated[str | None, typer.Option(
              "--encoder-arch", help="the timm model that --encoder's weights (safetensors/.pth) belong to")] = None,
          encoder_input: Annotated[str | None, typer.Option(
              "--encoder-input", help="the encoder's input: CHANNELSxSIZE, e.g. 3x224 (else FILE.json, the ONNX "
              "shape or timm's config)")] = None,
          encoder_norm: Annotated[str | None, typer.Option(
              "--encoder-norm", help="its normalisation of [0, 1] pixels: unit, symmetric ([-1, 1]), imagenet, xrv "
              "([-1024, 1024]), standardize (per image, as cbir's own backbones) or MEAN/STD")] = None,
          encoder_output: Annotated[str | None, typer.Option(
              "--encoder-output", help="how its output becomes a vector: auto ((B, F), or a map averaged), cls or "
              "mean (tokens)")] = None,
          retrieval: Annotated[str, typer.Option(
              "--retrieval", help="what neighbours are found by: head (the trained projection) or encoder (the "
              "frozen --encoder's own features; only the classifier and codes learn)")] = "head",
          image_size: Annotated[int | None, typer.Option(
              "--image-size", min=16, help="model input size (224 fits the default's 20 min for 1,000 images on "
              "2 CPU cores; 384 or more on a GPU; an encoder's is its contract's) [default: 224]")] = None,
          epochs: Annotated[int | None, typer.Option(
              "--epochs", min=0, help="0: no training, the frozen (pretrained or untrained) network, a baseline "
              "[default: 6]")] = None,
          batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 32,
          lr: Annotated[float, typer.Option("--lr", help="the heads' learning rate (backbone: see --layer-decay)")
                        ] = 1e-3,
          unfreeze: Annotated[str | None, typer.Option(
              "--unfreeze", help="how many of the backbone's last groups (timm's stem, stages, head convolutions) "
              "train: a number, 0 (a frozen backbone, only the heads train) or all [default: 3]; a backbone from "
              "random weights trains all")] = None,
          layer_decay: Annotated[float | None, typer.Option(
              "--layer-decay", min=0.01, max=1.0, help="each backbone group towards the stem learns this factor "
              "slower [default: 0.7]")] = None,
          freeze_bn: Annotated[bool | None, typer.Option(
              "--freeze-bn/--train-bn", help="keep the backbone's BatchNorm statistics pretrained [default: "
              "freeze]")] = None,
          random_init: Annotated[bool, typer.Option(
              "--random-init", help="start from random weights (the default starts from packaged ImageNet "
              "weights where they fit the backbone)")] = False,
          appearance_size: Annotated[int | None, typer.Option(
              "--appearance-size", min=0, help="the embedding's appearance part: a SIZE×SIZE tiny image of the "
              "input (0: none)")] = None,
          appearance_weight: Annotated[float | None, typer.Option(
              "--appearance-weight", min=0.0, max=0.99, help="its weight in the cosine (0: none)")] = None,
          appearance_window: Annotated[float | None, typer.Option(
              "--appearance-window", min=0.0, help="σ of its centre weighting, in half-widths (0: flat)")] = None,
          embed_dim: Annotated[int, typer.Option(
              "--embed-dim", min=2, help="embedding size (detection: fixed by the FPN, levels × channels)")] = 128,
          bits: Annotated[int, typer.Option("--bits", min=8, max=1024,
                                            help="code bits (task hash: 16..256)")] = 64,
          weights: Annotated[Path | None, typer.Option(
              "--weights", help="local backbone weights file (timm's layout)")] = None,
          pretrained: Annotated[bool, typer.Option(
              "--pretrained", help="download timm's weights (online only; offline, the packaged ImageNet weights "
              "are the default, or use --weights FILE)")] = False,
          init: Annotated[Path | None, typer.Option(
              "--init", help="start the backbone from a `cbir pretrain` run folder")] = None,
          device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
          workers: Annotated[int, typer.Option("--workers", min=0)] = 2,
          seed: Annotated[int, typer.Option("--seed", help="split (and initialisation) seed")] = 0,
          val_fraction: ValFractionOpt = None, test_fraction: TestFractionOpt = None,
          folds: FoldsOpt = None, fold: FoldOpt = None,
          select: Annotated[str | None, typer.Option(
              "--select", help="which epoch to keep: last (of the fixed schedule) or best (validation AUC)")
          ] = None,
          ema: Annotated[bool | None, typer.Option(
              "--ema/--no-ema", help="keep an exponential moving average of the weights")] = None,
          augment: Annotated[str | None, typer.Option(
              "--augment", help="basic, strong (also window, resolution, blur, noise, JPEG) or none (with "
              "--encoder: each image is encoded once)")] = None,
          metric_loss: Annotated[str | None, typer.Option(
              "--metric-loss", help="none, or supcon (supervised contrastive loss on the embedding)")] = None,
          balanced: Annotated[bool | None, typer.Option(
              "--balanced/--no-balanced", help="class-balanced batches")] = None,
          intensity: Annotated[str, typer.Option(
              "--intensity", help="input intensities: standardize (per-image mean/variance), equalize (global "
              "histogram equalisation) or clahe (adaptive, contrast-limited), each then standardised; not for "
              "detection")] = "standardize",
          decode: Annotated[str, typer.Option(
              "--decode", help="full, or reduced: grey 8-bit JPEGs (JPEG Baseline DICOMs, .jpg) decoded by DCT "
              "scaling at 1/2–1/8 size, never below --image-size; faster, slightly different pixels; recorded in "
              "the checkpoint, so ingest and queries decode the same way; not for detection")] = "full",
          patient_regex: RegexOpt = None) -> None:
    """Train a backbone with an embedding head; the split is recorded in the checkpoint (split.json).

    With no weight option the backbone starts from packaged ImageNet weights (offline; recorded in train.json),
    and its last groups are fine-tuned: the default recipe of docs/results.md."""
    from cbir.data.layout import load_dataset
    from cbir.data.splits import SplitSpec
    from cbir.models import ModelConfig, get_task
    from cbir.models.detector_config import DetectorConfig
    from cbir.train import TrainSettings, train_model
    from cbir.train.selection import SELECT_RULES
    from cbir.train.settings import DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE
    given_backbone = backbone
    backbone = backbone or (DetectorConfig().backbone if get_task(task).boxes else DEFAULT_BACKBONE)
    _check_weight_options(backbone, random_init, pretrained, weights, init, encoder, task)
    finds_boxes = get_task(task).boxes  # a bad --task/--bits/--intensity fails before the dataset is read
    if retrieval == "encoder" and encoder is None:
        raise CbirError("--retrieval encoder: retrieves by a frozen encoder's features; give --encoder FILE")
    if init is not None and encoder is not None:
        raise CbirError("--init fine-tunes a pretrained backbone, --encoder keeps one frozen: give one of them "
                        "(--encoder RUN uses a `cbir pretrain` run frozen)")
    frozen = _frozen_encoder(encoder, encoder_arch, encoder_input, encoder_norm, encoder_output, finds_boxes,
                             image_size, intensity, given_backbone, pretrained, weights)
    if frozen is not None:
        backbone, image_size, intensity = frozen.name, frozen.contract.size, "unit"
    image_size = image_size or DEFAULT_IMAGE_SIZE
    if not finds_boxes:
        ModelConfig(task=task, bits=bits, intensity=intensity, decode=decode, retrieval=retrieval,
                    encoder=frozen.to_dict() if frozen else None, image_size=image_size).validate()
    elif intensity != "standardize":
        raise CbirError("--intensity: the detector takes standardised inputs only")
    elif decode != "full":
        raise CbirError("--decode: the detector decodes its inputs in full only")
    elif appearance_size or appearance_weight or appearance_window:
        raise CbirError("--appearance-*: a detector's embedding has no appearance part")
    elif epochs == 0:
        raise CbirError("--epochs 0 (an untrained baseline) is for binary, hash and multilabel, not detection")
    unfrozen = _unfreeze_groups(unfreeze)
    if select is not None and select not in SELECT_RULES:
        raise CbirError(f"--select {select!r}: choose from {', '.join(SELECT_RULES)}")
    defaults = TrainSettings()
    transfer: dict[str, Any] = {"unfreeze": defaults.unfreeze if unfrozen is None else unfrozen,
                "layer_decay": defaults.layer_decay if layer_decay is None else layer_decay,
                "freeze_bn": defaults.freeze_bn if freeze_bn is None else freeze_bn}
    try:  # a bad --augment/--metric-loss fails before the dataset is read
        TrainSettings(augment=augment or "basic", metric_loss=metric_loss or "none").validate()
    except ValueError as exc:
        raise CbirError(str(exc)) from None
    if init is not None:  # a missing, corrupt or mismatched run fails before the dataset is read
        from cbir.train.pretrain import read_run
        if finds_boxes:
            raise CbirError("--init: the detector trains from scratch; --init is for binary, hash and multilabel")
        if pretrained or weights:
            raise CbirError("--init replaces --pretrained/--weights: give one of them")
        read_run(init, backbone)
    given = {k: v for k, v in _split_options(seed, val_fraction, test_fraction, folds, fold).items() if v is not None}
    spec = SplitSpec().replace(**given)
    records = load_dataset(data, layout, split=spec, patient_regex=patient_regex)
    records.require_labels("training")
    reporter = _reporter()
    for note in records.notes:
        reporter.log(f"note: {note}")
    appearance: dict[str, Any] = {
        k: v for k, v in (("appearance_size", appearance_size), ("appearance_weight", appearance_weight),
                          ("appearance_window", appearance_window)) if v is not None}
    settings = TrainSettings(epochs=defaults.epochs if epochs is None else epochs, batch_size=batch_size, lr=lr,
                             device=device, workers=workers,
                             seed=seed, pretrained=pretrained, weights=str(weights) if weights else None,
                             select=select or defaults.select, ema=defaults.ema if ema is None else ema,
                             augment=augment or defaults.augment, metric_loss=metric_loss or defaults.metric_loss,
                             balanced=defaults.balanced if balanced is None else balanced,
                             init=str(init) if init else None, random_init=random_init, **transfer)
    counts = records.meta["split"].value_counts().to_dict()
    reporter.log(f"{records.dataset}: {len(records)} images ({counts}; split {spec.describe()}), target "
                 f"{records.target!r}, {int(records.y.sum())} positive")
    labels: dict[str, Any] = {"label_names": list(records.label_names), "target": records.target}
    if finds_boxes:
        from cbir.models.detector_config import DetectorConfig
        config: Any = DetectorConfig(backbone=backbone, image_size=image_size, bits=bits, **labels)
    else:
        config = ModelConfig(backbone=backbone, task=task, image_size=image_size, embed_dim=embed_dim, bits=bits,
                             intensity=intensity, decode=decode, **labels, **appearance,
                             encoder=frozen.to_dict() if frozen else None, retrieval=retrieval)
    result = train_model(records, config, settings, out_dir, reporter)
    auc = "n/a" if math.isnan(result.best_val_auc) else f"{result.best_val_auc:.4f}"
    out.print(f"model {result.fingerprint} saved to {out_dir} (best epoch {result.best_epoch}, "
              f"val AUC {auc}, {result.seconds:.0f} s)", markup=False)


def _unfreeze_groups(value: str | None) -> int | None:
    """--unfreeze: "all" → -1, a number of groups → itself, None → None (the default)."""
    if value is None:
        return None
    if value.strip().lower() == "all":
        return -1
    if value.strip().isdigit():
        return int(value)
    raise CbirError(f"--unfreeze {value!r}: give a number of groups (0: a frozen backbone) or all")


def _check_weight_options(backbone: str, random_init: bool, pretrained: bool,
                          weights: Path | None, init: Path | None, encoder: Path | None, task: str) -> None:
    """One weight source at most; with none, the packaged weights must be installed and intact (checked before
    the dataset is read)."""
    from cbir.models import get_task
    if random_init and (pretrained or weights or init or encoder):
        raise CbirError("--random-init starts from random weights: drop --pretrained/--weights/--init/--encoder")
    if random_init or pretrained or weights or init or encoder or get_task(task).boxes:
        return
    _check_packaged(backbone)


def _check_packaged(backbone: str) -> None:
    """The backbone's packaged weights, if it has any, are installed and their sha256 the one cbir was checked
    against (before any dataset is read)."""
    from cbir.models.packaged import checked_path, packaged_for
    source = packaged_for(backbone)
    if source is not None:
        checked_path(source)


def _frozen_encoder(file: Path | None, arch: str | None, input_shape: str | None, norm: str | None,
                    output: str | None, finds_boxes: bool, image_size: int | None, intensity: str,
                    backbone: str | None, pretrained: bool, weights: Path | None) -> Any:
    """The `EncoderSpec` of `cbir train --encoder` (None without one), after its options are checked."""
    if file is None:
        if arch or input_shape or norm or output:
            raise CbirError("--encoder-arch/-input/-norm/-output describe an --encoder FILE, and none was given")
        return None
    if finds_boxes:
        raise CbirError("--encoder: the detector trains its own backbone; a frozen encoder is for binary, hash "
                        "and multilabel")
    if pretrained or weights is not None:
        raise CbirError("--encoder brings its own weights: drop --pretrained/--weights")
    if backbone is not None:
        raise CbirError("--encoder replaces --backbone: give one of them (a timm name for weights goes in "
                        "--encoder-arch)")
    if intensity != "standardize":
        raise CbirError("--intensity: a frozen encoder's input is set by its contract (--encoder-norm)")
    from cbir.models.encoder import describe_encoder

    if file.is_dir():   # a `cbir pretrain` run: its backbone, as it was trained (one grey channel, standardised)
        if arch or input_shape or norm:
            raise CbirError(f"--encoder {file}: a pretraining run states its own architecture and input")
        from cbir.train.pretrain import WEIGHTS, read_run

        record = read_run(file, option="--encoder")
        if record.get("intensity", "standardize") != "standardize":
            raise CbirError(f"--encoder {file}: pretrained with intensity {record['intensity']!r}, which an input "
                            "contract cannot state; fine-tune it with --init instead")
        file, arch = file / WEIGHTS, str(record["backbone"])
        input_shape, norm = f"1x{record['image_size']}", "standardize"
    spec = describe_encoder(file, arch, input_shape, norm, output)
    if image_size is not None and image_size != spec.contract.size:
        raise CbirError(f"--image-size {image_size}: {file} takes {spec.contract.size} px (its input contract)")
    return spec


@app.command()
@guarded
def pretrain(data: Annotated[list[Path], typer.Option(
                 "--data", help="image folders (rsna, nih, folder layout or plain images); repeat, or list several "
                 "after one --data")],
             out_dir: Annotated[Path, typer.Option("--out", help="run folder for the backbone")],
             extra: Annotated[list[Path] | None, typer.Argument(help="more image folders", show_default=False)
                              ] = None,
             backbone: Annotated[str, typer.Option("--backbone", help="any timm model name")] = "resnet18",
             image_size: Annotated[int, typer.Option("--image-size", min=16)] = 64,
             method: Annotated[str, typer.Option(
                 "--method", help="vicreg or simclr (NT-Xent); vicreg won on validation patients")] = "vicreg",
             epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
             minutes: Annotated[float | None, typer.Option(
                 "--minutes", help="stop after this many minutes of training (the schedule ends there)")] = None,
             batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 128,
             lr: Annotated[float, typer.Option("--lr")] = 1e-3,
             patient_p: Annotated[float, typer.Option(
                 "--patient-p", help="probability that the second view is another image of the same patient")
             ] = 0.5,
             intensity: Annotated[str, typer.Option("--intensity", help="standardize, equalize or clahe")
                                  ] = "standardize",
             device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
             workers: Annotated[int, typer.Option("--workers", min=0)] = 2,
             seed: Annotated[int, typer.Option("--seed")] = 0,
             random_init: Annotated[bool, typer.Option(
                 "--random-init", help="start from random weights, not the packaged ImageNet weights that "
                 "tf_efficientnet_lite0/1/2 start from otherwise")] = False) -> None:
    """Learn a backbone from images without labels (SimCLR or VICReg; two images of one patient are positives
    where the layout names patients); `cbir train --init RUN` fine-tunes from it. A backbone with packaged
    ImageNet weights starts from them (ImageNet continued on your images). Unreadable files are named and
    skipped."""
    with _heavy_imports():
        from cbir.train.pretrain import PretrainSettings
        from cbir.train.pretrain import pretrain as run_pretrain
    settings = PretrainSettings(backbone=backbone, image_size=image_size, intensity=intensity, method=method,
                                epochs=epochs, minutes=minutes, batch_size=batch_size, lr=lr, patient_p=patient_p,
                                seed=seed, workers=workers, device=device, random_init=random_init)
    settings.validate()
    if not random_init:
        _check_packaged(backbone)
    roots = [*data, *(extra or [])]
    result = run_pretrain(roots, out_dir, settings, _reporter())
    last = f", last epoch's loss {result.history[-1]['loss']:.4f}" if result.history else ""
    out.print(f"backbone {backbone} ({method}, {result.epochs:g} epochs, {result.n_images} images{last}) saved to "
              f"{out_dir} in {result.seconds:.0f} s; sha256 {result.sha256[:16]}", markup=False)
    if result.failures:
        out.print(f"{len(result.failures)} files skipped (named above)", markup=False)
        raise typer.Exit(1)


@app.command()
@guarded
def ingest(data: Annotated[Path, typer.Option("--data", help="dataset folder")],
           model: Annotated[Path, typer.Option("--model", help="run folder from `cbir train`")],
           index: IndexOpt = None, collection: CollectionOpt = DEFAULT_COLLECTION, layout: LayoutOpt = "auto",
           batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
           workers: Annotated[int, typer.Option("--workers", min=0)] = 2,
           strict: Annotated[bool, typer.Option("--strict", help="stop at the first bad file")] = False,
           device: Annotated[str, typer.Option("--device")] = "auto",
           seed: SeedOpt = None, val_fraction: ValFractionOpt = None, test_fraction: TestFractionOpt = None,
           folds: FoldsOpt = None, fold: FoldOpt = None, other_split: OtherSplitOpt = False,
           patient_regex: RegexOpt = None,
           codes: Annotated[str | None, typer.Option(
               "--codes", help="binary codes of a new collection: model (hash layer or LSH) or itq (fitted here)")
           ] = None,
           part: Annotated[str | None, typer.Option(
               "--part", help="i/n: only the i-th of n deterministic slices (n machines ingest in parallel)")
           ] = None,
           shards: Annotated[int, typer.Option("--shards", min=1, help="server: shards of a new collection")] = 1,
           replicas: Annotated[int, typer.Option("--replicas", min=1, help="server: copies of each shard")] = 1,
           team: TeamOpt = None, max_pixels: MaxPixelsOpt = None, any_modality: AnyModalityOpt = False,
           reindex: Annotated[bool, typer.Option(
               "--reindex", help="build the next version of the collection (e.g. with a new model) while queries "
               "go on, then swap it in and delete the old version")] = False,
           allow_count_change: Annotated[bool, typer.Option(
               "--allow-count-change", help="--reindex: swap even if the point counts differ (keeps the old "
               "version)")] = False,
           keep_paths: Annotated[bool, typer.Option(
               "--keep-paths", help="store each file's relative path in the index, for private archives whose "
               "file names identify nobody (default: a keyed pseudonym; the path stays in this machine's file "
               "map)")] = False,
           thumbnails: Annotated[bool, typer.Option(
               "--thumbnails", help="store a small de-identified picture (192 px WebP) with each point, so that "
               "other teams see the cases in the viewer and in montages")] = False,
           label_map: LabelMapOpt = None, dataset_id: DatasetIdOpt = None,
           ) -> None:
    """Embed every image of a dataset and upsert it into the index, split as the model's training data was
    (each point's payload `split`; the collection records the split). Payloads name files by keyed pseudonyms
    unless --keep-paths."""
    with _heavy_imports():
        from cbir.data.labels import parse_label_map
        from cbir.data.layout import load_dataset_for_model
        from cbir.index.ingest import ingest_records
        from cbir.index.teams import team_collection
        from cbir.io import load_pseudonymizer
        from cbir.models import load_checkpoint
        from cbir.models.device import resolve_device
    collection = team_collection(collection, team)
    _set_reader_limits(max_pixels, any_modality)
    if reindex and part:
        raise CbirError("--reindex builds a whole new version in one run; it cannot be combined with --part")
    loaded = load_checkpoint(model, resolve_device(device))
    reporter = _reporter()
    records, notes = load_dataset_for_model(data, layout, loaded.split,
                                            _split_options(seed, val_fraction, test_fraction, folds, fold),
                                            other_split, str(model), patient_regex, dataset_id)
    for note in notes:
        reporter.warn(note)
    split = records.split_record()
    first_part = True
    if part:
        from cbir.data.splits import parse_part
        try:
            i, n = parse_part(part)
        except ValueError as exc:
            raise CbirError(str(exc)) from None
        records, first_part = records.part(i, n), i == 1
    pseudonymize = load_pseudonymizer()
    if keep_paths:
        reporter.warn("--keep-paths: file names go into the index as they are; use it only if they identify nobody")
    with _open(index, writable=True, create=True) as idx:
        summary = ingest_records(records, loaded, idx, collection, pseudonymize, batch_size, workers, strict,
                                 reporter, codes=codes, may_fit_itq=first_part, shards=shards, replicas=replicas,
                                 team=team, reindex=reindex, allow_count_change=allow_count_change,
                                 split=split, keep_paths=keep_paths, thumbnails=thumbnails,
                                 label_map=parse_label_map(label_map))
        from cbir.search.calibrate import calibrate
        calibrate(idx, collection, reporter=reporter)
    out.print(summary.line, markup=False)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
@guarded
def query(image: Annotated[Path, typer.Argument(help="DICOM, PNG or JPEG file")],
          model: Annotated[Path | None, typer.Option("--model", help="defaults to the collection's model")] = None,
          index: IndexOpt = None, collection: CollectionOpt = DEFAULT_COLLECTION,
          k: Annotated[int, typer.Option("--k", min=1, max=1000)] = 10,
          filters: Annotated[list[str] | None, typer.Option("--filter", help="key=value, repeatable")] = None,
          prefilter: Annotated[int | None, typer.Option("--prefilter", min=1,
                                                        help="keep the N nearest by Hamming distance")] = None,
          hamming_radius: Annotated[int | None, typer.Option("--hamming-radius", min=0)] = None,
          as_json: Annotated[bool, typer.Option("--json", help="print JSON on stdout")] = False,
          montage: Annotated[Path | None, typer.Option("--montage", help="write a PNG montage")] = None,
          device: Annotated[str, typer.Option("--device")] = "auto", team: TeamOpt = None,
          max_pixels: MaxPixelsOpt = None, any_modality: AnyModalityOpt = False,
          local_paths: LocalPathsOpt = False,
          include_self: Annotated[bool, typer.Option(
              "--include-self", help="let an archived copy of the query itself vote (left out by default)")] = False
          ) -> None:
    """Find the k most similar archived cases to one image. File names are not printed unless --local-paths."""
    with _heavy_imports():
        from cbir.index.teams import team_collection
        from cbir.io import load_pseudonymizer
        from cbir.search import parse_filters, query_image
        from cbir.threads import limit_process
    limit_process(1)   # one query: BLAS on one thread (cbir/threads.py)
    collection = team_collection(collection, team)
    _set_reader_limits(max_pixels, any_modality)
    flt = parse_filters(filters)
    with _open(index) as idx:
        loaded = _load_model(model, idx, collection, device)
        result = query_image(image, loaded, idx, collection, k, flt, prefilter, hamming_radius,
                             load_pseudonymizer(), local_paths, include_self)
        payload = result.to_json()
        if montage is not None:
            from cbir.report.montage import write_montage
            from cbir.search.pictures import neighbor_pictures
            pictures = neighbor_pictures(idx, collection, payload["neighbors"])
            assert result.pixels is not None  # `query_image` keeps the decoded query
            write_montage(payload, result.pixels, pictures, montage)
            payload["montage"] = str(montage)
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    _print_query(payload)


def _describe_prediction(pred: dict[str, Any]) -> str:
    """The model's own answer in words: its probability, whether calibrated, and the point it is read at."""
    if "operating_point" not in pred:
        return f"P({pred['target']}) = {pred['probability']:.3f} → {pred['label']}"
    how = "calibrated" if pred.get("calibrated") else "a raw score, not calibrated"
    return (f"P({pred['target']}) = {pred['probability']:.3f}, {how} → {pred['label']} ({pred['target']} from "
            f"{pred['operating_point']:.2f} on)")


def _print_query(result: dict[str, Any]) -> None:
    from cbir.search.query import describe_vote
    table = Table(title=f"{result['k']} nearest cases in {result['collection']!r}")
    for column in ("rank", "score", "hamming", "labels", "view", "sex", "age", "file"):
        table.add_column(column, justify="right" if column in ("rank", "score", "hamming") else "left")
    vote, pred = result["vote"], result["prediction"]
    for n in result["neighbors"]:
        own = " self" if n.get("self_match") and not vote.get("included_self") else ""
        table.add_row(f"{n['rank']}{own}", f"{n['score']:.4f}", "" if n["hamming"] is None else str(n["hamming"]),
                      ", ".join(n["labels"] or []) or ("unknown" if n.get("label") is None else ""),
                      n["view"] or "", n["sex"] or "", n["age_band"] or "",
                      n["path"] or n.get("file") or "")
    out.print(table)
    if (result.get("query") or {}).get("label"):
        out.print(f"query's own label: {result['query']['label']}", markup=False)
    if vote.get("self_matches") and not vote.get("included_self"):
        out.print("the query is already in the archive (rank marked self, similarity ≥ 0.9999): left out of the "
                  "vote (--include-self keeps it)", markup=False)
    out.print(f"kNN vote: {describe_vote(vote, len(result['neighbors']))}", markup=False)
    for warning in vote.get("warnings") or []:
        out.print(f"warning: {warning}; the vote is unreliable", markup=False)
    out.print(f"model: {_describe_prediction(pred)}", markup=False)
    for found in pred.get("boxes") or []:
        x, y, w, h = found["box"]
        out.print(f"model box: x {x:.0f}, y {y:.0f}, w {w:.0f}, h {h:.0f} (score {found['score']:.2f})", markup=False)
    if result.get("montage"):
        out.print(f"montage: {result['montage']}", markup=False)


@app.command()
@guarded
def evaluate(model: Annotated[Path | None, typer.Option("--model")] = None, index: IndexOpt = None,
             collection: CollectionOpt = DEFAULT_COLLECTION,
             queries: Annotated[Path | None, typer.Option("--queries", help="another dataset as queries")] = None,
             layout: LayoutOpt = "auto", k: Annotated[int, typer.Option("--k", min=1, max=1000)] = 10,
             out_dir: Annotated[Path, typer.Option("--out", help="report folder")] = Path("cbir-report"),
             as_json: Annotated[bool, typer.Option("--json")] = False,
             device: Annotated[str, typer.Option("--device")] = "auto",
             patient_regex: RegexOpt = None, team: TeamOpt = None, other_split: OtherSplitOpt = False,
             robustness: Annotated[bool, typer.Option(
                 "--robustness", help="also re-encode every query (JPEG q60, cropped 12-bit MONOCHROME1 DICOM, "
                                      "blur + gamma, 5° rotation): rank of the original and the metrics' change"
             )] = False, label_map: LabelMapOpt = None, dataset_id: DatasetIdOpt = None) -> None:
    """Stage-1 ROC-AUC and stage-2 kNN metrics with 95 % CIs and the majority baseline; writes report.md/json.

    The queries are the test split the model was trained with (from the collection), or --queries: another
    dataset's images (only its test split when it is the model's own training data)."""
    with _heavy_imports():
        from cbir.data.labels import parse_label_map
        from cbir.evaluate.run import evaluate_collection
        from cbir.index.teams import team_collection
        from cbir.io import load_pseudonymizer
    collection = team_collection(collection, team)
    reporter = _reporter(quiet=as_json)
    with _open(index) as idx:
        loaded = _load_model(model, idx, collection, device)
        records = _query_records(queries, layout, loaded, patient_regex, other_split, reporter,
                                 dataset_id) if queries else None
        report = evaluate_collection(idx, collection, loaded, out_dir, k, records, load_pseudonymizer(), reporter,
                                     allow_other_split=other_split, robustness=robustness,
                                     label_map=parse_label_map(label_map))
    report.pop("per_query", None)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
        return
    _print_report(report, out_dir)


def _query_records(root: Path, layout: str, loaded: Any, patient_regex: str | None, other_split: bool,
                   reporter: Any, dataset_id: str | None = None) -> Any:
    """`--queries`: the dataset split by the model's rule; only its test split if the model was trained on it."""
    from cbir.data.layout import load_dataset_for_model
    from cbir.data.splits import same_data
    records, notes = load_dataset_for_model(root, layout, loaded.split, {}, other_split, str(loaded.path),
                                            patient_regex, dataset_id)
    for note in notes:
        reporter.warn(note)
    if loaded.split is not None and same_data(loaded.split, records.split_record()):
        records = records.split("test")
        reporter.log(f"queries: the {len(records)} test images of {root} (the model was trained on this dataset)")
        if len(records) == 0:
            raise CbirError(f"{root}: the model was trained on this dataset and held out no test images; "
                            "give another dataset as --queries")
    return records


def _print_report(report: dict[str, Any], out_dir: Path) -> None:
    """The console table: stage 1, then the vote that `cbir query` shows, then the plain majority of k and the
    other retrieval figures as baselines (docs/metrics.md)."""
    s1, s2, base, k = report["stage1"], report["stage2"], report["baseline"], report["k"]
    vote = s2.get("weighted_vote") or {}
    table = Table(title=f"evaluation: {report['n_queries']} queries, k = {k}")
    for column in ("metric", "value", "95 % CI"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    rows = [("stage 1 ROC-AUC", s1["roc_auc"], s1.get("roc_auc_ci")),
            *([("box mAP (IoU 0.40–0.75)", s1["box_map"], None)] if "box_map" in s1 else []),
            *([("vote balanced accuracy (what cbir query shows)", vote["balanced_accuracy"],
                vote.get("balanced_accuracy_ci")),
               ("vote minus model, balanced accuracy", vote["minus_model_balanced_accuracy"],
                vote.get("minus_model_balanced_accuracy_ci")),
               ("vote sensitivity / specificity", None, None)] if vote else []),
            (f"majority of {k}: accuracy (baseline)", s2["knn_accuracy"], s2.get("knn_accuracy_ci")),
            (f"majority of {k}: balanced accuracy (baseline)", s2["balanced_accuracy"],
             s2.get("balanced_accuracy_ci")),
            (f"precision@{k}", s2["precision_at_k"], None), (f"mAP@{k}", s2["map_at_k"], s2.get("map_at_k_ci")),
            *[(name, s2[key], None) for key, name in (("map_at_k_any_finding", "mAP, any shared finding"),
                                                      ("hamming_map_at_k", "mAP, Hamming ranking"),
                                                      ("prefilter_knn_accuracy", "kNN accuracy, Hamming prefilter"))
              if key in s2],
            (f"majority baseline (always {_majority_name(report)})", base["majority_accuracy"], None)]

    def pair(block: dict[str, Any]) -> str:
        return " / ".join("n/a" if block.get(key) is None else f"{100 * block[key]:.1f} %"
                          for key in ("sensitivity", "specificity"))
    for name, value, ci in rows:
        if name.startswith("vote sensitivity"):
            table.add_row(name, pair(vote), f"model: {pair(s1)}")
            continue
        interval = "" if not ci else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}"
        table.add_row(name, "n/a" if value is None else f"{100 * value:.2f} %", interval)
    out.print(table)
    unknown = report.get("unknown_labels") or {}
    if any(unknown.values()):
        out.print(f"left out (labels unknown): {unknown['queries_skipped']} queries, {unknown['archive_skipped']} "
                  "archive images", markup=False)
    out.print(f"report: {out_dir / 'report.md'}", markup=False)


def _majority_name(report: dict[str, Any]) -> str:
    context = report.get("context") or {}
    if report["baseline"].get("majority_label") == 1:
        return str(context.get("target") or "positive")
    return str(context.get("negative_label") or "negative")


@index_app.command("info")
@guarded
def index_info(index: IndexOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List collections (by the name you query them with) with their stored version, point counts, model
    fingerprint, dimensions, team and schema version."""
    with _open(index) as idx:
        by_collection = {c: a for a, c in idx.list_aliases().items()}
        rows = []
        for name in idx.list_collections():
            record = idx.record(name)
            rows.append({"collection": by_collection.get(name, name), "stored_as": name,
                         "current": name in by_collection, "points": idx.count(name),
                         "model_fingerprint": record.model_fingerprint, "backbone": record.backbone,
                         "dim": record.dim, "bits": record.bits, "team": record.team,
                         "schema_version": idx.schema_version(name), "model_path": record.model_path,
                         "key_fingerprint": record.key_fingerprint, "paths": record.path_mode,
                         "thumbnails": record.thumbnails is not None,
                         "splits": {dataset: split.get("description") for dataset, split in record.splits.items()}})
        location = idx.location
    if as_json:
        sys.stdout.write(json.dumps({"index": location, "collections": rows}, indent=2) + "\n")
        return
    table = Table(title=f"index {location}")
    columns = ("collection", "stored_as", "points", "model_fingerprint", "backbone", "dim", "bits", "team",
               "schema_version", "paths", "thumbnails", "splits")
    for column in columns:
        table.add_column(column)
    for row in rows:
        row = row | {"splits": "; ".join(f"{d}: {text}" for d, text in row["splits"].items()) or None}
        table.add_row(*(str(row[c]) if row[c] is not None else "" for c in columns))
    out.print(table)


@index_app.command("drop")
@guarded
def index_drop(collection: Annotated[str, typer.Argument(help="a collection, or a stored version")],
               index: IndexOpt = None) -> None:
    """Delete a collection with all its versions, or one stored version that no alias points at."""
    from cbir.index.versions import drop
    with _open(index, writable=True) as idx:
        names = drop(idx, collection)
    out.print(f"deleted {', '.join(names)}", markup=False)


@index_app.command("calibrate")
@guarded
def index_calibrate(collection: Annotated[str, typer.Argument(help="the collection to calibrate")] = DEFAULT_COLLECTION,
                    k: Annotated[int, typer.Option("--k", min=1, max=1000)] = 10, index: IndexOpt = None,
                    team: TeamOpt = None) -> None:
    """Fit the vote's calibration and the close-case threshold on the collection's validation images again
    (`cbir ingest` does this; use it for collections ingested before, or for another k)."""
    from cbir.index.teams import team_collection
    from cbir.search.calibrate import calibrate
    collection = team_collection(collection, team)
    with _open(index, writable=True) as idx:
        if not idx.has_collection(collection):
            raise CbirError(f"no collection {collection!r} in {idx.location}")
        body = calibrate(idx, collection, k, _reporter())
    if body is None:
        raise CbirError(f"collection {collection!r}: too few labelled validation images to calibrate (at least "
                        "20, and training images); the vote stays uncalibrated")
    vote = body["vote"]
    tau = "∞ (equal weights)" if vote["temperature"] is None else f"{vote['temperature']:g}"
    out.print(f"{collection}: vote τ = {tau}, a = {vote['a']:.3f}, b = {vote['b']:.3f} on "
              f"{vote['n_validation']} validation images; close-case threshold {body['nearest']['threshold']:.4f}",
              markup=False)


@index_app.command("export")
@guarded
def index_export(collection: Annotated[str, typer.Argument(help="the collection to export")],
                 out_file: Annotated[Path, typer.Option("--out", help="snapshot file to write")],
                 index: IndexOpt = None, team: TeamOpt = None) -> None:
    """Write one collection to a file as a Qdrant shard snapshot (server → file → Edge, and back)."""
    from cbir.index.snapshots import export_collection
    from cbir.index.teams import team_collection
    with _open(index) as idx:
        done = export_collection(idx, team_collection(collection, team), out_file, _reporter())
    size = out_file.stat().st_size / 2**20
    out.print(f"exported {done.points} points of {done.collection!r} to {out_file} ({size:.1f} MiB, "
              f"{done.method})", markup=False)


@index_app.command("import")
@guarded
def index_import(snapshot: Annotated[Path, typer.Argument(help="a file from `cbir index export`")],
                 index: IndexOpt = None,
                 collection: Annotated[str | None, typer.Option(
                     "--collection", help="import under this name (default: the exported one)")] = None,
                 replace: Annotated[bool, typer.Option(
                     "--replace", help="swap it in as the next version of an existing collection")] = False,
                 shards: Annotated[int, typer.Option("--shards", min=1, help="server: shards")] = 1,
                 replicas: Annotated[int, typer.Option("--replicas", min=1, help="server: replicas")] = 1,
                 ) -> None:
    """Load a snapshot file into an index (Qdrant Edge, a server or local mode) as a collection; a team's
    collection keeps its name (TEAM.COLLECTION) and its team."""
    from cbir.index.snapshots import import_collection
    with _open(index, writable=True, create=True) as idx:
        done = import_collection(idx, snapshot, collection, replace, shards, replicas, _reporter())
    out.print(f"imported {done.points} points: {done.swap.line}", markup=False)


@index_app.command("token")
@guarded
def index_token(collection: CollectionOpt = DEFAULT_COLLECTION, team: TeamOpt = None,
                write: Annotated[bool, typer.Option("--write", help="also allow ingest (default: query only)")] = False,
                days: Annotated[float, typer.Option("--days", min=0.01, help="valid for this many days")] = 90.0,
                ) -> None:
    """Print a JWT for one team's collection, signed with the server's admin API key ($CBIR_QDRANT_API_KEY or
    --api-key-file): read-only unless --write. The server needs QDRANT__SERVICE__JWT_RBAC=true and enforces it;
    the team keeps the token in a file and passes it with --api-key-file (or $CBIR_QDRANT_API_KEY)."""
    from cbir.index.teams import team_collection
    from cbir.index.tokens import make_token
    sys.stdout.write(make_token(_SERVER.get("api_key") or "", [team_collection(collection, team)], write, days)
                     + "\n")


@index_app.command("prune")
@guarded
def index_prune(index: IndexOpt = None,
                wait: Annotated[float, typer.Option("--wait", min=0, help="seconds to wait for readers")] = 0.0
                ) -> None:
    """Delete old versions that a reindex left behind because another process was still reading them."""
    from cbir.index.versions import prune
    with _open(index, writable=True) as idx:
        deleted, busy = prune(idx, wait=wait)
    out.print(f"deleted {len(deleted)} old version(s){': ' + ', '.join(deleted) if deleted else ''}", markup=False)
    if busy:
        err.print(f"still in use by another process: {', '.join(busy)}", markup=False)
        raise typer.Exit(1)


@app.command()
@guarded
def demo(out_dir: Annotated[Path, typer.Option("--out", help="demo folder")] = Path("cbir-demo"),
         n: Annotated[int, typer.Option("--n", min=40)] = 400,
         size: Annotated[int, typer.Option("--size", min=32)] = 64,
         epochs: Annotated[int, typer.Option("--epochs", min=1)] = 8,
         backbone: Annotated[str, typer.Option("--backbone")] = "resnet10t",
         index: IndexOpt = None) -> None:
    """Synth → train → ingest → query → montage → evaluate, in a few minutes on a CPU."""
    from cbir.demo import run_demo
    result = run_demo(out_dir, n=n, size=size, epochs=epochs, backbone=backbone, index=index,
                      reporter=_reporter())
    out.print("")
    for line in result.lines():
        out.print(line, markup=False)


@app.command()
@guarded
def migrate(index: IndexOpt = None,
            to: Annotated[int | None, typer.Option("--to", min=0, help="stop after this migration")] = None
            ) -> None:
    """Apply the index migrations not yet applied (idempotent); `--to N` stops after migration N."""
    from cbir.index.migrate import discover
    from cbir.index.migrate import migrate as run_migrations
    from cbir.migrations import PACKAGE
    with _open(index, writable=True, create=True) as idx:
        applied = run_migrations(idx, to, discover(PACKAGE), reporter=_reporter())
        ledger = idx.get_ledger()
    latest = max((int(e["number"]) for e in ledger), default=0)
    out.print(f"applied {len(applied)} migration(s); the index is at migration {latest}", markup=False)


@app.command()
@guarded
def bench(n: Annotated[str, typer.Option("--n", help="collection sizes, comma-separated")] = "10000,100000",
          dim: Annotated[int, typer.Option("--dim", min=2)] = 512,
          bits: Annotated[int, typer.Option("--bits", min=8)] = 64,
          queries: Annotated[int, typer.Option("--queries", min=5)] = 200,
          prefilter: Annotated[str, typer.Option("--prefilter", help="N of the top-N Hamming prefilter; several "
                                                 "(e.g. 1000,4000) give a row each")] = "1000",
          radius: Annotated[int | None, typer.Option("--radius", min=0,
                                                     help="Hamming radius (default bits/4)")] = None,
          json_out: Annotated[Path | None, typer.Option("--json", help="write the results as JSON")] = None,
          markdown_out: Annotated[Path | None, typer.Option("--markdown", help="write the table as Markdown")
                                  ] = None,
          from_index: Annotated[bool, typer.Option("--from-index", help="use --index/--collection's points")
                                ] = False,
          index: IndexOpt = None, collection: CollectionOpt = DEFAULT_COLLECTION,
          hnsw: Annotated[bool, typer.Option("--hnsw/--no-hnsw", help="also build and query an HNSW graph")] = True,
          pipeline: Annotated[bool, typer.Option("--pipeline/--no-pipeline", help="also time the model side")
                              ] = True,
          backbone: Annotated[str, typer.Option("--backbone", help="pipeline: backbone")] = "resnet18",
          image_size: Annotated[int, typer.Option("--image-size", help="pipeline: model input size")] = 224,
          pipeline_images: Annotated[int, typer.Option("--pipeline-images", min=8, help="pipeline: DICOMs")] = 96,
          source_size: Annotated[int, typer.Option("--source-size", min=32, help="pipeline: DICOM size (px)")
                                 ] = 1024,
          storage: Annotated[bool, typer.Option(
              "--storage", help="instead: the Edge index's size on disk per 1,000 points at the --n sizes, with "
              "and without thumbnails")] = False,
          storage_images: Annotated[Path | None, typer.Option(
              "--storage-images", help="--storage: make the thumbnails from these images (default: synthetic)")
          ] = None,
          load: Annotated[bool, typer.Option(
              "--load", help="repeat the in-process engines' rows (and the serve rows) while a second process "
              "keeps one core busy; every row says load true/false")] = False,
          large_n: Annotated[str, typer.Option(
              "--large-n", help="further sizes built as arrays and run through the in-process engines only "
              "(cbir-memory, NumPy, FAISS), e.g. 1000000")] = "",
          serve_queries: Annotated[int, typer.Option(
              "--serve-queries", min=0, help="pipeline: queries per client against a `cbir serve` process, "
              "1 and 2 parallel clients (0: skip)")] = 40,
          ) -> None:
    """Time the query path against the alternatives in one run (Qdrant Edge exact/HNSW/prefilters, local mode,
    NumPy, FAISS, cbir's in-memory searcher) and the model pipeline; prints a table, writes JSON. --storage
    measures what thumbnails cost instead."""
    from cbir.bench.data import from_index as data_from_index
    from cbir.bench.data import synthetic, synthetic_arrays
    from cbir.bench.pipeline import bench_pipeline
    from cbir.bench.run import bench_vectors, markdown, to_json
    reporter = _reporter()
    rows: list[Any] = []
    batch_rows: list[Any] = []
    try:
        sizes = [int(x) for x in n.split(",") if x.strip()]
        large = [int(x) for x in large_n.split(",") if x.strip()]
        prefilters = [int(x) for x in prefilter.split(",") if x.strip()]
    except ValueError:
        raise CbirError(f"--n {n!r} / --large-n {large_n!r} / --prefilter {prefilter!r}: give whole numbers like "
                        "10000,100000") from None
    if not prefilters or min(prefilters) < 10:
        raise CbirError(f"--prefilter {prefilter!r}: give one or more N of at least 10, like 1000,4000")
    if storage:
        _bench_storage(sizes, dim, bits, storage_images, json_out, markdown_out)
        return
    if from_index:
        with _open(index) as idx:
            datasets = [data_from_index(idx, collection, queries)]
    else:
        datasets = [synthetic(size, dim, bits, queries) for size in sizes]
    for data in datasets:
        reporter.log(f"{len(data):,} points ({data.source})")
        rows += bench_vectors(data, prefilter=prefilters, radius=radius, hnsw=hnsw, reporter=reporter, load=load,
                              batch_rows=batch_rows)
    for size in large:
        data = synthetic_arrays(size, dim, bits, queries)
        reporter.log(f"{size:,} points ({data.source}; in-process engines only)")
        rows += bench_vectors(data, prefilter=prefilters, radius=radius, reporter=reporter, load=load,
                              in_process_only=True, batch_rows=batch_rows)
        del data
    model_side = (bench_pipeline(backbone, image_size, n_images=pipeline_images, source_size=source_size,
                                 serve_queries=serve_queries, load=load, reporter=reporter) if pipeline else None)
    result = to_json(rows, model_side, {"n": n, "large_n": large_n, "dim": dim, "bits": bits, "queries": queries,
                                        "prefilter": prefilters, "radius": radius, "from_index": from_index,
                                        "load": load}, batch_rows)
    table = Table(title="cbir bench")
    columns = ("engine", "method", "n", "filter", "load", "p50_ms", "p99_ms", "recall_at_10",
               "ingest_points_per_s", "build_s", "queries")
    for column in columns:
        table.add_column(column, justify="left" if column in ("engine", "method", "filter") else "right")
    for row in result["rows"]:
        table.add_row(*(f"{row[c]:,}" if isinstance(row[c], int) and not isinstance(row[c], bool) else str(row[c])
                        for c in columns))
    out.print(table, width=max(out.width, 150))
    if model_side:
        for row in model_side["decodes"]:
            out.print(f"pipeline ({model_side['backbone']} at {model_side['image_size']} px, decode {row['decode']}): "
                      f"{row['images_per_s']} images/s with decoding vs {model_side['bare_forward_images_per_s']} "
                      f"bare forward ({100 * row['pipeline_fraction_of_bare']:.0f} %); warm query "
                      f"{row['warm_query_ms']} ms p50", markup=False)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        out.print(f"wrote {json_out}", markup=False)
    if markdown_out is not None:
        markdown_out.write_text(markdown(result))
        out.print(f"wrote {markdown_out}", markup=False)


def _bench_storage(sizes: list[int], dim: int, bits: int, images: Path | None, json_out: Path | None,
                   markdown_out: Path | None) -> None:
    from cbir.bench.run import machine
    from cbir.bench.storage import bench_storage, storage_markdown, storage_pictures
    if images is not None and not images.is_dir():
        raise CbirError(f"{images}: --storage-images must be a folder of images")
    reporter = _reporter()
    try:
        pictures, source = storage_pictures(images, reporter)
    except ValueError as exc:
        raise CbirError(str(exc)) from None
    rows = bench_storage(sizes, dim, bits, pictures, reporter)
    text = storage_markdown(rows, source)
    out.print(text, markup=False)
    if json_out is not None:
        json_out.write_text(json.dumps({"storage": rows, "thumbnails_from": source, "machine": machine()}, indent=2)
                            + "\n")
        out.print(f"wrote {json_out}", markup=False)
    if markdown_out is not None:
        markdown_out.write_text(text)
        out.print(f"wrote {markdown_out}", markup=False)


@app.command()
@guarded
def serve(index: IndexOpt = None, collection: CollectionOpt = DEFAULT_COLLECTION, team: TeamOpt = None,
          model: Annotated[Path | None, typer.Option("--model", help="defaults to the collection's model")] = None,
          host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
          device: Annotated[str, typer.Option("--device")] = "auto",
          max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", min=1)] = 64,
          max_pixels: MaxPixelsOpt = None, any_modality: AnyModalityOpt = False,
          local_paths: LocalPathsOpt = False,
          token_file: Annotated[Path | None, typer.Option(
              "--token-file", help="a file holding the bearer token every request must carry (else "
              "$CBIR_SERVE_TOKEN; required unless --host is a loopback address)")] = None,
          allow_hosts: Annotated[list[str] | None, typer.Option(
              "--allow-host", help="a host name the server answers to (the Host header), repeatable [default: "
              "this machine's names on loopback, the bound address otherwise]")] = None) -> None:
    """Keep the model and the collection warm and answer queries over HTTP (POST /query, GET /health,
    API docs at /docs). Cases show as their image files where this machine has them, else as the thumbnails
    stored with them (cbir ingest --thumbnails). On any address but loopback it needs a token (never given on
    the command line, where `ps` shows it)."""
    from cbir.extras import require
    require("serve", "cbir serve")
    with _heavy_imports():
        import uvicorn

        from cbir.index.teams import team_collection
        from cbir.io import load_pseudonymizer
        from cbir.search.warm import WarmSearcher
        from cbir.serve import create_app
        from cbir.serve.access import access_for, serve_token
        from cbir.threads import limit_process
    limit_process(1)   # single queries from request threads: BLAS on one thread, set once (cbir/threads.py)
    access = access_for(host, serve_token(token_file), allow_hosts or [])
    collection = team_collection(collection, team)
    _set_reader_limits(max_pixels, any_modality)
    idx = _open(index)
    loaded = _load_model(model, idx, collection, device)
    searcher = WarmSearcher(idx, collection, loaded, load_pseudonymizer(), local_paths=local_paths)
    out.print(f"serving {collection!r} ({len(searcher.memory):,} points, model {loaded.fingerprint}) on "
              f"http://{host}:{port} (API docs: /docs)"
              + ("; with a token: open /?token=… once in the browser, or send Authorization: Bearer …"
                 if access.token else ""), markup=False)
    try:
        uvicorn.run(create_app(searcher, max_upload_mb * 2**20, access=access), host=host, port=port,
                    log_level="warning")
    finally:
        searcher.close()
        idx.close()


@app.command()
@guarded
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
              val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=0.5)] = 0.1,
              seed: Annotated[int, typer.Option("--seed")] = 0,
              bits: Annotated[int, typer.Option("--bits", min=16, max=256)] = 64,
              k: Annotated[int, typer.Option("--k", min=1)] = 10,
              tasks: Annotated[list[str] | None, typer.Option("--task", help="only these approaches")] = None,
              device: Annotated[str, typer.Option("--device")] = "auto",
              patient_regex: RegexOpt = None,
              reuse: Annotated[bool, typer.Option(
                  "--reuse", help="keep models already trained in --out with these settings")] = False,
              doc: Annotated[Path | None, typer.Option(
                  "--doc", help="also write the table into this Markdown file (its own section)")] = None,
              readme: Annotated[Path | None, typer.Option(
                  "--readme", help="also write the binary row's headline into this file's headline section")
              ] = None) -> None:
    """The seed's table by k-fold cross-validation: train the approaches, ingest and evaluate each per fold,
    and write results.md/results.json (mean ± sd over folds and pooled 95 % intervals)."""
    from cbir.reproduce import ReproduceOptions, run_reproduce
    if folds == 1:
        raise CbirError("--folds must be 0 (one hold-out split) or at least 2")
    options = ReproduceOptions(data=data, out=out_dir, layout=layout, nih=nih, backbone=backbone,
                               image_size=image_size, nih_image_size=nih_image_size, epochs=epochs, device=device,
                               bits=bits, k=k, tasks=tasks, patient_regex=patient_regex, reuse=reuse, folds=folds,
                               val_fraction=val_fraction, seed=seed, doc=doc, readme=readme)
    results = run_reproduce(options, reporter=_reporter())
    out.print((out_dir / "results.md").read_text(), markup=False)
    out.print(f"results: {out_dir / 'results.md'} ({len(results['tasks'])} approaches, "
              f"{len({r['fold'] for r in results['folds']})} folds, {results['seconds'] / 60:.1f} min)", markup=False)


@app.command()
@guarded
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
              "--init", help="ssl-method: the `cbir pretrain` runs to compare (repeatable); label-efficiency: the "
              "pretrained run")] = None,
          layout: LayoutOpt = "auto",
          folds: Annotated[int, typer.Option("--folds", min=2)] = 5,
          use_folds: Annotated[list[int] | None, typer.Option("--use-fold", help="only these folds (repeatable)")
                               ] = None,
          val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.05, max=0.5)] = 0.2,
          seed: Annotated[int, typer.Option("--seed")] = 0,
          backbone: Annotated[str, typer.Option("--backbone")] = "resnet18",
          image_size: Annotated[int, typer.Option("--image-size", min=16)] = 128,
          epochs: Annotated[int, typer.Option("--epochs", min=1)] = 15,
          batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 32,
          device: Annotated[str, typer.Option("--device")] = "auto",
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
        selected_recipes(chosen)  # an unknown name fails before any data is read
    bad = [f for f in use_folds or [] if not 1 <= f <= folds]
    if bad:
        raise CbirError(f"--use-fold {bad[0]}: folds are 1..{folds}")
    options = StudyOptions(data=data, out=out_dir, layout=layout, folds=folds, use_folds=list(use_folds or []),
                           val_fraction=val_fraction, seed=seed, backbone=backbone, image_size=image_size,
                           epochs=epochs, batch_size=batch_size, device=device, doc=doc, other=other,
                           models=models, recipes=chosen, init=list(init or []))
    result = STUDIES[name](options, _reporter())
    out.print(result["markdown"], markup=False)


@app.command()
@guarded
def audit(data: Annotated[Path, typer.Option("--data", help="the dataset to audit (the queries)")],
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
              "--threshold", min=0.0, max=1.0, help="cosine of the tiny images from which two images are "
              "near-duplicates (default 0.96: docs/results.md, \"Leakage audit\")")] = None,
          seed: SeedOpt = None, val_fraction: ValFractionOpt = None, test_fraction: TestFractionOpt = None,
          folds: FoldsOpt = None, fold: FoldOpt = None, patient_regex: RegexOpt = None,
          csv_out: Annotated[Path, typer.Option(
              "--csv", help="write the pairs here (keyed pseudonyms only)")] = Path("cbir-audit.csv"),
          pixel: Annotated[bool, typer.Option(
              "--pixel-check", help="also compare each pair's pixels at 256 px (linear-fit residual)")] = False,
          show: Annotated[int, typer.Option("--show", min=0, help="print at most this many pairs")] = 20,
          workers: Annotated[int, typer.Option("--workers", min=0)] = 2,
          as_json: Annotated[bool, typer.Option("--json", help="print JSON on stdout")] = False,
          local_paths: LocalPathsOpt = False, max_pixels: MaxPixelsOpt = None,
          any_modality: AnyModalityOpt = False) -> None:
    """Leakage audit: near-duplicate images (by their tiny images, no model needed) across the splits of --data,
    between --data and --against, or between --data and a --collection. Writes the pairs as CSV (pseudonyms)."""
    with _heavy_imports():
        from cbir.data.layout import load_dataset
        from cbir.data.splits import SplitSpec
        from cbir.evaluate import audit as au
        from cbir.io import load_pseudonymizer
    if against is not None and collection is not None:
        raise CbirError("give --against DIR or --collection NAME, not both")
    _set_reader_limits(max_pixels, any_modality)
    explicit = {k: v for k, v in _split_options(seed, val_fraction, test_fraction, folds, fold).items()
                if v is not None}
    pseudonymize, reporter = load_pseudonymizer(), _reporter(quiet=as_json)
    records = load_dataset(data, layout, split=SplitSpec().replace(**explicit), patient_regex=patient_regex,
                           pseudonymize=pseudonymize)
    options = {"threshold": au.THRESHOLD if threshold is None else threshold, "reporter": reporter,
               "workers": workers, "pixel": pixel}
    if against is not None:
        result = au.audit_datasets(records, load_dataset(against, against_layout, pseudonymize=pseudonymize),
                                   pseudonymize, **options)
    elif collection is not None:
        with _open(index) as idx:
            result = au.audit_collection(records, idx, collection, _load_model(model, idx, collection, "cpu"),
                                         pseudonymize, **options)
    else:
        result = au.audit_splits(records, pseudonymize, **options)
    au.write_csv(result, csv_out)
    for failure in result.failures:
        reporter.warn(failure)
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

def main() -> None:
    app()


if __name__ == "__main__":
    main()
