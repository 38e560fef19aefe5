"""The embedding's appearance part: the cosine it gives, its fit on training images, old checkpoints, reuse."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.data.layout import load_dataset
from cbir.data.records import Records
from cbir.data.splits import SplitSpec
from cbir.data.synth import synth_dataset
from cbir.data.transforms import standardize
from cbir.errors import CbirError
from cbir.io import ReaderPolicy
from cbir.models import ModelConfig, create_model, load_checkpoint, save_checkpoint
from cbir.models.appearance import Appearance, centre_window, tiny_image
from cbir.train import TrainSettings, train_model
from cbir.train.loop import preload
from cbir.train.reuse import finished_run, reusable_run

TINY = ModelConfig(backbone="test_resnet", image_size=32, embed_dim=8, bits=16, appearance_size=4,
                   appearance_weight=0.4)


@pytest.fixture(scope="module")
def rsna(tmp_path_factory: pytest.TempPathFactory) -> Records:
    root = tmp_path_factory.mktemp("appearance") / "rsna"
    synth_dataset("rsna", 40, 32, root, seed=3)
    return load_dataset(root, "rsna")


def test_cosine_is_the_weighted_sum_of_both_parts() -> None:
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    model.appearance.mean.copy_(torch.randn(16) * 0.1)
    x = standardize(torch.rand(5, 1, 32, 32))
    with torch.no_grad():
        out = model(x)
        appearance = model.appearance(x)
    assert out.embedding.shape == (5, 8 + 16) == (5, TINY.vector_dim)
    assert torch.allclose(out.embedding.norm(dim=1), torch.ones(5), atol=1e-5)
    both = out.embedding @ out.embedding.T
    parts = 0.6 * (out.semantic @ out.semantic.T) + 0.4 * (appearance @ appearance.T)
    assert torch.allclose(both, parts, atol=1e-5)
    assert torch.equal(out.code, (out.embedding @ model.code_projection > 0).to(torch.uint8))


def test_the_centre_window_weighs_the_border_less() -> None:
    window = centre_window(16, 1.0).view(16, 16)
    assert float(window[7, 7]) > 0.99 and float(window[0, 0]) < float(window[0, 8]) < float(window[7, 7])
    assert torch.allclose(window, window.flip(0)) and torch.allclose(window, window.T)
    assert torch.equal(centre_window(4, 0.0), torch.ones(16))


def test_tiny_image_keeps_layout_that_pooled_features_lose() -> None:
    image = torch.zeros(1, 1, 32, 32)
    image[..., :, :16] = 1.0                       # left half bright
    mirrored = torch.flip(image, dims=[3])         # right half bright: the same pixel histogram
    a, b = tiny_image(standardize(image), 4), tiny_image(standardize(mirrored), 4)
    assert a.shape == (1, 16) and float(torch.nn.functional.cosine_similarity(a, b)) < -0.9


def test_fit_sets_the_mean_tiny_image() -> None:
    images = torch.rand(7, 1, 32, 32).half()
    part = Appearance(4)
    part.fit(images, standardize, batch_size=3)
    expected = tiny_image(standardize(images.float()), 4).mean(dim=0)
    assert torch.allclose(part.mean, expected, atol=1e-5)


def test_training_fits_the_mean_on_the_train_split(rsna: Records, tmp_path: Path) -> None:
    result = train_model(rsna, TINY, TrainSettings(epochs=1, batch_size=8, workers=0), tmp_path / "run")
    loaded = load_checkpoint(result.out)
    x_train, _, _ = preload(rsna.split("train"), 32, TrainSettings(workers=0), _quiet(), "train")
    expected = tiny_image(standardize(x_train.float()), 4).mean(dim=0)
    assert torch.allclose(loaded.model.appearance.mean, expected, atol=1e-4)
    saved = json.loads((result.out / "config.json").read_text())
    assert saved["appearance_size"] == 4 and saved["appearance_weight"] == 0.4 and saved["appearance_window"] == 1.0


def test_a_config_without_the_fields_is_an_old_checkpoint_and_keeps_its_fingerprint(tmp_path: Path) -> None:
    old = ModelConfig(backbone="test_resnet", image_size=32, embed_dim=8, bits=16, appearance_size=0)
    fingerprint = save_checkpoint(create_model(old), tmp_path / "old")
    data = json.loads((tmp_path / "old" / "config.json").read_text())
    assert "appearance_size" not in data and "appearance_weight" not in data
    loaded = load_checkpoint(tmp_path / "old")
    assert loaded.fingerprint == fingerprint and not loaded.config.has_appearance
    assert loaded.model.appearance is None and loaded.config.vector_dim == 8
    out = loaded.model(torch.rand(2, 1, 32, 32))
    assert torch.equal(out.embedding, out.semantic)


def test_bad_appearance_settings_are_refused() -> None:
    for size, weight in ((-1, 0.5), (4, 1.0), (4, -0.1)):
        with pytest.raises(CbirError, match="appearance"):
            ModelConfig(appearance_size=size, appearance_weight=weight).validate()


def test_a_run_without_it_is_reused_and_refitted_in_place(rsna: Records, tmp_path: Path) -> None:
    plain = ModelConfig(**(TINY.to_dict() | {"appearance_size": 0, "appearance_weight": 0.0}))
    settings = TrainSettings(epochs=1, batch_size=8, workers=0)
    train_model(rsna, plain, settings, tmp_path / "run")
    trained = load_checkpoint(tmp_path / "run")
    wanted = {"backbone": "test_resnet", "appearance_size": 4, "appearance_weight": 0.4,
              "appearance_window": TINY.appearance_window}
    assert finished_run(tmp_path / "run", wanted, {"epochs": 1}, rsna.split_record()) is None
    seconds = reusable_run(tmp_path / "run", wanted, {"epochs": 1}, rsna)
    assert seconds is not None and seconds > 0
    refitted = load_checkpoint(tmp_path / "run")
    assert refitted.config.appearance_size == 4 and refitted.fingerprint != trained.fingerprint
    fresh = load_checkpoint(train_model(rsna, TINY, settings, tmp_path / "fresh").out)
    x = standardize(torch.rand(3, 1, 32, 32))
    with torch.no_grad():  # the same seed trains the same weights: refitting equals training with it
        assert torch.allclose(refitted.model(x).embedding, fresh.model(x).embedding, atol=1e-5)
    assert finished_run(tmp_path / "run", wanted, {"epochs": 1}, rsna.split_record()) is not None
    other = wanted | {"appearance_size": 8}
    assert reusable_run(tmp_path / "run", other, {"epochs": 1}, rsna) is None   # another part: train afresh


def test_a_reused_run_gets_the_calibration_training_fits(tmp_path: Path) -> None:
    """`--reuse` of a run trained before `cbir train` fitted calibration.json, or whose appearance part was refitted
    (a new fingerprint: the old file no longer applies): before, it was evaluated on its raw score at 0.5, while
    a fresh run is read calibrated at the validation prevalence."""
    synth_dataset("rsna", 60, 32, tmp_path / "rsna", seed=5)
    rsna = load_dataset(tmp_path / "rsna", "rsna", split=SplitSpec(val_fraction=0.5))
    train_model(rsna, TINY, TrainSettings(epochs=1, batch_size=8, workers=0), tmp_path / "run")
    original = load_checkpoint(tmp_path / "run").calibration
    assert original is not None
    (tmp_path / "run" / "calibration.json").unlink()            # as a run from before the calibration
    assert load_checkpoint(tmp_path / "run").calibration is None
    wanted = {"backbone": "test_resnet"} | {k: v for k, v in TINY.to_dict().items() if k.startswith("appearance_")}
    assert reusable_run(tmp_path / "run", wanted, {"epochs": 1}, rsna) is not None
    refitted = load_checkpoint(tmp_path / "run").calibration
    assert refitted is not None and refitted.n_val == original.n_val
    assert math.isclose(refitted.a, original.a, rel_tol=1e-4) and math.isclose(refitted.b, original.b, rel_tol=1e-4)
    # a run given a new appearance part: a new fingerprint, so its old calibration.json is stale and refitted
    plain = ModelConfig(**(TINY.to_dict() | {"appearance_size": 0, "appearance_weight": 0.0}))
    train_model(rsna, plain, TrainSettings(epochs=1, batch_size=8, workers=0), tmp_path / "plain")
    assert reusable_run(tmp_path / "plain", wanted, {"epochs": 1}, rsna) is not None
    again = load_checkpoint(tmp_path / "plain")
    assert again.config.has_appearance and again.calibration is not None
    assert again.calibration.fingerprint == again.fingerprint

    # a run whose train.json predates a settings field (here `reader`) counts as trained with its default
    summary = json.loads((tmp_path / "plain" / "train.json").read_text())
    summary["settings"].pop("reader")
    (tmp_path / "plain" / "train.json").write_text(json.dumps(summary))
    assert finished_run(tmp_path / "plain", {}, asdict(TrainSettings(epochs=1, batch_size=8, workers=0)),
                        rsna.split_record()) is not None
    assert finished_run(tmp_path / "plain", {}, asdict(TrainSettings(epochs=1, batch_size=8, workers=0,
                                                                     reader=ReaderPolicy(any_modality=True))),
                        rsna.split_record()) is None

def test_untrained_baseline_is_saved_without_training(rsna: Records, tmp_path: Path) -> None:
    result = train_model(rsna, TINY, TrainSettings(epochs=0, batch_size=8, workers=0), tmp_path / "untrained")
    assert result.best_epoch == 0 and len(result.history) == 1 and result.history[0]["train_loss"] is None
    loaded = load_checkpoint(result.out)
    norms = [m for m in loaded.model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in norms)  # never trained
    assert loaded.model.appearance is not None and float(loaded.model.appearance.mean.abs().sum()) > 0
    assert not math.isnan(np.float64(result.history[0]["val_loss"]))


def _quiet():  # noqa: ANN202 - the console's silent reporter
    from cbir.console import QUIET
    return QUIET


def test_cli_options_reach_the_config_and_bad_ones_are_one_line(rsna: Records, tmp_path: Path) -> None:
    from tests.conftest import run_cli
    base = ("train", "--data", rsna.root, "--layout", "rsna", "--backbone", "test_resnet", "--image-size", 32,
            "--workers", 0)
    code, out, err = run_cli(*base, "--epochs", 0, "--appearance-size", 8, "--appearance-weight", 0.3,
                             "--appearance-window", 0, "--out", tmp_path / "m")
    assert code == 0, err
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (saved["appearance_size"], saved["appearance_weight"], saved["appearance_window"]) == (8, 0.3, 0)
    assert json.loads((tmp_path / "m" / "train.json").read_text())["history"][0]["epoch"] == 0
    code, _, err = run_cli(*base, "--task", "detection", "--epochs", 0, "--out", tmp_path / "d")
    assert code == 2 and "--epochs 0" in err and "Traceback" not in err
    code, _, err = run_cli(*base, "--task", "detection", "--appearance-size", 8, "--out", tmp_path / "d")
    assert code == 2 and "no appearance part" in err
    code, _, err = run_cli(*base, "--appearance-weight", 1.5, "--out", tmp_path / "w")
    assert code == 2 and "Traceback" not in err and not (tmp_path / "w").exists()
