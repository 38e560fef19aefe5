"""The out-of-domain warning: the k-th nearest training image's cosine distance on the backbone's last two feature
stages (`cbir.models.domain`, `cbir.models.stages`), fitted at the end of training and checked by `cbir query`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.models.domain import DOMAIN, DomainModel
from tests.conftest import run_cli


def _features(rng: np.random.Generator, n: int, mixing: np.ndarray) -> np.ndarray:
    return (rng.normal(size=(n, mixing.shape[0])) @ mixing + 40.0).astype(np.float32)  # common mean: as features


def test_domain_model_fires_at_the_quantile_rate_and_on_far_points(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p = 96
    mixing = rng.normal(size=(p, p)) * np.linspace(2.0, 0.05, p)[:, None]   # correlated, uneven variances
    model = DomainModel.fit(_features(rng, 3000, mixing), _features(rng, 4000, mixing), quantile=0.99, k=5)
    assert model.reference.shape == (3000, p) and model.n_train == 3000 and model.n_val == 4000
    fresh = model.score(_features(rng, 20000, mixing))
    assert 0.005 < float((~model.in_domain(fresh)).mean()) < 0.02          # ≈ 1 − quantile of new in-domain points
    shifted = _features(rng, 200, mixing) * rng.choice([-1.0, 1.0], size=p)   # another source: other mean
    assert not model.in_domain(model.score(shifted)).any()
    assert not model.in_domain(model.score(-_features(rng, 50, mixing))).any()   # far away in angle
    model.save(tmp_path)
    back = DomainModel.load(tmp_path)
    assert back is not None and back.threshold == model.threshold and back.quantile == 0.99 and back.k == 5
    assert np.array_equal(back.reference, model.reference.astype(np.float16)) and back.n_val == 4000
    assert np.allclose(back.score(shifted), model.score(shifted), atol=2e-3)   # float16 storage
    assert DomainModel.load(tmp_path / "none") is None


def test_conformal_threshold_by_hand() -> None:
    from cbir.models.domain import conformal_threshold
    d = np.arange(1.0, 11.0)[::-1]                        # 10 distances, 1..10
    assert conformal_threshold(d, 0.5) == 6.0            # rank ⌈11 · 0.5⌉ = 6
    assert conformal_threshold(d, 0.9) == 10.0           # rank ⌈9.9⌉ = 10
    assert conformal_threshold(d, 0.995) == 10.0         # rank 11 > 10: the largest
    assert conformal_threshold(np.arange(199.0), 0.995) == 198.0
    assert conformal_threshold(np.arange(399.0), 0.995) == 397.0    # rank ⌈400 · 0.995⌉ = 398
    with pytest.raises(ValueError):
        conformal_threshold(np.array([]), 0.9)


def test_domain_model_by_hand_and_its_reference_cap() -> None:
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    model = DomainModel.fit(train, np.array([[1.0, 0.1]]), quantile=1.0, k=2)
    # the query's second-nearest training image is (0.8, 0.6): cosine 0.8
    assert model.score(np.array([[2.0, 0.0]]))[0] == pytest.approx(0.2, abs=1e-3)
    assert model.threshold == pytest.approx(float(model.score(np.array([[1.0, 0.1]]))[0]))
    rng = np.random.default_rng(1)
    capped = DomainModel.fit(rng.normal(size=(50, 8)), rng.normal(size=(5, 8)), max_reference=20)
    assert capped.reference.shape == (20, 8) and capped.n_train == 50 and np.isfinite(capped.threshold)
    with pytest.raises(ValueError):
        capped.score(np.zeros((1, 7)))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("domain")
    data, model, index = tmp / "data", tmp / "model", tmp / "index"
    assert run_cli("synth", "--layout", "rsna", "--n", 60, "--size", 64, "--out", data, "--seed", 3)[0] == 0
    code, out, err = run_cli("train", "--data", data, "--backbone", "test_resnet", "--random-init", "--image-size", 32,
                             "--epochs", 1, "--embed-dim", 16, "--bits", 32, "--out", model, "--workers", 0)
    assert code == 0, err
    assert "domain model: threshold" in out + err and "quantile of" in out + err
    code, _, err = run_cli("ingest", "--data", data, "--model", model, "--index", index, "--workers", 0)
    assert code == 0, err
    grey = tmp / "grey.png"
    noise = np.random.default_rng(0).integers(-2, 3, (64, 64))   # a uniform grey is refused as blank
    Image.fromarray((128 + noise).astype(np.uint8)).save(grey)
    import matplotlib.cbook
    photo = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return {"data": data, "model": model, "index": index, "grey": grey, "photo": photo}


def _vote(run: dict[str, Path], image: Path) -> dict:
    code, out, err = run_cli("query", image, "--index", run["index"], "--k", 5, "--json")
    assert code == 0, err
    return json.loads(out)["vote"]


def _a_training_image(run: dict[str, Path]) -> Path:
    from cbir.data.layout import load_dataset
    from cbir.data.splits import SplitSpec
    from cbir.models import load_checkpoint
    split = load_checkpoint(run["model"]).split
    assert split is not None
    records = load_dataset(run["data"], "rsna", SplitSpec.from_dict(split["spec"]))
    return Path(records.split("train").meta["path"].iloc[0])


def test_training_writes_a_domain_model_that_the_checkpoint_loads(run: dict[str, Path]) -> None:
    from cbir.models import load_checkpoint
    assert (run["model"] / DOMAIN).is_file()
    loaded = load_checkpoint(run["model"])
    assert loaded.domain is not None and loaded.domain.fingerprint == loaded.fingerprint
    stages = loaded.model.backbone.feature_info[-2:]   # test_resnet: layer3, layer4
    assert loaded.domain.features == "stages:" + ",".join(s["module"] for s in stages)
    assert loaded.domain.dim == sum(s["num_chs"] for s in stages) and np.isfinite(loaded.domain.threshold)
    assert loaded.domain.n_train > loaded.domain.n_val > 0 and loaded.domain.quantile == 0.995


def test_query_warns_on_images_unlike_the_training_images(run: dict[str, Path]) -> None:
    for image in (run["grey"], run["photo"]):
        v = _vote(run, image)
        assert v["in_domain"] is False and v["domain_distance"] > 0 and v["reliable"] is False, image
        assert any(w.startswith("unlike the model's training images") for w in v["warnings"]), v["warnings"]
        assert "close_case" in v
    v = _vote(run, _a_training_image(run))
    assert v["in_domain"] is True and isinstance(v["domain_distance"], float)
    assert not any(w.startswith("unlike") for w in v["warnings"])
    code, out, _ = run_cli("query", run["grey"], "--index", run["index"], "--k", 5)
    assert code == 0 and "warning: unlike the model's training images" in out


def test_a_checkpoint_without_a_domain_model_gives_no_verdict(run: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from cbir.models import load_checkpoint
    old = tmp_path / "old"
    shutil.copytree(run["model"], old)
    domain = DomainModel.load(old)
    assert domain is not None
    domain.fingerprint = "0" * 16          # fitted for other weights: stale, ignored
    domain.save(old)
    assert load_checkpoint(old).domain is None
    stale = DomainModel.load(run["model"])
    assert stale is not None
    stale.features = "pooled"              # fitted on other features: stale, ignored
    stale.save(old)
    assert load_checkpoint(old).domain is None
    from safetensors.numpy import save_file
    save_file({"reference": stale.reference}, str(old / DOMAIN), {"format": "cbir-domain-2"})
    assert load_checkpoint(old).domain is None   # an earlier format: no verdict, the checkpoint still loads
    (old / DOMAIN).unlink()                # a checkpoint from before domain models
    assert load_checkpoint(old).domain is None
    code, out, err = run_cli("query", run["grey"], "--index", run["index"], "--model", old, "--k", 5, "--json")
    assert code == 0, err
    v = json.loads(out)["vote"]
    assert (v["in_domain"], v["domain_distance"]) == (None, None) and not any("unlike" in w for w in v["warnings"])
    (old / DOMAIN).write_bytes(b"not a safetensors file")
    from cbir.errors import CbirError
    with pytest.raises(CbirError, match="unreadable domain model"):
        load_checkpoint(old)


def test_domain_features_are_the_last_two_stages_averaged_and_unit_joined() -> None:
    import torch
    import torch.nn.functional as F

    from cbir.models import ModelConfig, create_model
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=8)).eval()
    x = torch.rand(3, 1, 32, 32)
    out = model(x)
    b = model.backbone   # timm's ResNet, by hand: stem, then layer1..layer4
    h = b.maxpool(b.act1(b.bn1(b.conv1(x))))
    layer3 = b.layer3(b.layer2(b.layer1(h)))
    layer4 = b.layer4(layer3)
    by_hand = torch.cat([F.normalize(layer3.mean((2, 3)), dim=1), F.normalize(layer4.mean((2, 3)), dim=1)], 1)
    assert out.domain is not None and torch.allclose(out.domain, by_hand, atol=1e-5)
    assert model.domain_features == "stages:layer3,layer4"
    plain = model.forward_head(model.forward_features(x))   # the pass without the stages: the same features
    assert out.pooled is not None and plain.pooled is not None and torch.equal(out.pooled, plain.pooled)
    import copy
    twin = copy.deepcopy(model)                       # EMA averaging copies the model
    assert twin(x).domain is not None and torch.allclose(twin(x).domain, by_hand, atol=1e-5)
    assert model.train()(x).domain is None            # training passes compute none
