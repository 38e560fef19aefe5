"""Datasets are named by a keyed id of their files, never by their folder (`cbir.data.identity`,
`cbir.app.datasets`): ``chest_xray/train`` and ``chest_xray/test`` with equal relative paths are two datasets of
one collection. Real PNG files, a real (random) timm model, real Qdrant Edge and the CLI; no mocks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.app.ingest import ingest_records
from cbir.data.layout import load_dataset
from cbir.data.splits import same_data
from cbir.errors import DatasetError
from cbir.io import load_pseudonymizer
from cbir.models import ModelConfig, create_model, load_checkpoint, save_checkpoint
from cbir.store import open_index
from tests.conftest import run_cli

CLASSES, PER_CLASS = ("NORMAL", "PNEUMONIA"), 6


def write_split(root: Path, seed: int) -> Path:
    """A Kermany-like split folder; every split uses the same relative paths, with other pictures."""
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        for i in range(PER_CLASS):
            path = root / cls / f"person{i}_{cls.lower()}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.normal(120, 30, (40, 40)).cumsum(axis=0) / 8 + rng.normal(0, 10, (40, 40))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def kermany(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ids")
    model = root / "model"
    save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32,
                                             label_names=list(CLASSES), target="PNEUMONIA")), model)
    return {"train": write_split(root / "chest_xray" / "train", 1),
            "test": write_split(root / "chest_xray" / "test", 2), "model": model, "root": root}


def _ingest(kermany: dict[str, Path], data: Path, index: Path, *extra: object) -> str:
    code, out, err = run_cli("ingest", "--data", data, "--layout", "folder", "--model", kermany["model"], "--index",
                             index, "--collection", "c", "--workers", 0, *extra)
    assert code == 0, err
    return out


def test_two_split_folders_of_one_name_are_two_datasets(kermany: dict[str, Path], tmp_path: Path) -> None:
    n = len(CLASSES) * PER_CLASS
    index = tmp_path / "index"
    _ingest(kermany, kermany["train"], index)
    line = _ingest(kermany, kermany["test"], index)
    assert f"{n} files: {n} ingested, 0 already in the index" in line
    with open_index(str(index)) as idx:
        points = list(idx.scroll("c"))
        meta = idx.get_meta("c")
    ids = {load_dataset(kermany[s], "folder").dataset_id for s in ("train", "test")}
    train, test = (load_dataset(kermany[s], "folder").split_record() for s in ("train", "test"))
    assert train["dataset_digest"] == test["dataset_digest"] and not same_data(train, test)   # equal paths only
    assert len(points) == 2 * n and {p.payload["dataset"] for p in points} == ids and len(ids) == 2
    assert all(i.startswith("d-") for i in ids) and set(meta["splits"]) == ids == set(meta["roots"])
    assert all(record["images"] == n and record["dataset"] == name for name, record in meta["splits"].items())
    assert "chest_xray" not in json.dumps([p.payload for p in points]) + json.dumps(meta["splits"])
    # a re-run, and the same folder moved elsewhere, are the same dataset: nothing is stored twice
    assert f"{n} files: 0 ingested, {n} already in the index" in _ingest(kermany, kermany["train"], index)
    moved = shutil.copytree(kermany["train"], tmp_path / "elsewhere" / "renamed")
    assert load_dataset(moved, "folder").dataset_id == load_dataset(kermany["train"], "folder").dataset_id
    assert f"{n} files: 0 ingested, {n} already in the index" in _ingest(kermany, moved, index)


def test_a_given_dataset_id_is_checked_and_used(kermany: dict[str, Path], tmp_path: Path) -> None:
    index = tmp_path / "index"
    _ingest(kermany, kermany["train"], index, "--dataset-id", "kermany-2018.train")
    with open_index(str(index)) as idx:
        assert {p.payload["dataset"] for p in idx.scroll("c")} == {"kermany-2018.train"}
    for bad in ("a/b", "", "-x", "x" * 49, "a b"):
        with pytest.raises(DatasetError, match="--dataset-id"):
            load_dataset(kermany["train"], "folder", dataset_id=bad)
    code, _, err = run_cli("ingest", "--data", kermany["train"], "--model", kermany["model"], "--index", index,
                           "--collection", "c", "--dataset-id", "../etc")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--dataset-id '../etc'" in err


def test_a_collection_named_by_folders_keeps_working(kermany: dict[str, Path], tmp_path: Path) -> None:
    """A collection written when datasets were named by their folder keeps its points and their names: the same
    folder ingested again is found as already there (and answers the same neighbours); another folder is new."""
    n = len(CLASSES) * PER_CLASS
    loaded, pseudonymize = load_checkpoint(kermany["model"]), load_pseudonymizer()
    train = load_dataset(kermany["train"], "folder")
    with open_index(str(tmp_path / "index"), writable=True, create=True) as index:
        ingest_records(train.with_dataset_id("chest_xray"), loaded, index, "c", pseudonymize, workers=0)  # as before
        query = next(iter(index.scroll("c", with_vectors=True)))
        before = [h.id for h in index.search("c", query.embedding, 8)]
        again = ingest_records(train, loaded, index, "c", pseudonymize, workers=0)
        assert (again.ingested, again.already, again.dataset) == (0, n, "chest_xray")
        assert [h.id for h in index.search("c", query.embedding, 8)] == before
        test = ingest_records(load_dataset(kermany["test"], "folder"), loaded, index, "c", pseudonymize, workers=0)
        assert test.ingested == n and test.dataset.startswith("d-") and index.count("c") == 2 * n
        assert set(index.get_meta("c")["splits"]) == {"chest_xray", test.dataset}
