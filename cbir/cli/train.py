"""`cbir train`: a backbone for one of the four approaches, from packaged ImageNet weights by default."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from cbir.cli.common import (
    DeviceOpt,
    FoldOpt,
    FoldsOpt,
    LayoutOpt,
    RegexOpt,
    TestFractionOpt,
    ValFractionOpt,
    WorkersOpt,
    guarded,
    make_reporter,
    out,
    split_options,
)
from cbir.cli.common import settings as settings_of
from cbir.errors import CbirError


def register(app: typer.Typer) -> None:
    app.command()(guarded(train))


def train(ctx: typer.Context, data: Annotated[Path, typer.Option("--data", help="dataset folder")],
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
          batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="images per training step")] = 32,
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
          probe_epochs: Annotated[int | None, typer.Option(
              "--probe-epochs", min=0, help="the first of --epochs train the heads alone on frozen features, "
              "then the --unfreeze groups join (LP-FT) [default: 0]")] = None,
          average_runs: Annotated[int | None, typer.Option("--average-runs", min=1, help="train N runs from one start "
              "and keep the mean of their weights: N× the training time, one model's query time [default: 1]")] = None,
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
          device: DeviceOpt = "auto", workers: WorkersOpt = 2,
          seed: Annotated[int, typer.Option("--seed", help="split (and initialisation) seed")] = 0,
          val_fraction: ValFractionOpt = None, test_fraction: TestFractionOpt = None,
          folds: FoldsOpt = None, fold: FoldOpt = None,
          select: Annotated[str | None, typer.Option(
              "--select", show_default=False, help="which epoch to keep: last (of the fixed schedule) or best "
              "(validation AUC) [default: last]")
          ] = None,
          ema: Annotated[bool | None, typer.Option(
              "--ema/--no-ema", show_default=False, help="keep an exponential moving average of the weights "
              "[default: ema from pretrained weights, no-ema from random weights]")] = None,
          augment: Annotated[str | None, typer.Option(
              "--augment", show_default=False, help="basic, strong (also window, resolution, blur, noise, JPEG) or "
              "none (with --encoder: each image is encoded once) [default: basic]")] = None,
          metric_loss: Annotated[str | None, typer.Option(
              "--metric-loss", show_default=False, help="none, or supcon (supervised contrastive loss on the "
              "embedding) [default: none]")] = None,
          balanced: Annotated[bool | None, typer.Option(
              "--balanced/--no-balanced", show_default=False, help="class-balanced batches (binary and hash) [default: "
              "no-balanced]")] = None,
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
    from dataclasses import replace

    from cbir.data.layout import load_dataset
    from cbir.data.splits import SplitSpec
    from cbir.models import ModelConfig, get_task
    from cbir.models.detector_config import DetectorConfig
    from cbir.train import TrainSettings, train_model
    from cbir.train.selection import SELECT_RULES
    from cbir.train.settings import DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE, EMA_WITH_ENCODER
    given_backbone = backbone
    backbone = backbone or (DetectorConfig().backbone if get_task(task).boxes else DEFAULT_BACKBONE)
    _check_weight_options(backbone, random_init, pretrained, weights, init, encoder, task)
    finds_boxes = get_task(task).boxes  # a bad --task/--bits/--intensity fails before the dataset is read
    if retrieval == "encoder" and encoder is None:
        raise CbirError("--retrieval encoder: retrieves by a frozen encoder's features; give --encoder FILE")
    if ema and encoder is not None:
        raise CbirError(EMA_WITH_ENCODER)
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
                "freeze_bn": defaults.freeze_bn if freeze_bn is None else freeze_bn,
                "probe_epochs": defaults.probe_epochs if probe_epochs is None else probe_epochs}
    try:  # a bad --augment/--metric-loss/--balanced/--probe-epochs fails before the dataset is read
        given_settings = TrainSettings(
            augment=augment or defaults.augment, metric_loss=metric_loss or defaults.metric_loss,
            balanced=defaults.balanced if balanced is None else balanced, probe_epochs=transfer["probe_epochs"],
            epochs=defaults.epochs if epochs is None else epochs,
            average_runs=defaults.average_runs if average_runs is None else average_runs)
        given_settings.validate()
        given_settings.check_task(get_task(task))
    except ValueError as exc:
        raise CbirError(str(exc)) from None
    if init is not None:  # a missing, corrupt or mismatched run fails before the dataset is read
        from cbir.train.pretrain import read_run
        if finds_boxes:
            raise CbirError("--init: the detector trains from scratch; --init is for binary, hash and multilabel")
        if pretrained or weights:
            raise CbirError("--init replaces --pretrained/--weights: give one of them")
        read_run(init, backbone)
    given = {k: v for k, v in split_options(seed, val_fraction, test_fraction, folds, fold).items() if v is not None}
    spec = SplitSpec().replace(**given)
    records = load_dataset(data, layout, split=spec, patient_regex=patient_regex)
    records.require_labels("training")
    reporter = make_reporter()
    for note in records.notes:
        reporter.log(f"note: {note}")
    appearance: dict[str, Any] = {
        k: v for k, v in (("appearance_size", appearance_size), ("appearance_weight", appearance_weight),
                          ("appearance_window", appearance_window)) if v is not None}
    settings = replace(given_settings, batch_size=batch_size, lr=lr, device=device, workers=workers, seed=seed,
                       pretrained=pretrained, weights=str(weights) if weights else None,
                       select=select or defaults.select, ema=defaults.ema if ema is None else ema,
                       init=str(init) if init else None, random_init=random_init, reader=settings_of(ctx).reader,
                       **transfer)
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
    kept = "the last" if settings.select == "last" else "the best validation AUC"
    out.print(f"model {result.fingerprint} saved to {out_dir} (kept epoch {result.best_epoch}: {kept}, --select "
              f"{settings.select}; its val AUC {auc}; {result.seconds:.0f} s)", markup=False)


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
    check_packaged(backbone)


def check_packaged(backbone: str) -> None:
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
