"""Splits: k-fold and hold-out assignment, the split record, and the split travelling with the model through
`cbir train`, `cbir ingest` and `cbir evaluate` (refused when it differs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cbir.data.layout import load_dataset
from cbir.data.splits import SplitSpec, assign_splits, split_names
from cbir.errors import CbirError
from tests.conftest import payload_path, run_cli

PATIENTS = [f"patient-{i}" for i in range(2000)]


def test_k_folds_put_every_patient_in_exactly_one_test_fold() -> None:
    folds = [split_names(PATIENTS, SplitSpec(folds=5, fold=f, val_fraction=0.1)) for f in range(1, 6)]
    test = np.stack([s == "test" for s in folds])
    assert (test.sum(axis=0) == 1).all()
    assert all(abs(t.mean() - 0.2) < 0.03 for t in test)
    for names in folds:  # val is drawn from the other folds: 0.1 of all patients
        assert abs((names == "val").mean() - 0.1) < 0.02
        assert not ((names == "val") & (names == "test")).any()
    # a patient's fold depends on its own key only
    subset = split_names(PATIENTS[:300], SplitSpec(folds=5, fold=2))
    assert (subset == split_names(PATIENTS, SplitSpec(folds=5, fold=2))[:300]).all()


def test_hold_out_split_is_the_historic_one_and_test_fraction_zero_has_no_test() -> None:
    default = split_names(PATIENTS, SplitSpec())
    assert (default == assign_splits(PATIENTS)).all()
    assert {n: round(float((default == n).mean()), 1) for n in ("train", "val", "test")} == \
        {"train": 0.7, "val": 0.1, "test": 0.2}
    no_test = split_names(PATIENTS, SplitSpec(test_fraction=0.0, val_fraction=0.1))
    assert "test" not in set(no_test) and abs((no_test == "val").mean() - 0.1) < 0.02
    official = np.arange(2000) < 500
    names = split_names(PATIENTS, SplitSpec(), official_test=official)
    assert (names[:500] == "test").all() and "test" not in set(names[500:])
    assert (split_names(PATIENTS, SplitSpec(official_test=False), official_test=official) == default).all()


@pytest.mark.parametrize("spec", [dict(folds=1, fold=1), dict(folds=5, fold=0), dict(folds=5, fold=6),
                                  dict(val_fraction=0.5, test_fraction=0.5), dict(fold=2)])
def test_bad_splits_are_one_line(spec: dict) -> None:
    with pytest.raises(CbirError, match="bad split"):
        SplitSpec(**spec)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("splits")
    data, other = root / "rsna", root / "other"
    assert run_cli("synth", "--layout", "rsna", "--n", 60, "--size", 40, "--out", data, "--seed", 5)[0] == 0
    assert run_cli("synth", "--layout", "rsna", "--n", 30, "--size", 40, "--out", other, "--seed", 6)[0] == 0
    base = ("--data", data, "--layout", "rsna", "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1,
            "--embed-dim", 8, "--bits", 16, "--workers", 0)
    code, _, err = run_cli("train", *base, "--seed", 1, "--out", root / "seed1")
    assert code == 0, err
    code, _, err = run_cli("train", *base, "--test-fraction", 0, "--out", root / "all")
    assert code == 0, err
    return {"root": root, "data": data, "other": other, "seed1": root / "seed1", "all": root / "all"}


def test_the_checkpoint_records_its_split(runs: dict[str, Path]) -> None:
    record = json.loads((runs["seed1"] / "split.json").read_text())
    assert record["spec"]["seed"] == 1 and record["images"] == 60
    records = load_dataset(runs["data"], "rsna", split=SplitSpec(seed=1))
    assert record == records.split_record() and record["dataset"] == records.dataset_id  # the id, not "rsna"
    assert record["dataset"].startswith("d-")
    assert record["splits"]["val"]["patients"] == records.split("val").meta["patient"].nunique()
    text = json.dumps(record)
    assert not any(p in text for p in records.meta["patient"])  # digests only, never a patient key
    assert not any(Path(p).name in text for p in records.meta["relpath"])
    no_test = json.loads((runs["all"] / "split.json").read_text())
    assert no_test["spec"]["test_fraction"] == 0 and no_test["splits"]["test"]["images"] == 0


def _payload_splits(index: Path, collection: str) -> dict[str, str]:
    from cbir.store import open_index
    with open_index(str(index)) as idx:
        return {payload_path(p.payload): p.payload["split"] for p in idx.scroll(collection)}


def test_ingest_and_evaluate_use_the_models_split(runs: dict[str, Path], tmp_path: Path) -> None:
    index = tmp_path / "index"
    code, out, err = run_cli("ingest", "--data", runs["data"], "--model", runs["seed1"], "--index", index,
                             "--collection", "c", "--workers", 0)
    assert code == 0, err
    expected = load_dataset(runs["data"], "rsna", split=SplitSpec(seed=1)).meta
    assert _payload_splits(index, "c") == dict(zip(expected["relpath"], expected["split"], strict=True))
    assert _payload_splits(index, "c") != dict(zip(expected["relpath"], load_dataset(runs["data"], "rsna").meta[
        "split"], strict=True))  # seed 0 would have split it otherwise
    code, out, err = run_cli("evaluate", "--index", index, "--collection", "c", "--out", tmp_path / "r", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["n_queries"] == int((expected["split"] == "test").sum())
    assert "seed 1" in report["context"]["split"]
    from cbir.store import open_index
    record = json.loads((runs["seed1"] / "split.json").read_text())
    with open_index(str(index)) as idx:
        assert idx.get_meta("c")["splits"] == {record["dataset"]: record}   # by the dataset's id
    code, out, err = run_cli("index", "info", "--index", index, "--json")
    assert json.loads(out)["collections"][0]["splits"] == {record["dataset"]: "seed 1, val 0.1, test 0.2"}


def test_another_patient_rule_on_the_same_data_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for cls, n in (("NORMAL", 12), ("PNEUMONIA", 12)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            from PIL import Image
            pixels = np.random.default_rng(i).integers(0, 255, (24, 24), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"p{i % 6}_{cls}_{i}.png")
    model = tmp_path / "model"
    code, _, err = run_cli("train", "--data", root, "--layout", "folder", "--backbone", "test_resnet",
                           "--image-size", 16, "--epochs", 1, "--embed-dim", 8, "--bits", 16, "--workers", 0,
                           "--patient-regex", r"(p\d+)_", "--out", model)
    assert code == 0, err
    code, _, err = run_cli("ingest", "--data", root, "--layout", "folder", "--model", model, "--index",
                           tmp_path / "index", "--workers", 0)  # no regex: each file its own patient
    assert code == 2 and "patients by" in err and "--other-split" in err


def test_an_explicitly_different_split_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    index = tmp_path / "index"
    args = ("--data", runs["data"], "--model", runs["seed1"], "--index", index, "--collection", "c", "--workers", 0)
    code, out, err = run_cli("ingest", *args, "--seed", 0)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--seed 0" in err and "seed 0" in err and "seed 1" in err and "--other-split" in err
    code, out, err = run_cli("ingest", *args, "--folds", 5, "--fold", 1)
    assert code == 2 and "fold 1 of 5" in err and "seed 1" in err
    from cbir.store import open_index
    assert not (index / "aliases.json").exists() or "c" not in open_index(str(index)).list_aliases()
    # The same value as the model's is no difference; the expert override proceeds.
    assert run_cli("ingest", *args, "--seed", 1)[0] == 0
    code, out, err = run_cli("ingest", *args[:-4], "--index", tmp_path / "other", "--collection", "o",
                             "--workers", 0, "--seed", 0, "--other-split")
    assert code == 0, err
    assert "--other-split" in err
    # evaluate refuses the collection split otherwise than the model was trained, unless told
    code, out, err = run_cli("evaluate", "--index", tmp_path / "other", "--collection", "o", "--out", tmp_path / "r")
    assert code == 2 and "seed 0" in err and "seed 1" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("evaluate", "--index", tmp_path / "other", "--collection", "o", "--out", tmp_path / "r",
                             "--other-split")
    assert code == 0, err


def test_a_collection_keeps_one_split_per_dataset(runs: dict[str, Path], tmp_path: Path) -> None:
    index = tmp_path / "index"
    base = ("--data", runs["data"], "--index", index, "--collection", "c", "--workers", 0)
    assert run_cli("ingest", *base, "--model", runs["seed1"])[0] == 0
    code, out, err = run_cli("ingest", *base, "--model", runs["seed1"], "--seed", 2, "--other-split")
    dataset = load_dataset(runs["data"], "rsna").dataset_id
    assert code == 2 and f"holds dataset {dataset} split as seed 1" in err and "new collection" in err
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1


def test_test_fraction_zero_evaluates_on_another_dataset(runs: dict[str, Path], tmp_path: Path) -> None:
    index = tmp_path / "index"
    code, out, err = run_cli("ingest", "--data", runs["data"], "--model", runs["all"], "--index", index,
                             "--collection", "c", "--workers", 0)
    assert code == 0, err
    assert set(_payload_splits(index, "c").values()) == {"train", "val"}
    code, out, err = run_cli("evaluate", "--index", index, "--collection", "c", "--out", tmp_path / "r")
    assert code == 2 and "--test-fraction 0" in err and "--queries" in err
    code, out, err = run_cli("evaluate", "--index", index, "--collection", "c", "--out", tmp_path / "r",
                             "--queries", runs["other"], "--json")
    assert code == 0, err
    assert json.loads(out)["n_queries"] == 30


def test_queries_from_the_models_own_dataset_are_its_test_split(runs: dict[str, Path], tmp_path: Path) -> None:
    index = tmp_path / "index"
    assert run_cli("ingest", "--data", runs["other"], "--model", runs["seed1"], "--index", index,
                   "--collection", "c", "--workers", 0)[0] == 0
    code, out, err = run_cli("evaluate", "--index", index, "--collection", "c", "--out", tmp_path / "r",
                             "--queries", runs["data"], "--json")
    assert code == 0, err
    test = load_dataset(runs["data"], "rsna", split=SplitSpec(seed=1)).split("test")
    assert json.loads(out)["n_queries"] == len(test)
    code, out, err = run_cli("evaluate", "--index", index, "--collection", "c", "--out", tmp_path / "r",
                             "--queries", runs["data"], "--model", runs["all"])
    assert code == 2  # another model than the collection's
