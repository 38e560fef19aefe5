"""The three training tasks (binary, hash, multilabel) end to end on tiny synthetic sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cbir.cli.main import app
from cbir.console import QUIET
from cbir.data.layout import load_dataset
from cbir.data.records import Records
from cbir.data.synth import synth_dataset
from cbir.data.transforms import standardize
from cbir.errors import CbirError
from cbir.models import ModelConfig, load_checkpoint
from cbir.train import TrainSettings, train_model
from cbir.train.loop import preload

SETTINGS = TrainSettings(epochs=1, batch_size=8, workers=0)
runner = CliRunner()


def run(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def rsna(tmp_path_factory: pytest.TempPathFactory) -> Records:
    root = tmp_path_factory.mktemp("tasks") / "rsna"
    synth_dataset("rsna", 48, 32, root, seed=5)
    return load_dataset(root, "rsna")


@pytest.fixture(scope="module")
def nih(tmp_path_factory: pytest.TempPathFactory) -> Records:
    root = tmp_path_factory.mktemp("tasks") / "nih"
    synth_dataset("nih", 60, 32, root, seed=2)
    return load_dataset(root, "nih")


def _config(task: str, records: Records, bits: int = 16) -> ModelConfig:
    return ModelConfig(backbone="test_resnet", task=task, image_size=32, embed_dim=8, bits=bits,
                       label_names=list(records.label_names), target=records.target)


def _pixels(records: Records) -> torch.Tensor:
    x, _, _ = preload(records, 32, SETTINGS, QUIET, "all")
    return standardize(x.float())


@pytest.mark.parametrize("task", ["binary", "hash", "multilabel"])
def test_task_trains_and_reloads_bit_identical(task: str, rsna: Records, tmp_path: Path) -> None:
    result = train_model(rsna, _config(task, rsna), SETTINGS, tmp_path / "run")
    loaded = load_checkpoint(result.out)
    assert loaded.config.task == task
    x = _pixels(rsna.subset(np.arange(6)))
    a = loaded.model(x)
    b = load_checkpoint(result.out).model(x)
    assert a.embedding.shape == (6, loaded.config.vector_dim) and a.code.shape == (6, 16) and a.logits.shape == (6, 1)
    assert a.semantic is not None and a.semantic.shape == (6, 8)
    assert (a.hash is not None) == (task == "hash")
    for name in ("embedding", "logits", "code"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("bits", [8, 300])
def test_hash_bits_outside_16_to_256_are_one_line(bits: int, rsna: Records, tmp_path: Path) -> None:
    with pytest.raises(CbirError, match=r"outside 16\.\.256"):
        _config("hash", rsna, bits).validate()
    code, _, err = run("train", "--data", rsna.root, "--out", tmp_path / "m", "--task", "hash", "--bits", bits)
    assert code == 2 and "16..256" in err and len(err.strip().splitlines()) == 1


def test_unknown_task_is_refused() -> None:
    with pytest.raises(CbirError, match="unknown task"):
        ModelConfig(task="regression").validate()


def test_hash_codes_are_balanced(rsna: Records, tmp_path: Path) -> None:
    settings = TrainSettings(epochs=2, batch_size=16, workers=0)
    result = train_model(rsna, _config("hash", rsna, bits=16), settings, tmp_path / "run")
    model = load_checkpoint(result.out).model
    with torch.no_grad():
        ones = model(_pixels(rsna)).code.float().mean(dim=0)
    assert ((ones >= 0.2) & (ones <= 0.8)).all(), ones.tolist()


def test_multilabel_on_nih_logs_per_class_auc(nih: Records, tmp_path: Path) -> None:
    config = _config("multilabel", nih)
    assert config.num_outputs == 14 and config.target_index == nih.label_names.index("Pneumonia")
    meta = nih.meta.copy()  # the NIH lists leave almost nothing for validation in so small a set
    meta.loc[(meta["split"] == "train") & (meta.index % 3 == 0), "split"] = "val"
    records = Records(nih.root, nih.dataset, nih.layout, nih.label_names, nih.labels, meta, nih.target)
    result = train_model(records, config, SETTINGS, tmp_path / "run")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    per_class = row["val_auc_per_class"]
    assert list(per_class) == nih.label_names
    defined = [v for v in per_class.values() if v is not None]
    assert defined and row["val_auc"] == pytest.approx(float(np.mean(defined)))
    assert load_checkpoint(result.out).model(_pixels(nih.subset(np.arange(3)))).logits.shape == (3, 14)


def _pipeline(data: Path, layout: str, task: str, root: Path) -> dict:
    model, index = root / "model", root / "index"
    code, _, err = run("train", "--data", data, "--layout", layout, "--task", task, "--bits", 16, "--backbone",
                       "test_resnet", "--image-size", 32, "--epochs", 1, "--embed-dim", 8, "--batch-size", 8,
                       "--out", model, "--workers", 0)
    assert code == 0, err
    code, _, err = run("ingest", "--data", data, "--layout", layout, "--model", model, "--index", index,
                       "--collection", task, "--workers", 0)
    assert code == 0, err
    code, out, err = run("evaluate", "--index", index, "--collection", task, "--k", 5, "--out", root / "report",
                         "--json")
    assert code == 0, err
    return json.loads(out)


def test_hash_through_ingest_and_evaluate(rsna: Records, tmp_path: Path) -> None:
    report = _pipeline(rsna.root, "rsna", "hash", tmp_path)
    for key in ("hamming_map_at_k", "prefilter_knn_accuracy", "knn_accuracy", "map_at_k"):
        assert 0.0 <= report["stage2"][key] <= 1.0, key
    from cbir.store import open_index
    with open_index(str(tmp_path / "index")) as index:
        meta = index.get_meta("hash")
        point = next(iter(index.scroll("hash", with_vectors=True)))
    assert meta["task"] == "hash" and meta["bits"] == 16 and point.code.shape == (16,)
    assert "Hamming ranking" in (tmp_path / "report" / "report.md").read_text()


def test_multilabel_through_ingest_and_evaluate(nih: Records, tmp_path: Path) -> None:
    report = _pipeline(nih.root, "nih", "multilabel", tmp_path)
    assert set(report["stage1"]["per_class_auc"]) == set(nih.label_names)
    assert 0.0 <= report["stage2"]["map_at_k_any_finding"] <= 1.0
    assert 0.0 <= report["stage2"]["knn_accuracy"] <= 1.0
    from cbir.store import open_index
    with open_index(str(tmp_path / "index")) as index:
        points = list(index.scroll("multilabel", with_vectors=False))
    for point in points[:5]:
        probabilities = point.payload["probabilities"]
        assert list(probabilities) == nih.label_names
        assert point.payload["probability"] == probabilities["Pneumonia"]
    assert "any shared finding" in (tmp_path / "report" / "report.md").read_text()


def test_the_registry_knows_the_four_tasks_and_refuses_others_in_one_line(tmp_path: Path) -> None:
    from cbir.models import TASKS, get_task, register_task

    assert list(TASKS) == ["binary", "hash", "multilabel", "detection"]
    assert get_task("hash").hash_layer and get_task("multilabel").per_label and get_task("detection").boxes
    assert not any((get_task("binary").hash_layer, get_task("binary").per_label, get_task("binary").boxes))
    with pytest.raises(CbirError, match=r"^unknown task 'regression' \(choose from binary, hash, multilabel, "
                                        r"detection\)$"):
        get_task("regression")
    with pytest.raises(ValueError, match="already registered"):
        register_task(get_task("binary"))
    with pytest.raises(CbirError, match="does not train a CbirNet"):
        ModelConfig(task="detection").validate()
    code, _, err = run("train", "--data", tmp_path, "--out", tmp_path / "m", "--task", "regression")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "choose from binary, hash, multilabel, detection" in err


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_a_loaded_model_knows_its_task(task: str, rsna: Records, tmp_path: Path) -> None:
    from cbir.models import get_task, save_checkpoint
    from cbir.models.factory import create_model

    save_checkpoint(create_model(_config(task, rsna)), tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["task"] == task   # stored as its name
    assert load_checkpoint(tmp_path / "m").task is get_task(task)
