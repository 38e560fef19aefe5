"""The training loop on a tiny synthetic set: selection, logs, and the clear errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.data.layout import load_dataset
from cbir.data.records import Records
from cbir.data.synth import synth_dataset
from cbir.errors import DatasetError
from cbir.models import ModelConfig, load_checkpoint
from cbir.train import TrainSettings, train_model

CONFIG = ModelConfig(backbone="test_resnet", image_size=32, embed_dim=8, bits=16)
SETTINGS = TrainSettings(epochs=2, batch_size=8, workers=0)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Records:
    root = tmp_path_factory.mktemp("train") / "rsna"
    synth_dataset("rsna", 48, 32, root, seed=5)
    return load_dataset(root, "rsna")


def test_best_epoch_by_validation_auc(records: Records, tmp_path: Path) -> None:
    result = train_model(records, CONFIG, replace(SETTINGS, select="best"), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    ranked = max(rows, key=lambda r: (r["val_auc"] if r["val_auc"] is not None else -1, -r["val_loss"]))
    assert result.best_epoch == ranked["epoch"]  # best AUC; lower loss breaks a tie
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["best_epoch"] == result.best_epoch and summary["n_train"] == result.n_train
    assert load_checkpoint(tmp_path / "run").fingerprint == result.fingerprint


def test_the_default_keeps_the_last_epoch_and_ema_is_an_option(records: Records, tmp_path: Path) -> None:
    result = train_model(records, CONFIG, replace(SETTINGS, epochs=3), tmp_path / "last")
    rows = [json.loads(line) for line in (tmp_path / "last" / "metrics.jsonl").read_text().splitlines()]
    assert TrainSettings().select == "last" and result.best_epoch == 3
    assert json.loads((tmp_path / "last" / "train.json").read_text())["effective_settings"]["ema"] is False
    last_auc = rows[-1]["val_auc"]  # None when this tiny validation split holds one class
    assert math.isnan(result.best_val_auc) if last_auc is None else result.best_val_auc == pytest.approx(last_auc)
    ema = train_model(records, CONFIG, replace(SETTINGS, epochs=3, ema=True), tmp_path / "ema")
    plain = load_checkpoint(tmp_path / "last").model.state_dict()
    averaged = load_checkpoint(tmp_path / "ema").model.state_dict()
    assert ema.best_epoch == 3 and set(plain) == set(averaged)  # the same model, other weights
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain if plain[k].is_floating_point())
    assert json.loads((tmp_path / "ema" / "train.json").read_text())["settings"]["ema"] is True


def test_single_class_validation_selects_by_loss(records: Records, tmp_path: Path) -> None:
    meta = records.meta.copy()
    negatives_in_val = (meta["split"] == "val") & (records.y == 0)
    meta.loc[(meta["split"] == "val") & ~negatives_in_val, "split"] = "train"
    one_class = Records(records.root, records.dataset, records.layout, records.label_names, records.labels, meta,
                        records.target)
    result = train_model(one_class, CONFIG, replace(SETTINGS, select="best"), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_auc"] is None for r in rows) and math.isnan(result.best_val_auc)
    assert result.best_epoch == 1 + int(np.argmin([r["val_loss"] for r in rows]))


def test_train_split_with_one_class_is_refused(records: Records, tmp_path: Path) -> None:
    only_negative = records.subset(records.y == 0)
    with pytest.raises(DatasetError, match="only one class"):
        train_model(only_negative, CONFIG, SETTINGS, tmp_path / "run")
