"""One label space per collection (`cbir.labels`): every dataset that meets it is reconciled with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.errors import DatasetError
from cbir.labels import LabelSpace, parse_label_map
from tests.conftest import run_cli


def test_names_match_ignoring_case_and_normal_is_the_negative() -> None:
    space = LabelSpace.of(["Pneumonia"], "Pneumonia")
    assert space.negative == "No Pneumonia" and space.vocabulary == ("Pneumonia", "No Pneumonia")
    assert space.canonical("PNEUMONIA") == "Pneumonia" and space.canonical("no_pneumonia") == "No Pneumonia"
    assert space.canonical("NORMAL") == "No Pneumonia" and space.canonical("Lung Opacity") == "Pneumonia"
    assert space.canonical("COVID") is None
    with pytest.raises(DatasetError) as caught:
        space.reconcile(["COVID", "NORMAL", "PNEUMONIA"], "/data/x")
    message = str(caught.value)
    assert "COVID" in message and "vocabulary Pneumonia, No Pneumonia" in message and "--label-map" in message
    assert "\n" not in message
    mapping = space.reconcile(["COVID", "NORMAL", "PNEUMONIA"], "/data/x", parse_label_map(["covid=No Pneumonia"]))
    assert mapping == {"COVID": "No Pneumonia", "NORMAL": "No Pneumonia", "PNEUMONIA": "Pneumonia"}
    with pytest.raises(DatasetError, match="none of its labels"):
        space.reconcile(["NORMAL", "COVID"], "/data/x", {"COVID": "NORMAL"})
    with pytest.raises(DatasetError, match="FROM=TO"):
        parse_label_map(["COVID"])


def test_multilabel_space_keeps_its_findings() -> None:
    space = LabelSpace.of(["Atelectasis", "Pneumonia"], "Pneumonia", "No Finding")
    assert not space.binary and space.canonical("no finding") == "No Finding"
    assert space.canonical("NORMAL") == "No Finding" and space.canonical("atelectasis") == "Atelectasis"
    back = LabelSpace.from_meta({"label_space": space.to_dict()})
    assert back == space


def _folder(root: Path, classes: dict[str, int], seed: int) -> Path:
    for c, (cls, n) in enumerate(classes.items()):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            rng = np.random.default_rng(seed * 1000 + c * 100 + i)
            pixels = np.clip(rng.normal(80 + 60 * c, 25, (24, 24)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{cls.lower()}_{seed}_{i}.png")
    return root


def test_a_covid_folder_never_votes_as_pneumonia(tmp_path: Path) -> None:
    """Before: a COVID/NORMAL/PNEUMONIA folder took COVID (first non-normal class in sorted order) as its
    positive class in a Pneumonia collection, and stored "PNEUMONIA" beside "Pneumonia"."""
    train = _folder(tmp_path / "kermany", {"NORMAL": 14, "PNEUMONIA": 14}, 0)
    model, index = tmp_path / "model", tmp_path / "index"
    code, _, err = run_cli("train", "--data", train, "--layout", "folder", "--backbone", "test_resnet",
                           "--image-size", 16, "--epochs", 1, "--embed-dim", 8, "--bits", 16, "--workers", 0,
                           "--out", model)
    assert code == 0, err
    other = _folder(tmp_path / "covid-study", {"COVID": 6, "Normal": 6, "Pneumonia": 6}, 1)
    args = ("ingest", "--data", other, "--layout", "folder", "--model", model, "--index", index, "--workers", 0)
    code, out, err = run_cli(*args)
    error = err.strip().splitlines()[-1]   # progress notes come before it
    assert code == 2 and "COVID" in error and "vocabulary NORMAL, PNEUMONIA" in error and "--label-map" in error
    code, out, err = run_cli(*args, "--label-map", "COVID=NORMAL")
    assert code == 0, err
    from cbir.store import open_index
    with open_index(str(index)) as idx:
        meta = idx.get_meta("cbir")
        points = list(idx.scroll("cbir", with_vectors=False))
    assert meta["label_space"]["target"] == "PNEUMONIA" and meta["label_space"]["vocabulary"] == ["NORMAL",
                                                                                                 "PNEUMONIA"]
    assert len(points) == 18 and {tuple(p.payload["labels"]) for p in points} == {("NORMAL",), ("PNEUMONIA",)}
    assert sum(p.payload["target"] == 1 for p in points) == 6        # only the Pneumonia folder is positive
    query = next((other / "Pneumonia").glob("*.png"))
    code, out, err = run_cli("query", query, "--index", index, "--filter", "label=PNEUMONIA", "--json", "--k", 3)
    assert code == 0, err
    assert all(n["labels"] == ["PNEUMONIA"] and n["target"] == 1 for n in json.loads(out)["neighbors"])
