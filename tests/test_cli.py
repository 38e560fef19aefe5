"""End to end through the CLI on a tiny synthetic RSNA set: synth, train, ingest, query, evaluate, info."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from cbir.app.settings import Settings
from cbir.cli.main import app
from cbir.errors import CbirError
from cbir.models import ModelConfig
from tests.conftest import payload_path

runner = CliRunner()
N = 60


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    data, model, index = root / "data", root / "model", root / "index"
    code, out, err = run("synth", "--layout", "rsna", "--n", N, "--size", 48, "--out", data, "--seed", 3)
    assert code == 0, err
    code, out, err = run("train", "--data", data, "--layout", "rsna", "--task", "binary", "--backbone",
                         "test_resnet", "--image-size", 32, "--epochs", 2, "--embed-dim", 16, "--bits", 32,
                         "--out", model, "--workers", 0)
    assert code == 0, err
    code, out, err = run("ingest", "--data", data, "--layout", "rsna", "--model", model, "--index", index,
                         "--collection", "rsna", "--workers", 0)
    assert code == 0, err
    assert f"{N} ingested" in out
    return {"root": root, "data": data, "model": model, "index": index}


def _dicoms(data: Path) -> list[Path]:
    return sorted((data / "stage_2_train_images").glob("*.dcm"))


def test_synth_writes_the_kaggle_layout(pipeline: dict[str, Path]) -> None:
    assert (pipeline["data"] / "stage_2_train_labels.csv").is_file()
    assert len(_dicoms(pipeline["data"])) == N


def test_checkpoint_directory(pipeline: dict[str, Path]) -> None:
    names = {p.name for p in pipeline["model"].iterdir()}
    assert {"config.json", "model.safetensors", "fingerprint", "metrics.jsonl"} <= names
    epochs = [json.loads(line) for line in (pipeline["model"] / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]


def test_reingest_does_not_duplicate(pipeline: dict[str, Path]) -> None:
    args = ("--data", pipeline["data"], "--model", pipeline["model"], "--index", pipeline["index"],
            "--collection", "rsna", "--workers", 0)
    code, out, err = run("ingest", *args)
    assert code == 0, err
    info = json.loads(run("index", "info", "--index", pipeline["index"], "--json")[1])
    (row,) = [c for c in info["collections"] if c["collection"] == "rsna"]
    assert row["points"] == N
    assert row["dim"] == ModelConfig(embed_dim=16).vector_dim and row["bits"] == 32 and row["schema_version"] == 2
    assert row["stored_as"] == "rsna__v1" and row["current"] and row["team"] is None
    assert row["model_fingerprint"] == (pipeline["model"] / "fingerprint").read_text().strip()


def test_query_json_contract(pipeline: dict[str, Path]) -> None:
    dicom = _dicoms(pipeline["data"])[0]
    code, out, err = run("query", dicom, "--index", pipeline["index"], "--collection", "rsna", "--k", 5, "--json")
    assert code == 0, err
    result = json.loads(out)
    # an archived image finds itself: listed (flagged), not voting, and k others still vote
    selves = sum(n["self_match"] for n in result["neighbors"])
    assert selves == result["vote"]["self_matches"] == 1 and result["neighbors"][0]["self_match"]
    assert len(result["neighbors"]) == 5 + selves
    first = result["neighbors"][0]
    assert {"rank", "id", "score", "labels", "path"} <= set(first)
    assert [n["rank"] for n in result["neighbors"]] == [1, 2, 3, 4, 5, 6]
    scores = [n["score"] for n in result["neighbors"]]
    assert scores == sorted(scores, reverse=True)
    assert first["score"] == pytest.approx(1.0, abs=1e-4)  # the image itself is in the archive
    assert first["path"] is None and first["file"].startswith("f-")   # no file name by default
    assert result["query"]["path"].startswith("f-") and dicom.stem not in out
    assert {"label", "fraction"} <= set(result["vote"]) and 0 < result["vote"]["fraction"] <= 1
    assert 0.0 <= result["prediction"]["probability"] <= 1.0
    code, out, err = run("query", dicom, "--index", pipeline["index"], "--collection", "rsna", "--k", 5, "--json",
                         "--local-paths")
    assert code == 0, err
    local = json.loads(out)
    assert local["neighbors"][0]["path"] == f"stage_2_train_images/{dicom.name}"   # from this machine's file map
    assert local["neighbors"][0]["file"] == first["file"] and local["query"]["path"] == str(dicom)


#: What one `cbir query` process must not import (docs/performance.md: start-up): training, evaluation, reports,
#: benchmarks, the server path (the index here is Qdrant Edge) and the heavy libraries only they need.
NOT_ON_THE_QUERY_PATH = ("pandas", "sklearn", "scipy", "matplotlib", "qdrant_client", "fastapi", "uvicorn",
                         "cbir.train", "cbir.evaluation", "cbir.metrics", "cbir.report.results",
                         "cbir.report.evaluation", "cbir.report.montage", "cbir.bench", "cbir.studies",
                         "cbir.reproduce", "cbir.data.records", "cbir.data.splits", "cbir.models.detection")


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (in the repository, with this test's key)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_query_process_imports_only_what_a_query_needs(pipeline: dict[str, Path]) -> None:
    dicom = _dicoms(pipeline["data"])[2]
    query = json.dumps(["query", str(dicom), "--index", str(pipeline["index"]), "--collection", "rsna", "--json"])
    loaded = _modules_after(f"from cbir.cli.main import app\napp({query}, standalone_mode=False)")
    assert {"torch", "timm", "qdrant_edge", "cbir.search.query"} <= loaded       # it did answer the query
    assert sorted(m for m in loaded if m.split(".")[0] in NOT_ON_THE_QUERY_PATH or m in NOT_ON_THE_QUERY_PATH
                  or any(m.startswith(bad + ".") for bad in NOT_ON_THE_QUERY_PATH)) == []
    bare = _modules_after("import cbir.cli.main")                                     # `cbir --help` and friends
    assert not {"torch", "timm", "numpy", "pydicom", "qdrant_edge"} & bare


def test_query_leaves_garbage_collection_on(pipeline: dict[str, Path]) -> None:
    """The heavy imports run with collection paused (docs/performance.md); it is back on afterwards."""
    import gc
    code, _, err = run("query", _dicoms(pipeline["data"])[3], "--index", pipeline["index"], "--collection", "rsna",
                       "--json")
    assert code == 0, err
    assert gc.isenabled() and gc.get_freeze_count() > 0


def test_query_table_filter_prefilter_and_montage(pipeline: dict[str, Path], tmp_path: Path) -> None:
    dicom = _dicoms(pipeline["data"])[1]
    montage = tmp_path / "m.png"
    code, out, err = run("query", dicom, "--index", pipeline["index"], "--collection", "rsna", "--k", 4,
                         "--filter", "label=Pneumonia", "--prefilter", 30, "--montage", montage)
    assert code == 0, err
    assert "kNN vote" in out and "model: P(Pneumonia)" in out
    assert Image.open(montage).size[0] > 0
    code, out, err = run("query", dicom, "--index", pipeline["index"], "--collection", "rsna", "--k", 10,
                         "--filter", "label=Pneumonia", "--json")
    labels = [n["labels"] for n in json.loads(out)["neighbors"]]
    assert labels and all("Pneumonia" in lab for lab in labels)


def test_a_filter_typo_is_an_error_never_an_empty_answer(pipeline: dict[str, Path]) -> None:
    """An unknown key, or a value no image holds, is a one-line error (exit 2) that suggests the value matching
    it ignoring case; before, `view=pa` returned no neighbours, exit 0, and a false "no close case" warning."""
    dicom = _dicoms(pipeline["data"])[1]
    for item, expected in (("view=pa", "did you mean view=PA?"), ("foo=bar", "unknown filter key 'foo'"),
                           ("label=pneumonia", "did you mean label=Pneumonia?"), ("split!=tset", "it holds")):
        code, out, err = run("query", dicom, "--index", pipeline["index"], "--collection", "rsna", "--filter", item)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (item, err)
    code, out, err = run("query", dicom, "--index", pipeline["index"], "--collection", "rsna", "--filter", "view=PA",
                         "--json")
    assert code == 0 and json.loads(out)["neighbors"], err


def test_a_damaged_record_is_one_line_from_every_reader(pipeline: dict[str, Path], tmp_path: Path) -> None:
    """Query, evaluate and `index info` read the collection's record through its typed view (`Index.record`), so
    a hand-edited field of the wrong type is named in one line (exit 2). Before, query compared the string "16"
    with the model's 16 and blamed the model ("was built with model …"), and `index info` printed it."""

    from cbir.store import open_index
    index = tmp_path / "index"
    shutil.copytree(pipeline["index"], index)
    with open_index(str(index), writable=True) as idx:
        name = idx.resolve("rsna")
        idx.set_meta(name, {**idx.get_meta(name), "dim": "16"})
    dicom = _dicoms(pipeline["data"])[0]
    for args in (("query", dicom, "--index", index, "--collection", "rsna", "--model", pipeline["model"]),
                 ("evaluate", "--index", index, "--collection", "rsna", "--model", pipeline["model"], "--out",
                  tmp_path / "report"),
                 ("index", "info", "--index", index)):
        code, out, err = run(*args)
        assert code == 2 and "its record's 'dim' is a str, not a int" in err, (args, err)
        assert "Traceback" not in err and "was built with model" not in err


def test_only_the_store_reads_a_collection_record_untyped() -> None:
    """Every reader outside the store's own record code (the lock, snapshots, reindexing and migrations, which
    copy or transform the whole record) asks `Index.record` for the typed view, never `get_meta`."""
    allowed = {"cbir/store/base.py", "cbir/store/snapshots.py", "cbir/store/versions.py"}
    root = Path(__file__).resolve().parents[1]
    offenders = [str(path.relative_to(root)) for path in sorted((root / "cbir").rglob("*.py"))
                 if "get_meta(" in path.read_text() and str(path.relative_to(root)) not in allowed
                 and path.parent.name != "migrations" and "def get_meta(" not in path.read_text()]
    assert offenders == []


def test_evaluate_writes_reports(pipeline: dict[str, Path]) -> None:
    out_dir = pipeline["root"] / "report"
    code, out, err = run("evaluate", "--index", pipeline["index"], "--collection", "rsna", "--k", 5,
                         "--out", out_dir, "--json")
    assert code == 0, err
    report = json.loads(out)
    for key in ("roc_auc",):
        assert key in report["stage1"]
    for key in ("knn_accuracy", "balanced_accuracy", "precision_at_k", "map_at_k"):
        assert 0.0 <= report["stage2"][key] <= 1.0
    assert 0.5 <= report["baseline"]["majority_accuracy"] <= 1.0
    assert report["k"] == 5 and report["n_queries"] > 0
    for name in ("report.md", "report.json", "roc.png", "precision_at_k.png"):
        assert (out_dir / name).is_file(), name
    assert "roc.png" in (out_dir / "report.md").read_text()


def test_no_phi_in_payloads_or_metadata(pipeline: dict[str, Path]) -> None:
    """RSNA names each file after its patientId: that, too, is nowhere in the index (nor any other header
    value); payloads name the file by a keyed pseudonym, which this machine's file map resolves."""
    from cbir.store import open_index
    secrets: set[str] = set()
    for path in _dicoms(pipeline["data"]):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                        "SOPInstanceUID", "StudyInstanceUID", "OtherPatientIDs"):
            value = str(ds.get(keyword) or "").strip()
            if len(value) >= 6:
                secrets.add(value)
    assert len(secrets) > N and {p.stem for p in _dicoms(pipeline["data"])} <= secrets   # the file names too
    with open_index(str(pipeline["index"])) as idx:
        payloads = [p.payload for p in idx.scroll("rsna", with_thumbnails=True)]
        dump = json.dumps(idx.get_meta("rsna")) + json.dumps(payloads)
    leaked = [s for s in secrets if s in dump]
    assert leaked == []
    assert all(p["path"] is None and p["file"].startswith("f-") and p["pseudonym"].startswith("p-")
               for p in payloads)
    assert {payload_path(p) for p in payloads} == {f"stage_2_train_images/{d.name}" for d in _dicoms(
        pipeline["data"])}


def test_query_bad_file_is_one_line(pipeline: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom at all" * 20)
    code, out, err = run("query", bad, "--index", pipeline["index"], "--collection", "rsna")
    assert code == 2
    assert str(bad) in err and "Traceback" not in err + out and len(err.strip().splitlines()) == 1


def test_query_with_another_model_is_refused(pipeline: dict[str, Path], tmp_path: Path) -> None:
    from cbir.models import ModelConfig, create_model, save_checkpoint
    other = save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16,
                                                     bits=32, code_seed=9)), tmp_path / "other")
    recorded = (pipeline["model"] / "fingerprint").read_text().strip()
    code, out, err = run("query", _dicoms(pipeline["data"])[0], "--model", tmp_path / "other", "--index",
                         pipeline["index"], "--collection", "rsna")
    assert code == 2 and other in err and recorded in err


def test_unknown_collection_and_missing_index(pipeline: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run("query", _dicoms(pipeline["data"])[0], "--index", pipeline["index"],
                       "--collection", "nope")
    assert code == 2 and "no collection 'nope'" in err and len(err.strip().splitlines()) == 1
    # it lists the collections by the names users query them with, not their stored versions (rsna__v1)
    assert "(collections: rsna)" in err and "__v" not in err
    for args in (("index", "info"), ("query", _dicoms(pipeline["data"])[0]), ("evaluate",)):
        code, _, err = run(*args, "--index", tmp_path / "nowhere")
        assert code == 2 and "nowhere: no index here" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "nowhere").exists()


def test_empty_collection_is_one_line(pipeline: dict[str, Path], tmp_path: Path) -> None:
    from cbir.store import open_index
    from cbir.store.versions import create_versioned
    with open_index(str(pipeline["index"])) as idx:
        meta = idx.get_meta("rsna")
    with open_index(str(tmp_path / "index"), writable=True, create=True) as idx:
        create_versioned(idx, "empty", meta["dim"], meta["bits"], meta)
    for args in (("query", _dicoms(pipeline["data"])[0]), ("evaluate", "--out", tmp_path / "rep")):
        code, out, err = run(*args, "--index", tmp_path / "index", "--collection", "empty")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "collection 'empty' is empty: ingest images into it first" in err and "Traceback" not in err


def test_dataset_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run("train", "--data", tmp_path / "empty", "--out", tmp_path / "m")
    assert code == 2 and "empty" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "badcsv"
    (bad / "stage_2_train_images").mkdir(parents=True)
    (bad / "stage_2_train_labels.csv").write_text("patientId,x,y\nabc,1,2\n")
    code, _, err = run("train", "--data", bad, "--layout", "rsna", "--out", tmp_path / "m")
    assert code == 2 and "Target" in err and len(err.strip().splitlines()) == 1
    code, _, err = run("train", "--data", bad, "--layout", "nih", "--out", tmp_path / "m")
    assert code == 2 and "Data_Entry" in err


def test_ingest_goes_on_past_bad_files(pipeline: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(pipeline["data"], data)
    victims = _dicoms(data)[:2]
    victims[0].write_bytes(b"")
    victims[1].write_bytes(victims[1].read_bytes()[:400])
    code, out, err = run("ingest", "--data", data, "--model", pipeline["model"], "--index", tmp_path / "idx",
                         "--collection", "c", "--workers", 0)
    assert code == 1
    assert f"{N - 2} ingested" in out and "2 failed" in out
    for victim in victims:
        assert str(victim) in err
    assert "Traceback" not in err


def test_evaluate_on_another_dataset(pipeline: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert run("synth", "--layout", "rsna", "--n", 16, "--size", 48, "--out", other, "--seed", 11)[0] == 0
    code, out, err = run("evaluate", "--index", pipeline["index"], "--collection", "rsna", "--queries", other,
                         "--layout", "rsna", "--k", 3, "--out", tmp_path / "rep", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["n_queries"] == 16 and report["context"]["archive_size"] == N


def test_demo_runs_end_to_end_small(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    code, out, err = run("demo", "--out", out_dir, "--n", 60, "--size", 32, "--epochs", 1, "--backbone",
                         "test_resnet")
    assert code == 0, err
    for name in ("montage.png", "query.json", "report/report.md", "report/report.json", "model/config.json"):
        assert (out_dir / name).is_file(), name
    query = json.loads((out_dir / "query.json").read_text())
    assert all(n["split"] in ("train", "val") for n in query["neighbors"])
    assert "ROC-AUC" in out
    # the query's own label is shown beside the vote (before, nothing said when the vote was wrong), and the
    # vote is the calibrated one, described by what decided it
    own = query["query"]["label"]
    assert own in ("Pneumonia", "No Pneumonia") and f"its own label: {own}" in out
    assert "vote: " in out and "P(Pneumonia) = " in out and query["vote"]["operating_point"] > 0
    code, _, err = run("demo", "--out", out_dir, "--n", 60, "--size", 32, "--epochs", 1, "--backbone", "test_resnet")
    assert code == 0, err  # a demo folder can be rerun
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    code, _, err = run("demo", "--out", tmp_path / "precious")
    assert code == 2 and "not a cbir demo folder" in err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_detection_task_through_the_cli(pipeline: dict[str, Path], tmp_path: Path) -> None:
    model, index = tmp_path / "det", tmp_path / "idx"
    code, out, err = run("train", "--data", pipeline["data"], "--task", "detection", "--backbone", "test_resnet",
                         "--image-size", 64, "--epochs", 1, "--embed-dim", 16, "--bits", 32, "--out", model,
                         "--workers", 0, "--batch-size", 8)
    assert code == 0, err
    assert json.loads((model / "config.json").read_text())["task"] == "detection"
    code, out, err = run("ingest", "--data", pipeline["data"], "--model", model, "--index", index,
                         "--collection", "det", "--workers", 0)
    assert code == 0 and f"{N} ingested" in out, err
    code, out, err = run("query", _dicoms(pipeline["data"])[0], "--index", index, "--collection", "det", "--k", 3,
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["neighbors"]) == 3 + result["vote"]["self_matches"] and result["neighbors"][0]["self_match"]
    assert 0.0 <= result["prediction"]["probability"] <= 1.0
    height, width = result["query"]["shape"]
    for found in result["prediction"]["boxes"]:
        x, y, w, h = found["box"]
        assert 0 <= x <= x + w <= width + 0.1 and 0 <= y <= y + h <= height + 0.1 and 0 <= found["score"] <= 1
    code, out, err = run("evaluate", "--index", index, "--collection", "det", "--k", 3, "--out", tmp_path / "rep",
                         "--json")
    assert code == 0, err
    stage1 = json.loads(out)["stage1"]
    assert "roc_auc" in stage1 and stage1["box_images"] > 0  # box mAP on the ingested dataset's test split
    assert stage1["box_map"] is None or 0 <= stage1["box_map"] <= 1


def test_reproduce_cross_validates_and_writes_the_results_table(pipeline: dict[str, Path], tmp_path: Path) -> None:
    nih = tmp_path / "nih"
    assert run("synth", "--layout", "nih", "--n", 40, "--size", 48, "--out", nih, "--seed", 2)[0] == 0
    doc, readme = tmp_path / "results-doc.md", tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- cbir:headline -->\nstale text\n<!-- /cbir:headline -->\n\nrest\n")
    code, out, err = run("reproduce", "--data", pipeline["data"], "--nih", nih, "--out", tmp_path / "res",
                         "--folds", 2, "--backbone", "test_resnet", "--image-size", 48, "--epochs", 1, "--bits", 32,
                         "--k", 5, "--doc", doc, "--readme", readme)
    assert code == 0, err
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert results["complete"] and results["tasks"] == ["binary", "hash", "multilabel", "detection"]
    assert [(r["fold"], r["task"]) for r in results["folds"]] == [
        (f, t) for f in (1, 2) for t in ("binary", "hash", "multilabel", "detection")]
    from cbir.data.layout import load_dataset
    from cbir.data.splits import SplitSpec
    for row in results["folds"]:
        assert 0 <= row["knn_accuracy"] <= 1 and 0.5 <= row["majority_accuracy"] <= 1 and row["bits"] == 32
        assert {"model", "lsh"} <= set(row["codes"]), row["task"]  # ITQ needs bits ≤ archive size
        # each fold's queries are exactly its test fold, and its model was trained on that split
        test = load_dataset(pipeline["data"], "rsna", split=SplitSpec(folds=2, fold=row["fold"])).split("test")
        assert row["n_queries"] == len(test) and row["n_archive"] == N - len(test)
        split = json.loads((tmp_path / "res" / "models" / f"fold{row['fold']}" / row["task"] / "split.json")
                           .read_text())
        assert split["spec"]["folds"] == 2 and split["spec"]["fold"] == row["fold"]
        if row["task"] == "detection":  # box mAP on the same test fold as the queries
            assert row["heldout"]["n_images"] == len(test)
    assert sum(r["n_queries"] for r in results["folds"] if r["task"] == "binary") == N  # every patient once
    pooled = results["pooled"]["binary"]
    assert pooled["n_queries"] == N and pooled["knn_accuracy_ci"][0] <= pooled["knn_accuracy"] <= \
        pooled["knn_accuracy_ci"][1]
    multilabel = [r for r in results["folds"] if r["task"] == "multilabel"]
    assert all(r["trained_on"] == "nih" for r in multilabel)
    from cbir.data.nih import FINDINGS
    assert list(multilabel[0]["heldout"]["per_class_auc"]) == list(FINDINGS)
    own = multilabel[0]["heldout"]["retrieval"]
    assert own["collection"] == "multilabel-nih-fold1" and own["n_queries"] > 0
    table = (tmp_path / "res" / "results.md").read_text()
    assert "2-fold cross-validation by patient" in table and "| Binary classification + hash layer |" in table
    assert "83.57 / 78.67" in table and "±" in table and "Pooled over the folds" in table
    assert "per-finding ROC-AUC" in table and "box mAP" in table
    assert table.strip() in doc.read_text()  # written into the document's own section
    headline = readme.read_text()
    assert "stale text" not in headline and "rest" in headline and "2-fold cross-validation" in headline
    # one vote: the headline leads with the calibrated vote that `cbir query` shows; the plain majority is a baseline
    vote = f"reaches **{100 * pooled['vote_balanced_accuracy']:.1f} ("
    assert vote in headline and headline.index(vote) < headline.index("the plain majority of the")
    from cbir.store import open_index
    with open_index(str(tmp_path / "res" / "index")) as index:
        assert "binary-fold2" in index.list_aliases() and "multilabel-nih-fold1" in index.list_aliases()
    # --reuse keeps the trained models (and their recorded training time) and redoes ingest + evaluation
    code, out, err = run("reproduce", "--data", pipeline["data"], "--out", tmp_path / "res", "--task", "binary",
                         "--folds", 2, "--backbone", "test_resnet", "--image-size", 48, "--epochs", 1, "--bits", 32,
                         "--k", 5, "--reuse")
    assert code == 0, err
    again = json.loads((tmp_path / "res" / "results.json").read_text())["folds"][0]
    assert "reusing the model" in err + out
    assert again["seconds"]["train"] == pytest.approx(json.loads(
        (tmp_path / "res" / "models" / "fold1" / "binary" / "train.json").read_text())["seconds"], abs=0.1)
    assert again["knn_accuracy"] == results["folds"][0]["knn_accuracy"]
    code, out, err = run("reproduce", "--data", pipeline["data"], "--out", tmp_path / "res2", "--task", "multilabel")
    assert code == 2 and "multilabel needs --nih" in err
    # cbir compare pools each approach's folds into one row; a run against itself differs by exactly 0
    code, out, err = run("compare", tmp_path / "res", tmp_path / "res", "--name-a", "A", "--name-b", "B",
                         "--doc", doc, "--json", tmp_path / "compare.json")
    assert code == 0, err
    compared = json.loads((tmp_path / "compare.json").read_text())
    assert set(compared["evaluations"]) == {"binary", "hash", "multilabel", "multilabel-nih", "detection"}
    binary = compared["evaluations"]["binary"]
    assert binary["n_queries"] == N and binary["measures"]["roc_auc"]["a"] == pytest.approx(pooled["roc_auc"])
    assert all(m["difference"] == 0 and m["verdict"] == "level" for e in compared["evaluations"].values()
               for m in e["measures"].values())
    assert "<!-- cbir:compare-a-vs-b -->" in doc.read_text() and "| binary | " in out
    # another split's queries are not the same queries: one line, exit code 2, nothing written
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "res" / "reports", other / "reports")
    moved = other / "reports" / "fold2" / "binary" / "per_query.json"
    body = json.loads(moved.read_text())
    body["target"] = body["target"][1:] + body["target"][:1]
    moved.write_text(json.dumps(body))
    code, out, err = run("compare", tmp_path / "res", other)
    assert code == 2 and "'binary' does not hold the same queries" in err and "fold 2" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, out, err = run("compare", tmp_path / "res", tmp_path / "nowhere")
    assert code == 2 and "no such folder" in err
    code, out, err = run("compare", tmp_path / "res", tmp_path / "res", "--json", tmp_path / "no" / "c.json")
    assert code == 2 and "its folder does not exist" in err and out == ""


def test_reproduce_and_the_cli_run_one_ingest_use_case(tmp_path: Path) -> None:
    """`reproduce` used to skip the calibration that `cbir ingest` stored (its evaluation refitted one on the fly):
    both now run `cbir.app.ingest.ingest_records`, which ends calibrated, and store the same calibration."""
    res, data = tmp_path / "res", tmp_path / "data"
    assert run("synth", "--layout", "rsna", "--n", 120, "--size", 48, "--out", data, "--seed", 5)[0] == 0
    code, out, err = run("reproduce", "--data", data, "--out", res, "--task", "binary", "--folds", 2,
                         "--val-fraction", 0.25, "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1,
                         "--bits", 32)
    assert code == 0, err
    assert run("ingest", "--data", data, "--model", res / "models" / "fold1" / "binary", "--index",
               tmp_path / "cli-index", "--collection", "binary-fold1", "--workers", 0)[0] == 0
    from cbir.store import open_index

    def fitted(index: Path) -> dict:
        with open_index(str(index)) as idx:
            body = idx.record("binary-fold1").vote_calibration
        assert body, "no calibration stored"
        return {**body, "conditions": {k: v for k, v in body["conditions"].items() if k != "at"}}
    by_reproduce, by_cli = fitted(res / "index"), fitted(tmp_path / "cli-index")
    assert by_reproduce["conditions"] == by_cli["conditions"] and by_reproduce["conditions"]["n"] >= 20
    # the same fit; its numbers agree to float32 noise (the two ran the model in batches of other sizes)
    assert by_reproduce["vote"] == pytest.approx(by_cli["vote"], rel=1e-5, abs=1e-6)
    assert by_reproduce["nearest"] == pytest.approx(by_cli["nearest"], rel=1e-5, abs=1e-6)


def _info(index: Path) -> dict[str, dict]:
    code, out, err = run("index", "info", "--index", index, "--json")
    assert code == 0, err
    return {row["collection"]: row for row in json.loads(out)["collections"]}


def test_reindex_with_a_new_model(pipeline: dict[str, Path], tmp_path: Path) -> None:
    index = tmp_path / "index"
    base = ("--data", pipeline["data"], "--index", index, "--collection", "re", "--workers", 0)
    assert run("ingest", *base, "--model", pipeline["model"])[0] == 0
    new_model = tmp_path / "model2"
    code, out, err = run("train", "--data", pipeline["data"], "--layout", "rsna", "--task", "binary", "--backbone",
                         "test_resnet", "--image-size", 32, "--epochs", 1, "--embed-dim", 24, "--bits", 16,
                         "--out", new_model, "--workers", 0, "--seed", 5)
    assert code == 0, err
    code, out, err = run("ingest", *base, "--model", new_model)          # a plain ingest refuses the new model
    assert code == 2 and "was built with model" in err
    code, out, err = run("ingest", *base, "--model", new_model, "--reindex")
    assert code == 0, err
    assert "alias 're' now points at 're__v2'" in out and "'re__v1' (60 points) was deleted" in out
    row = _info(index)["re"]
    assert row["stored_as"] == "re__v2" and row["points"] == N and row["bits"] == 16
    assert row["dim"] == ModelConfig(embed_dim=24).vector_dim
    assert row["model_fingerprint"] == (new_model / "fingerprint").read_text().strip()
    dicom = _dicoms(pipeline["data"])[0]
    code, out, err = run("query", dicom, "--index", index, "--collection", "re", "--k", 3, "--json")
    assert code == 0, err
    assert len(json.loads(out)["neighbors"]) == 3 + 1     # the archived query itself, flagged, plus 3 voters
    code, out, err = run("query", dicom, "--index", index, "--collection", "re", "--model", pipeline["model"])
    assert code == 2 and "was built with model" in err
    code, out, err = run("ingest", *base[:4], "--collection", "nothing", "--model", new_model, "--reindex")
    assert code == 2 and "no collection 'nothing' to reindex" in err
    code, out, err = run("ingest", *base, "--model", new_model, "--reindex", "--part", "1/2")
    assert code == 2 and "cannot be combined with --part" in err


def test_teams_get_their_own_collections(pipeline: dict[str, Path], tmp_path: Path) -> None:
    from cbir.store import open_index
    index = tmp_path / "index"
    base = ("--data", pipeline["data"], "--model", pipeline["model"], "--index", index, "--collection", "cases",
            "--workers", 0)
    assert run("ingest", *base, "--team", "radiology", "--part", "1/2")[0] == 0
    assert run("ingest", *base, "--team", "icu", "--part", "2/2")[0] == 0
    info = _info(index)
    assert info["radiology.cases"]["team"] == "radiology" and info["icu.cases"]["team"] == "icu"
    assert info["radiology.cases"]["points"] + info["icu.cases"]["points"] == N
    with open_index(str(index)) as idx:
        teams = {name: {p.id: p.payload["team"] for p in idx.scroll(name)} for name in ("radiology.cases",
                                                                                         "icu.cases")}
    assert set(teams["radiology.cases"].values()) == {"radiology"} and set(teams["icu.cases"].values()) == {"icu"}
    assert not teams["radiology.cases"].keys() & teams["icu.cases"].keys()
    for dicom in _dicoms(pipeline["data"])[:4]:
        code, out, err = run("query", dicom, "--index", index, "--collection", "cases", "--team", "icu", "--k", 30,
                             "--json")
        assert code == 0, err
        assert {n["id"] for n in json.loads(out)["neighbors"]} <= teams["icu.cases"].keys()
    code, out, err = run("ingest", *base[:6], "--collection", "radiology.cases", "--workers", 0)
    assert code == 2 and "belongs to team 'radiology'; pass --team radiology" in err
    code, out, err = run("ingest", *base[:6], "--collection", "radiology.cases", "--team", "icu", "--workers", 0)
    assert code == 2 and "without a team prefix" in err
    code, out, err = run("query", _dicoms(pipeline["data"])[0], "--index", index, "--team", "Bad Team")
    assert code == 2 and "--team 'Bad Team'" in err


def test_export_and_import_through_the_cli(pipeline: dict[str, Path], tmp_path: Path) -> None:
    snapshot = tmp_path / "rsna.snapshot"
    code, out, err = run("index", "export", "rsna", "--index", pipeline["index"], "--out", snapshot)
    assert code == 0, err
    assert f"exported {N} points of 'rsna'" in out and "edge shard" in out
    for location in (str(tmp_path / "edge"), f"local:{tmp_path / 'local'}"):
        code, out, err = run("index", "import", snapshot, "--index", location)
        assert code == 0, err
        assert f"imported {N} points: alias 'rsna' now points at 'rsna__v1'" in out
        row = _info(location)["rsna"]
        assert row["points"] == N and row["schema_version"] == 2
        dicom = _dicoms(pipeline["data"])[2]
        code, out, err = run("query", dicom, "--index", location, "--collection", "rsna", "--k", 3, "--json",
                             "--local-paths", "--model", pipeline["model"])   # a snapshot names no model folder
        assert code == 0, err   # the file map is this machine's, whatever index the points went to
        assert json.loads(out)["neighbors"][0]["path"] == f"stage_2_train_images/{dicom.name}"
    code, out, err = run("index", "import", tmp_path / "nope.snapshot", "--index", tmp_path / "edge")
    assert code == 2 and "no such file" in err


def _phi_values(data: Path) -> set[str]:
    """Every identifying value the synthetic DICOMs carry (names, IDs, dates, accession, institution, address,
    physician, UIDs and the private tag), the PatientID that RSNA uses as the file name included, and the file
    names themselves. (Study times are left out: six digits also occur inside probabilities.)"""
    keywords = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber",
                "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "StudyDate", "SOPInstanceUID",
                "StudyInstanceUID", "SeriesInstanceUID")
    secrets: set[str] = set()
    for path in _dicoms(data):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        secrets |= {str(ds.get(k) or "").strip() for k in keywords}
        secrets |= {str(elem.value).strip() for elem in ds if elem.tag.is_private and elem.VR == "LO"}
        family, given = str(ds.PatientName).split("^")[:2]
        secrets |= {family, f"{family}^{given}", path.stem}   # a family name alone is identifying too
    return {s for s in secrets if len(s) >= 6}


def _named_archive(source: Path, out: Path) -> Path:
    """`source` (RSNA layout) with every file named as some hospital exports name them: family and given name,
    then the PatientID (`DOE^JANE_<PatientID>.dcm`), the label CSV's patientIds to match."""
    images = out / "stage_2_train_images"
    images.mkdir(parents=True)
    renamed = {}
    for path in _dicoms(source):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        family, given = str(ds.PatientName).split("^")[:2]
        renamed[path.stem] = f"{family}^{given}_{ds.PatientID}"
        (images / f"{renamed[path.stem]}.dcm").write_bytes(path.read_bytes())
    lines = (source / "stage_2_train_labels.csv").read_text().splitlines(keepends=True)
    rows = [lines[0]] + [renamed[line.split(",", 1)[0]] + "," + line.split(",", 1)[1] for line in lines[1:]]
    (out / "stage_2_train_labels.csv").write_text("".join(rows))
    return out


def test_no_phi_anywhere_cbir_writes(pipeline: dict[str, Path], tmp_path: Path) -> None:
    """File names that carry the patient's name and PatientID, headers full of fake PHI: ingest (with
    thumbnails), query (table, montage, JSON), evaluate, index info and export, then search every payload, the
    collection metadata, every byte of the index and of every output file (names too, PNG text chunks
    included) and every line of output. The names are only in this machine's local file map."""
    from cbir.store import open_index
    from cbir.store.files import FileMap
    data = _named_archive(pipeline["data"], tmp_path / "named")
    secrets = _phi_values(data)
    assert len(secrets) > 7 * N and any(s.startswith("SYNTH-PATIENT-KEY-") for s in secrets)
    assert all(any(s in d.name for s in secrets) for d in _dicoms(data))   # the names are in the file names
    logs = []
    index, out_dir = tmp_path / "index", tmp_path / "out"
    query = _dicoms(data)[3]
    for args in (("ingest", "--data", data, "--model", pipeline["model"], "--index", index, "--collection", "phi",
                  "--workers", 0, "--thumbnails"),
                 ("query", query, "--index", index, "--collection", "phi", "--k", 5, "--montage",
                  out_dir / "montage.png"),
                 ("query", query, "--index", index, "--collection", "phi", "--json"),
                 ("evaluate", "--index", index, "--collection", "phi", "--k", 5, "--out", out_dir / "rep"),
                 ("index", "info", "--index", index, "--json"),
                 ("index", "export", "phi", "--index", index, "--out", out_dir / "phi.snapshot")):
        code, out, err = run(*args)
        assert code == 0, err
        logs.append(out + err)
    texts = list(logs)
    names = []
    for path in [*out_dir.rglob("*"), *index.rglob("*")]:
        names.append(str(path.relative_to(tmp_path)))
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
        if path.suffix == ".png":
            texts.append(json.dumps(Image.open(path).info, default=str))
    with open_index(str(index)) as idx:
        payloads = [p.payload for p in idx.scroll("phi", with_thumbnails=True)]
        texts.append(json.dumps(payloads) + json.dumps(idx.get_meta("phi")))
    haystack = "\n".join(texts + names)
    assert len(names) >= 6 and all(p.get("thumbnail") for p in payloads)
    leaked = sorted(s for s in secrets if s in haystack)
    assert leaked == [], leaked[:5]
    # the one place the names are: the local file map, never the index
    with FileMap.local(Settings.from_env().state_dir) as file_map:
        assert {file_map.relpath(p["file"]) for p in payloads} == {f"stage_2_train_images/{d.name}"
                                                                   for d in _dicoms(data)}


def test_written_files_name_no_file_folder_or_host(pipeline: dict[str, Path], tmp_path: Path) -> None:
    """Runs with failures: evaluate --robustness on external queries with a bad file named by a patient, and a
    snapshot. The console names the user's files; report.json and the snapshot must not. Before, report.json held
    "path: reason" examples and the queries' folder, and a snapshot carried the ingest roots, the model's folder
    and the index's location."""
    import tarfile
    assert run("synth", "--layout", "rsna", "--n", 20, "--size", 48, "--out", tmp_path / "other-patients",
               "--seed", 9)[0] == 0
    data = _named_archive(tmp_path / "other-patients", tmp_path / "named")
    bad = data / "stage_2_train_images" / "ROE^JANE_MRN-0042.dcm"
    bad.write_bytes(b"\x01" * 300)
    labels = data / "stage_2_train_labels.csv"
    labels.write_text(labels.read_text() + "ROE^JANE_MRN-0042,,,,,0\n")
    index, out_dir = tmp_path / "index", tmp_path / "out"
    code, out, err = run("ingest", "--data", pipeline["data"], "--model", pipeline["model"], "--index", index,
                         "--collection", "c", "--workers", 0)
    assert code == 0, err
    code, out, err = run("evaluate", "--index", index, "--collection", "c", "--k", 3, "--out", out_dir / "rep",
                         "--queries", data, "--robustness", "--other-split")
    assert code in (0, 1), err
    assert "ROE^JANE_MRN-0042.dcm" in err, err                          # the console names the user's own file
    report = (out_dir / "rep" / "report.json").read_text()
    reasons = json.loads(report)["robustness"]["failure_reasons"]
    assert sum(reasons.values()) >= 1 and any("not a DICOM file" in r for r in reasons)
    code, out, err = run("index", "export", "c", "--index", index, "--out", out_dir / "c.snapshot")
    assert code == 0, err
    with tarfile.open(out_dir / "c.snapshot") as tar:
        manifest = json.loads(tar.extractfile("cbir.json").read())
    assert "roots" not in manifest["meta"] and "model_path" not in manifest["meta"]
    assert manifest["meta"]["model_fingerprint"] and manifest["source"] == "an embedded index"
    for text in (report, json.dumps(manifest)):
        for secret in ("ROE^JANE", "MRN-0042", str(data), str(pipeline["data"]), str(pipeline["model"]),
                       str(index), str(tmp_path)):
            assert secret not in text, secret
    # an imported collection names its model by fingerprint only: the importer passes their own copy
    code, out, err = run("index", "import", out_dir / "c.snapshot", "--index", tmp_path / "other")
    assert code == 0, err
    dicom = _dicoms(pipeline["data"])[0]
    code, out, err = run("query", dicom, "--index", tmp_path / "other", "--collection", "c")
    assert code == 2 and "pass --model with the model of fingerprint" in err and len(err.strip().splitlines()) == 1
    code, out, err = run("query", dicom, "--index", tmp_path / "other", "--collection", "c", "--model",
                         pipeline["model"], "--k", 2)
    assert code == 0, err


def test_a_shared_servers_record_never_chooses_the_model_to_load(pipeline: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone who may write a server's metadata could point `model_path` at a checkpoint that carries code: on a
    server, the record's path is loaded only from a folder the user lists in $CBIR_MODEL_DIRS (else --model)."""
    from types import SimpleNamespace

    from cbir.app.open import collection_model
    from cbir.store.record import CollectionRecord
    record = CollectionRecord.of({"model_path": str(pipeline["model"]), "model_fingerprint": "f"}, "c")
    server = SimpleNamespace(is_server=True, record=lambda name: record)
    monkeypatch.delenv("CBIR_MODEL_DIRS", raising=False)
    with pytest.raises(CbirError, match="is on a shared server, and its record names model folder"):
        collection_model(server, "c", None, "cpu", Settings.from_env())
    monkeypatch.setenv("CBIR_MODEL_DIRS", str(pipeline["model"].parent))
    assert collection_model(server, "c", None, "cpu", Settings.from_env()).path == pipeline["model"]
    embedded = SimpleNamespace(is_server=False, record=lambda name: record)
    monkeypatch.delenv("CBIR_MODEL_DIRS")
    assert collection_model(embedded, "c", None, "cpu", Settings.from_env()).path == pipeline["model"]  # our own


def test_a_patient_filter_takes_the_patient_id(pipeline: dict[str, Path]) -> None:
    """Payloads hold keyed pseudonyms: `patient=ID` compared the raw ID with them and matched nothing, and
    `patient!=ID` excluded nothing. Now the ID is keyed as the payloads' are; a pseudonym from query JSON is kept."""
    dicom = _dicoms(pipeline["data"])[0]
    patient = dicom.stem                                               # RSNA: the file is named by its patientId
    code, out, err = run("query", dicom, "--index", pipeline["index"], "--collection", "rsna", "--k", 5,
                         "--filter", f"patient={patient}", "--json", "--include-self")
    assert code == 0, err
    found = json.loads(out)["neighbors"]
    assert len(found) == 1 and found[0]["self_match"] and found[0]["file"]
    code, out, err = run("query", dicom, "--index", pipeline["index"], "--collection", "rsna", "--k", 5,
                         "--filter", f"patient!={patient}", "--json", "--include-self")
    assert code == 0 and not any(n["self_match"] for n in json.loads(out)["neighbors"])
    from cbir.io import load_pseudonymizer
    pseudonym = load_pseudonymizer()(patient)
    code, out, err = run("query", dicom, "--index", pipeline["index"], "--collection", "rsna", "--k", 5,
                         "--filter", f"patient={pseudonym}", "--json", "--include-self")
    assert code == 0 and len(json.loads(out)["neighbors"]) == 1


def test_a_key_is_never_taken_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--api-key KEY` showed the server's admin key in ps and the shell history (the README's own flow passed it
    so). Now a key comes from the environment or a file, and the option is a one-line refusal."""
    import jwt
    code, out, err = run("--api-key", "s3cret-admin-key", "index", "info", "--index", tmp_path / "i")
    assert code == 2 and "--api-key-file" in err and len(err.strip().splitlines()) == 1
    assert "s3cret-admin-key" not in err
    key = tmp_path / "admin.key"
    key.write_text("a" * 64 + "\n")
    monkeypatch.delenv("CBIR_QDRANT_API_KEY", raising=False)
    code, out, err = run("--api-key-file", key, "index", "token", "--team", "radiology", "--collection", "rsna")
    assert code == 0, err
    claims = jwt.decode(out.strip(), "a" * 64, algorithms=["HS256"])   # signed with the file's key
    assert claims["access"] == [{"collection": "radiology.rsna", "access": "r"}]
    code, out, err = run("--api-key-file", tmp_path / "missing.key", "index", "info", "--index", tmp_path / "i")
    assert code == 2 and "cannot read the API key file" in err


def test_keep_paths_stores_plain_paths_and_says_so(pipeline: dict[str, Path], tmp_path: Path) -> None:
    from cbir.store import open_index
    index = tmp_path / "index"
    base = ("ingest", "--data", pipeline["data"], "--model", pipeline["model"], "--index", index, "--workers", 0)
    code, out, err = run(*base, "--collection", "plain", "--keep-paths")
    assert code == 0, err
    warning = [line for line in err.splitlines() if "--keep-paths" in line]
    assert len(warning) == 1 and "identify nobody" in warning[0]
    with open_index(str(index)) as idx:
        payloads = [p.payload for p in idx.scroll("plain")]
        assert idx.get_meta("plain")["paths"] == "plain"
    assert {p["path"] for p in payloads} == {f"stage_2_train_images/{d.name}" for d in _dicoms(pipeline["data"])}
    assert all(p["file"] is None for p in payloads)
    assert _info(index)["plain"]["paths"] == "plain"
    dicom = _dicoms(pipeline["data"])[0]
    code, out, err = run("query", dicom, "--index", index, "--collection", "plain", "--k", 1, "--json")
    assert code == 0 and json.loads(out)["neighbors"][0]["path"] == f"stage_2_train_images/{dicom.name}"
    code, out, err = run(*base, "--collection", "plain")     # a plain collection does not take pseudonyms…
    assert code == 2 and "pass --keep-paths to add to it, or --reindex it" in err
    assert run(*base, "--collection", "named")[0] == 0
    code, out, err = run(*base, "--collection", "named", "--keep-paths")   # …nor a pseudonymised one paths
    assert code == 2 and "ingest into it without --keep-paths" in err and len(err.strip().splitlines()) == 2
    code, out, err = run(*base, "--collection", "plain", "--reindex")      # a reindex pseudonymises them
    assert code == 0, err
    with open_index(str(index)) as idx:
        assert idx.get_meta("plain")["paths"] == "pseudonym"
        assert all(p.payload["path"] is None and p.payload["file"] for p in idx.scroll("plain"))


def test_ingest_refuses_a_second_pseudonym_key(pipeline: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from cbir.io.phi import Pseudonymizer
    from cbir.store import open_index
    index = tmp_path / "index"
    args = ("ingest", "--data", pipeline["data"], "--model", pipeline["model"], "--index", index, "--collection",
            "keyed", "--workers", 0)
    first_key, other_key = "a" * 64, "b" * 64
    monkeypatch.setenv("CBIR_PSEUDONYM_KEY", first_key)
    assert run(*args)[0] == 0
    with open_index(str(index)) as idx:
        before = sorted(p.payload["pseudonym"] for p in idx.scroll("keyed"))
        meta = idx.get_meta("keyed")
    assert meta["key_fingerprint"] == Pseudonymizer(first_key.encode()).fingerprint
    assert first_key not in json.dumps(meta)                     # the fingerprint, never the key
    monkeypatch.setenv("CBIR_PSEUDONYM_KEY", other_key)
    code, out, err = run(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert meta["key_fingerprint"] in err and Pseudonymizer(other_key.encode()).fingerprint in err
    with open_index(str(index)) as idx:
        assert sorted(p.payload["pseudonym"] for p in idx.scroll("keyed")) == before


def test_the_python_api_answers_as_the_cli_does(pipeline: dict[str, Path], tmp_path: Path) -> None:
    """`cbir.query`, `cbir.evaluate` and `cbir.open_index` are the use-cases that the CLI calls: same answers."""
    import cbir
    settings = cbir.Settings.from_env().with_options(index=str(pipeline["index"]))
    dicom = _dicoms(pipeline["data"])[3]
    code, out, err = run("query", dicom, "--index", pipeline["index"], "--collection", "rsna", "--k", 5, "--json")
    assert code == 0, err
    by_cli, by_api = json.loads(out), cbir.query(dicom, collection="rsna", k=5, settings=settings)
    assert [n["id"] for n in by_api["neighbors"]] == [n["id"] for n in by_cli["neighbors"]]
    assert by_api["vote"] == by_cli["vote"] and by_api["prediction"] == by_cli["prediction"]
    with cbir.open_index(settings=settings) as index:
        assert index.count("rsna") == N
    code, out, err = run("evaluate", "--index", pipeline["index"], "--collection", "rsna", "--k", 5, "--out",
                         tmp_path / "cli", "--json")
    assert code == 0, err
    report = cbir.evaluate(collection="rsna", k=5, out=tmp_path / "api", settings=settings)
    assert report["stage2"]["weighted_vote"]["balanced_accuracy"] == pytest.approx(
        json.loads(out)["stage2"]["weighted_vote"]["balanced_accuracy"])
    assert report["stage1"]["roc_auc"] == pytest.approx(json.loads(out)["stage1"]["roc_auc"])


def test_console_tables_fit_80_columns(pipeline: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`cbir index info` truncated every column at 80 columns, and `evaluate` showed the model's sensitivity and
    specificity in the CI column."""
    from cbir.cli import common
    monkeypatch.setattr(common.out, "_width", 80)
    code, out, err = run("index", "info", "--index", pipeline["index"])
    assert code == 0, err
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert "rsna" in out and f"{N}" in out and "32" in out               # name, points, bits: all whole
    code, out, err = run("evaluate", "--index", pipeline["index"], "--collection", "rsna", "--k", 5, "--out",
                         pipeline["root"] / "report80")
    assert code == 0, err
    model_row = next(line for line in out.splitlines() if "model sensitivity / specificity" in line)
    assert "model:" not in out and model_row.count("%") == 2
    assert max(len(line) for line in out.splitlines()) <= 80, out


def test_train_reads_images_as_the_settings_allow(pipeline: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """`cbir train` read the pixel limit from $CBIR_MAX_PIXELS, which the CLI wrote; the limit now reaches its
    DataLoader workers in `TrainSettings.reader`, from `Settings.from_env()`."""
    monkeypatch.setenv("CBIR_MAX_PIXELS", "1000")                     # the synthetic images have 48 × 48 pixels
    code, out, err = run("train", "--data", pipeline["data"], "--layout", "rsna", "--backbone", "test_resnet",
                         "--image-size", 32, "--epochs", 1, "--out", tmp_path / "m", "--workers", 0)
    assert code == 2 and "image too large (48×48 pixels, limit 1000" in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "no readable images" in err
