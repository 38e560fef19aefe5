"""Retrieval training options: supervised contrastive loss, class-balanced batches, strong augmentation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cbir.data.transforms import augment_strong
from cbir.models.losses import label_groups, supervised_contrastive_loss
from cbir.train.classifier import batch_order
from tests.conftest import run_cli


def test_supcon_by_hand_and_patients_are_never_negatives() -> None:
    e = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    labels, patients = torch.tensor([1, 1, 0]), torch.tensor([0, 1, 2])
    t = 0.5
    sims = e @ e.T / t
    # anchors 0 and 1 have one positive each; anchor 2 has none and is left out
    expect = -0.5 * sum(float(sims[i, j] - torch.logsumexp(sims[i][torch.arange(3) != i], 0))
                        for i, j in ((0, 1), (1, 0)))
    assert math.isclose(float(supervised_contrastive_loss(e, labels, patients, t)), expect, rel_tol=1e-5)
    # image 2 from patient 1 with another label: now a positive of image 1, no longer a negative
    same = supervised_contrastive_loss(e, labels, torch.tensor([0, 1, 1]), t)
    assert float(same) != float(supervised_contrastive_loss(e, labels, patients, t))
    assert float(supervised_contrastive_loss(e[:1], labels[:1], patients[:1])) == 0.0


def test_balanced_order_draws_each_class_equally() -> None:
    y = torch.tensor([[1.0]] * 10 + [[0.0]] * 30)
    order = batch_order(y, True, torch.Generator().manual_seed(0))
    groups = label_groups(y[order])
    assert len(order) == 60 and int((groups == 1).sum()) == 30 and len(set(order.tolist())) == 40


def test_strong_augmentation_keeps_shape_and_range_and_changes_the_image() -> None:
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    out = augment_strong(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert float((out - x).abs().mean()) > 0.01


def test_train_with_the_retrieval_recipe(tmp_path) -> None:
    data, model = tmp_path / "data", tmp_path / "model"
    assert run_cli("synth", "--layout", "rsna", "--n", 40, "--size", 48, "--out", data, "--seed", 9)[0] == 0
    code, _, err = run_cli("train", "--data", data, "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1,
                           "--embed-dim", 16, "--bits", 32, "--out", model, "--workers", 0, "--augment", "strong",
                           "--metric-loss", "supcon", "--balanced")
    assert code == 0, err
    import json
    settings = json.loads((model / "train.json").read_text())["settings"]
    assert (settings["augment"], settings["metric_loss"], settings["balanced"]) == ("strong", "supcon", True)
    code, _, err = run_cli("train", "--data", data, "--out", tmp_path / "m2", "--metric-loss", "triplet")
    assert code == 2 and "metric_loss" in err and len(err.strip().splitlines()) == 1


def test_balanced_is_refused_for_multilabel(tmp_path) -> None:
    """Balancing 14 labels' combinations would repeat the rarest dozens of times per epoch: refused in one line,
    before any image is read (the folder does not even exist)."""
    code, _, err = run_cli("train", "--data", tmp_path / "absent", "--task", "multilabel", "--balanced",
                           "--out", tmp_path / "m")
    assert code == 2 and "--balanced" in err and "multilabel" in err and len(err.strip().splitlines()) == 1


def test_the_detector_refuses_the_classifier_training_options(tmp_path) -> None:
    """The detector has its own box-aware augmentation: --augment/--metric-loss/--balanced would be silently
    ignored yet recorded in train.json, so each is refused in one line, before any image is read."""
    for extra in (("--augment", "strong"), ("--metric-loss", "supcon"), ("--balanced",)):
        code, _, err = run_cli("train", "--data", tmp_path / "absent", "--task", "detection", *extra,
                               "--out", tmp_path / "m")
        assert code == 2 and "the detector" in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_the_library_refuses_them_too(tmp_path) -> None:
    """`train_model` makes the same check (`TrainSettings.check_task`) before any image is decoded."""
    from cbir.data.layout import load_dataset
    from cbir.models import ModelConfig
    from cbir.models.detector_config import DetectorConfig
    from cbir.train import TrainSettings, train_model
    assert run_cli("synth", "--layout", "rsna", "--n", 12, "--size", 32, "--out", tmp_path / "d", "--seed", 3)[0] == 0
    records = load_dataset(tmp_path / "d", "rsna")
    labels = {"label_names": list(records.label_names), "target": records.target}
    with pytest.raises(ValueError, match="--balanced"):
        train_model(records, ModelConfig(task="multilabel", backbone="test_resnet", **labels),
                    TrainSettings(balanced=True), tmp_path / "m")
    for option in ({"augment": "strong"}, {"metric_loss": "supcon"}, {"balanced": True}):
        with pytest.raises(ValueError, match="the detector"):
            train_model(records, DetectorConfig(**labels), TrainSettings(**option), tmp_path / "m")
    assert not (tmp_path / "m").exists()
