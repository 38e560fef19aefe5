"""Input intensity options (`ModelConfig.intensity`, `cbir.data.transforms.model_input`): equalisation, CLAHE,
and their round trip through training, the checkpoint and embedding."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.data.layout import load_dataset
from cbir.data.synth import synth_dataset
from cbir.data.transforms import INTENSITIES, clahe, equalize, model_input, standardize
from cbir.embed import embed_batches
from cbir.errors import CbirError
from cbir.models import ModelConfig, create_model, load_checkpoint
from cbir.models.checkpoint import save_checkpoint
from cbir.train import TrainSettings, train_model
from tests.conftest import run_cli


def _images(n: int = 3, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 0.98 + 0.01


def test_equalize_ignores_a_monotonic_intensity_change() -> None:
    x = _images()
    out = equalize(x)
    assert torch.allclose(equalize(x ** 0.7), out, atol=1e-3)
    assert torch.allclose(model_input(x ** 0.7, "equalize"), model_input(x, "equalize"), atol=1e-2)
    assert not torch.allclose(standardize(x ** 0.7), standardize(x), atol=1e-2)  # what equalisation removes
    ranks = out.flatten(1).sort(dim=1).values
    assert torch.allclose(ranks, torch.arange(1, ranks.shape[1] + 1).float().expand_as(ranks) / ranks.shape[1])


def test_equalize_leaves_padding_out_of_the_cdf() -> None:
    x = _images(2)
    padded = torch.zeros(2, 1, 40, 80)
    padded[..., 20:60] = x
    out = equalize(padded)
    assert torch.allclose(out[..., 20:60], equalize(x), atol=1e-6)  # half the image black changes nothing
    assert (out[..., :20] == 0).all() and (out[..., 60:] == 0).all()
    assert float(out[..., 20:60].min()) > 0


def test_clahe_shape_dtype_range_and_padding() -> None:
    x = torch.zeros(2, 1, 48, 64)
    x[..., 8:40, :] = _images(2, 32)[..., :32].repeat(1, 1, 1, 2)
    out = clahe(x)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert (out[..., :8, :] == 0).all()  # padding stays black
    prepared = model_input(x, "clahe")
    assert torch.isfinite(prepared).all()
    assert torch.allclose(prepared.flatten(1).std(dim=1), torch.ones(2), atol=1e-3)


def test_clahe_limits_contrast_where_global_equalisation_stretches_it() -> None:
    # a nearly flat image: faint noise over 3 of 256 grey levels
    flat = 0.5 + torch.randint(0, 3, (1, 1, 64, 64), generator=torch.Generator().manual_seed(2)).float() / 255
    spread = float(equalize(flat).max() - equalize(flat).min())
    limited = float(clahe(flat, clip_limit=2.0).max() - clahe(flat, clip_limit=2.0).min())
    assert spread > 0.5
    assert limited <= 3 * (2.0 + 1) / 256 + 1e-4  # each map rises at most (clip + 1)/bins per level
    assert float(clahe(flat, clip_limit=40.0).max() - clahe(flat, clip_limit=40.0).min()) > limited


def test_clahe_adapts_to_the_local_histogram() -> None:
    # the same grey level comes out brighter among dark neighbours than among bright ones (globally: equal)
    generator = torch.Generator().manual_seed(3)
    x = torch.empty(1, 1, 128, 128)
    x[..., :64] = 0.2 + torch.rand(1, 1, 128, 64, generator=generator) * 0.1
    x[..., 64:] = 0.7 + torch.rand(1, 1, 128, 64, generator=generator) * 0.1
    x[..., 60, 8] = x[..., 60, 120] = 0.5
    out, flat = clahe(x), equalize(x)
    assert float(out[..., 60, 8]) > float(out[..., 60, 120]) + 0.1
    assert float(flat[..., 60, 8]) == float(flat[..., 60, 120])


def test_model_input_registry_and_unknown_value() -> None:
    x = _images()
    assert set(INTENSITIES) == {"standardize", "equalize", "clahe", "unit"}
    assert torch.equal(model_input(x), standardize(x))
    assert model_input(x, "unit") is x   # a frozen encoder's: its input contract normalises
    with pytest.raises(ValueError, match="intensity"):
        model_input(x, "gamma")


def test_config_rejects_an_unknown_intensity_and_old_configs_read_as_standardize(tmp_path: Path) -> None:
    with pytest.raises(CbirError, match="unknown intensity 'gamma'") as err:
        ModelConfig(intensity="gamma").validate()
    assert "\n" not in str(err.value)
    config = ModelConfig(backbone="test_resnet", image_size=32, embed_dim=8, bits=16)
    save_checkpoint(create_model(config), tmp_path / "old")
    held = json.loads((tmp_path / "old" / "config.json").read_text())
    assert "intensity" not in held  # the default is written as before the field existed: same fingerprint
    assert ModelConfig.from_dict(held).intensity == "standardize"
    assert load_checkpoint(tmp_path / "old").config.intensity == "standardize"
    assert ModelConfig.from_dict(ModelConfig(intensity="clahe").to_dict()).intensity == "clahe"


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("intensity") / "rsna"
    synth_dataset("rsna", 32, 32, root, seed=7)
    return load_dataset(root, "rsna")


def test_training_with_equalize_records_it_and_embeds_with_it(records, tmp_path: Path) -> None:  # noqa: ANN001
    config = ModelConfig(backbone="test_resnet", image_size=32, embed_dim=8, bits=16, intensity="equalize")
    train_model(records, config, TrainSettings(epochs=1, batch_size=8, workers=0), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["intensity"] == "equalize"
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.config.intensity == "equalize"
    paths = records.meta["path"].tolist()[:4]
    embedded = [e for batch, _ in embed_batches(loaded, paths, batch_size=4, workers=0) for e in batch]
    assert len(embedded) == 4 and all(np.isfinite(e.embedding).all() for e in embedded)
    # the embedding is the model's on equalised inputs, not on merely standardised ones
    as_standardized = replace(loaded, config=replace(loaded.config, intensity="standardize"))
    other = [e for batch, _ in embed_batches(as_standardized, paths, batch_size=4, workers=0) for e in batch]
    assert not np.allclose(np.stack([e.embedding for e in embedded]), np.stack([e.embedding for e in other]),
                           atol=1e-4)


def test_cli_train_intensity(tmp_path: Path) -> None:
    data = tmp_path / "rsna"
    assert run_cli("synth", "--layout", "rsna", "--n", 24, "--size", 32, "--out", data, "--seed", 3)[0] == 0
    code, _, err = run_cli("train", "--data", data, "--out", tmp_path / "bad", "--intensity", "gamma")
    assert code == 2 and "unknown intensity 'gamma'" in err and not (tmp_path / "bad").exists()
    code, _, err = run_cli("train", "--data", data, "--out", tmp_path / "run", "--backbone", "test_resnet",
                           "--image-size", 32, "--epochs", 1, "--batch-size", 8, "--workers", 0,
                           "--intensity", "clahe")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["intensity"] == "clahe"
