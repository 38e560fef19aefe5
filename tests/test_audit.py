"""`cbir audit`: near-duplicates by tiny images across splits, datasets and collections, and the audit inside
evaluate and reproduce. Synthetic folders with planted copies always run; the real NIH/RSNA check skips without
../shared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from cbir.app import audit as au
from cbir.cli.main import app
from cbir.data.layout import load_dataset
from cbir.data.splits import SplitSpec, split_names
from cbir.data.synth import synth_dataset
from cbir.io import load_pseudonymizer, read_image
from cbir.models import ModelConfig
from cbir.models.detector_config import DetectorConfig
from tests.conftest import shared_path

runner = CliRunner()
SIZE = 128
#: The planted copies of the first four images of the synthetic NIH set, each under another name.
COPIES = ("exact", "jpeg", "crop", "resized")


def run(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _grey(path: Path) -> Image.Image:
    return Image.open(path).convert("L")


def plant_copies(originals: list[Path], out: Path) -> list[Path]:
    """Copies of originals[0..3] under other names: byte-identical, re-saved as JPEG q80 at 3/4 size, cropped
    by 1 % on every side, and enlarged to 200 px."""
    out.mkdir(parents=True, exist_ok=True)
    exact, jpeg, crop, resized = (out / f"case-{n}{ext}" for n, ext in zip(COPIES, (".png", ".jpg", ".png", ".png"),
                                                                         strict=True))
    shutil.copyfile(originals[0], exact)
    _grey(originals[1]).resize((SIZE * 3 // 4,) * 2, Image.Resampling.LANCZOS).save(jpeg, quality=80)
    image = _grey(originals[2])
    d = round(0.01 * SIZE)
    image.crop((d, d, SIZE - d, SIZE - d)).save(crop)
    _grey(originals[3]).resize((200, 200), Image.Resampling.LANCZOS).save(resized)
    return [exact, jpeg, crop, resized]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`nih`: a synthetic NIH set; `other`: a plain folder with the planted copies and 8 unrelated images;
    `mixed`: a plain folder with every image of `nih` and the copies (each file its own patient)."""
    root = tmp_path_factory.mktemp("audit")
    nih, other, mixed, unrelated = root / "nih", root / "other", root / "mixed", root / "unrelated"
    synth_dataset("nih", 24, SIZE, nih, seed=1)
    synth_dataset("nih", 8, SIZE, unrelated, seed=2)
    originals = sorted((nih / "images").glob("*.png"))
    plant_copies(originals, other)
    for n, path in enumerate(sorted((unrelated / "images").glob("*.png"))):
        shutil.copyfile(path, other / f"unrelated-{n}.png")
    plant_copies(originals, mixed)
    for path in originals:
        shutil.copyfile(path, mixed / f"original-{path.name}")
    return {"root": root, "nih": nih, "other": other, "mixed": mixed}


def _pairs(result: au.AuditResult) -> set[tuple[str, str]]:
    return {(Path(str(result.a.paths[i])).name, Path(str(result.b.paths[j])).name)
            for i, j in zip(result.pairs.i, result.pairs.j, strict=True)}


def _expected(folders: dict[str, Path], prefix: str = "") -> set[tuple[str, str]]:
    originals = sorted((folders["nih"] / "images").glob("*.png"))
    names = sorted(p.name for p in folders["other"].glob("case-*"))
    by_kind = {next(k for k in COPIES if f"-{k}." in n): n for n in names}
    return {(prefix + originals[n].name, by_kind[kind]) for n, kind in enumerate(COPIES)}


def test_find_pairs_in_blocks_is_the_full_matrix() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8)).astype(np.float32)
    a[7] = a[3] + 0.01   # planted near-duplicates
    a[40] = a[12]
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = np.concatenate([a[:20] + 0.02 * rng.normal(size=(20, 8)), rng.normal(size=(30, 8))]).astype(np.float32)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    for other in (None, b):
        full = a @ (a if other is None else other).T
        keep = full >= 0.9
        if other is None:
            keep &= np.triu(np.ones_like(keep), 1).astype(bool)
        want = {(int(i), int(j)) for i, j in zip(*np.nonzero(keep), strict=True)}
        for block in (1, 37, 10_000):   # one similarity at a time, ragged blocks, everything at once
            found = au.find_pairs(a, other, 0.9, block_elements=block)
            assert set(zip(found.i.tolist(), found.j.tolist(), strict=True)) == want
            assert np.all(np.diff(found.similarity) <= 0) and np.allclose(found.similarity, full[found.i, found.j])
    assert (3, 7) in want and (12, 40) in set(zip(*np.nonzero(np.triu(a @ a.T >= 0.999, 1)), strict=True))


def test_audit_finds_exactly_the_planted_copies(folders: dict[str, Path]) -> None:
    pseudonymize = load_pseudonymizer()
    nih = load_dataset(folders["nih"], "nih", pseudonymize=pseudonymize)
    other = load_dataset(folders["other"], "plain", pseudonymize=pseudonymize)
    result = au.audit_datasets(nih, other, pseudonymize, workers=0, pixel=True)
    assert _pairs(result) == _expected(folders)
    assert result.counts["images_with_a_duplicate"] == result.counts["against_with_a_duplicate"] == 4
    checks = {Path(str(result.b.paths[j])).name: c for j, c in zip(result.pairs.j, result.pixels or [], strict=True)}
    assert checks["case-exact.png"].residual < 1e-6 and checks["case-exact.png"].identical
    assert not checks["case-crop.png"].identical   # a crop is a near-duplicate, not the same pixels
    # the unrelated images stay well below the threshold: the nearest one is not a borderline case
    loose = au.audit_datasets(nih, other, pseudonymize, threshold=0.9, workers=0)
    assert _pairs(loose) == _expected(folders)


def test_split_audit_lists_pairs_across_splits_and_counts_the_rest(folders: dict[str, Path]) -> None:
    pseudonymize = load_pseudonymizer()
    records = load_dataset(folders["mixed"], "plain", split=SplitSpec(seed=1, val_fraction=0.3, test_fraction=0.3),
                           pseudonymize=pseudonymize)
    split = dict(zip(records.meta["relpath"].map(lambda r: Path(r).name), records.meta["split"], strict=True))
    result = au.audit_splits(records, pseudonymize, workers=0)
    planted = _expected(folders, prefix="original-")
    across = {pair for pair in planted if split[pair[0]] != split[pair[1]]}
    assert 0 < len(across) < len(planted)   # this split puts some copies beside their original, some not
    assert {tuple(sorted(p)) for p in _pairs(result)} == {tuple(sorted(p)) for p in across}
    assert result.counts["within_split_other_patient"] == len(planted) - len(across)
    assert all(row["a_split"] != row["b_split"] for row in result.rows())


def test_cli_json_csv_of_pseudonyms_and_one_line_errors(folders: dict[str, Path], tmp_path: Path) -> None:
    csv_out = tmp_path / "pairs.csv"
    code, out, err = run("audit", "--data", folders["nih"], "--layout", "nih", "--against", folders["other"],
                         "--against-layout", "plain", "--json", "--csv", csv_out, "--workers", 0)
    assert code == 0, err
    body = json.loads(out)
    assert body["pairs"] == 4 and body["threshold"] == au.THRESHOLD and body["csv"] == str(csv_out)
    assert body["counts"]["images"] == 24 and body["counts"]["against_images"] == 12
    table = pd.read_csv(csv_out)
    assert len(table) == 4 and table["similarity"].min() >= au.THRESHOLD
    assert table["a_file"].str.startswith("f-").all() and table["b_patient"].str.startswith("p-").all()
    text = csv_out.read_text()
    names = [p.stem for folder in ("nih", "other") for p in folders[folder].rglob("*.*")]
    assert not [n for n in names if n in text], "a file name reached the CSV"
    assert str(folders["root"]) not in text and "case-" not in text
    # the console lists the pairs by pseudonym, and file names only when asked
    code, out, _ = run("audit", "--data", folders["nih"], "--against", folders["other"], "--against-layout", "plain",
                       "--csv", csv_out, "--workers", 0)
    assert code == 0 and "4 near-duplicate pairs" in out and "case-" not in out and "f-" in out
    code, out, _ = run("audit", "--data", folders["nih"], "--against", folders["other"], "--against-layout", "plain",
                       "--csv", csv_out, "--workers", 0, "--local-paths")
    assert code == 0 and "case-exact.png" in out
    for args in (("--data", tmp_path / "missing"),
                 ("--data", folders["nih"], "--against", tmp_path / "missing"),
                 ("--data", folders["nih"], "--against", folders["other"], "--collection", "x")):
        code, out, err = run("audit", *args, "--csv", tmp_path / "never.csv")
        assert code == 2, (args, out, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "never.csv").exists()


def test_a_model_without_the_appearance_part_is_said_not_audited() -> None:
    class Query:
        def __init__(self, embedding: np.ndarray, pseudonym: str) -> None:
            self.embedding, self.pseudonym = embedding, pseudonym

    config = ModelConfig(backbone="test_resnet", embed_dim=4, appearance_size=2, appearance_weight=0.5)
    semantic = np.eye(4, dtype=np.float32)[[0, 1, 2]]
    tiny = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    joined = np.concatenate([np.sqrt(0.5) * semantic, np.sqrt(0.5) * tiny], axis=1)
    archive = np.concatenate([np.sqrt(0.5) * semantic[::-1], np.sqrt(0.5) * tiny], axis=1)  # other semantics
    queries = [Query(e, p) for e, p in zip(joined, ("p-a", "p-b", "p-c"), strict=True)]
    kept, note = au.drop_duplicate_queries(queries, archive, np.array(["p-x", "p-b", "p-y"], dtype=object), config)
    # the appearance parts match query by query; the second is its own patient's image, so it stays
    assert [q.pseudonym for q in kept] == ["p-b"] and note["audited"] and note["excluded"] == 2
    kept, note = au.drop_duplicate_queries(queries, archive, np.array(["p-x"] * 3, dtype=object),
                                           DetectorConfig(backbone="resnet18"))
    assert kept == queries and not note["audited"] and "not run" in note["note"]


def _plant_rsna_duplicates(data: Path, n: int) -> int:
    """Copy `n` training images of a synthetic RSNA set to new patients (new UIDs) that land in the test split
    of the default split, as one archive holding the same radiograph under two patient IDs would; returns n."""
    labels = pd.read_csv(data / "stage_2_train_labels.csv")
    patients = labels["patientId"].drop_duplicates().tolist()
    train = [p for p, s in zip(patients, split_names(pd.Series(patients), SplitSpec()), strict=True) if s == "train"]
    new = [f"dup{k}" for k in range(500) if split_names(pd.Series([f"dup{k}"]), SplitSpec())[0] == "test"][:n]
    rows = []
    for original, patient in zip(train[:n], new, strict=True):
        ds = pydicom.dcmread(data / "stage_2_train_images" / f"{original}.dcm")
        ds.PatientID = patient
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(data / "stage_2_train_images" / f"{patient}.dcm")
        rows.append(labels[labels["patientId"] == original].assign(patientId=patient))
    pd.concat([labels, *rows]).to_csv(data / "stage_2_train_labels.csv", index=False)
    return n



def _train_and_ingest(data: Path, model: Path, index: Path, collection: str, *train_args: object) -> None:
    """An untrained tiny model (epochs 0) on `data`, ingested into `collection`."""
    code, _, err = run("train", "--data", data, "--layout", "rsna", "--backbone", "test_resnet", "--random-init",
                       "--epochs", 0, "--image-size", 64, "--embed-dim", 8, "--bits", 16, "--out", model,
                       "--workers", 0, *train_args)
    assert code == 0, err
    code, _, err = run("ingest", "--data", data, "--layout", "rsna", "--model", model, "--index", index,
                       "--collection", collection, "--workers", 0)
    assert code == 0, err


def test_collection_audit_and_evaluate_leave_out_duplicated_queries(tmp_path: Path) -> None:
    data, model, index = tmp_path / "rsna", tmp_path / "model", tmp_path / "index"
    synth_dataset("rsna", 40, 96, data, seed=5)
    planted = _plant_rsna_duplicates(data, 2)
    _train_and_ingest(data, model, index, "c")
    code, out, err = run("audit", "--data", data, "--collection", "c", "--index", index, "--json",
                         "--csv", tmp_path / "c.csv", "--workers", 0)
    assert code == 0, err
    body = json.loads(out)
    assert "stored vectors" in body["method"]
    assert body["pairs"] == 2 * planted   # each copy and its original, both ways
    assert body["counts"]["same_image"] == 40 + planted and body["counts"]["same_patient"] == 0
    code, out, err = run("evaluate", "--collection", "c", "--index", index, "--out", tmp_path / "report", "--json")
    assert code == 0, err
    report = json.loads(out)
    duplicates = report["context"]["duplicates"]
    assert duplicates["audited"] and duplicates["excluded"] == planted
    assert "leakage audit" in err and f"{planted} of" in err
    assert "duplicates.note" in (tmp_path / "report" / "report.md").read_text()
    # a model without the appearance part: the audit reads the archive's files again, evaluate says it did not look
    _train_and_ingest(data, tmp_path / "flat", index, "flat", "--appearance-weight", 0)
    code, out, err = run("audit", "--data", data, "--collection", "flat", "--index", index, "--json",
                         "--csv", tmp_path / "flat.csv", "--workers", 0)
    assert code == 0, err
    body = json.loads(out)
    assert "read again" in body["method"] and body["pairs"] == 2 * planted
    assert body["counts"]["same_image"] == 40 + planted
    code, out, err = run("evaluate", "--collection", "flat", "--index", index, "--out", tmp_path / "r2", "--json")
    assert code == 0, err
    assert not json.loads(out)["context"]["duplicates"]["audited"] and "leakage audit not run" in err


def test_reproduce_leaves_nih_duplicates_of_rsna_out_of_multilabel_training(tmp_path: Path) -> None:
    from cbir.reproduce import ReproduceOptions, run_reproduce
    rsna, nih = tmp_path / "rsna", tmp_path / "nih"
    synth_dataset("rsna", 30, 64, rsna, seed=6)
    synth_dataset("nih", 30, 64, nih, seed=7)
    # one NIH image is an RSNA image, stored as the NIH release stores it (8-bit PNG)
    shared = read_image(sorted((rsna / "stage_2_train_images").glob("*.dcm"))[0]).pixels
    target = sorted((nih / "images").glob("*.png"))[0]
    Image.fromarray(np.round(shared * 255).astype(np.uint8)).save(target)
    results = run_reproduce(ReproduceOptions(data=rsna, out=tmp_path / "res", layout="rsna", nih=nih,
                                             backbone="test_resnet", image_size=32, epochs=1, bits=16, k=5,
                                             tasks=["multilabel"], folds=0, embed_dim=8))
    training = results["audit"]["multilabel_training"]
    assert training["left_out"] == 1 and training["images"] == 30
    split = json.loads((tmp_path / "res" / "models" / "holdout" / "multilabel" / "split.json").read_text())
    assert split["images"] == 29   # the model never saw the RSNA image
    assert results["folds"][0]["duplicates"]["audited"]
    markdown = (tmp_path / "res" / "results.md").read_text()
    assert "The multilabel model trains on" in markdown and "29 of 30 images" in markdown


def test_real_nih_duplicates_of_rsna_are_found() -> None:
    """The RSNA challenge images were drawn from NIH: the audit finds every NIH full256 image whose pixels equal an
    RSNA image's (up to resizing and a linear intensity map), and nothing else."""
    nih_root, rsna_root = shared_path("data", "nih", "full256"), shared_path("data", "rsna")
    pseudonymize = load_pseudonymizer()
    nih = load_dataset(nih_root, "nih", pseudonymize=pseudonymize)
    rsna = load_dataset(rsna_root, "rsna", pseudonymize=pseudonymize)
    result = au.audit_datasets(nih, rsna, pseudonymize)
    found = set(zip(result.pairs.i.tolist(), result.pairs.j.tolist(), strict=True))
    identical = au.pixel_identical_pairs(nih.meta["path"].tolist(), rsna.meta["path"].tolist())
    assert len(identical) >= 10   # 12 at the time of writing (docs/results.md, "Leakage audit")
    assert found == identical
