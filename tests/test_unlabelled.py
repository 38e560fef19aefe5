"""Images whose labels are unknown (the plain layout, a folder with one sub-folder), end to end through the CLI on
real files, a real timm model and real Qdrant Edge: they are ingested and found, but never vote and never enter
an evaluation, and both say how many they left out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.store import Filter, open_index
from tests.conftest import run_cli

N_RSNA, N_PLAIN, K = 60, 24, 5


def write_archive(root: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` textured grey PNGs in nested folders (two per patient folder), as an unlabelled archive holds them."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = root / f"patient_{i // 2:03d}" / f"image_{i % 2}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.normal(120, 30, (48, 48)).cumsum(axis=0) / 8 + rng.normal(0, 10, (48, 48))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def ok(*args: object) -> str:
    code, out, err = run_cli(*args)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model trained on synthetic RSNA, the RSNA set, an unlabelled archive, and three Edge collections: RSNA
    only, the archive only, and both (mixed)."""
    root = tmp_path_factory.mktemp("unlabelled")
    rsna, plain, model, index = root / "rsna", root / "archive", root / "model", root / "index"
    ok("synth", "--layout", "rsna", "--n", N_RSNA, "--size", 48, "--out", rsna, "--seed", 5)
    write_archive(plain, N_PLAIN)
    ok("train", "--data", rsna, "--layout", "rsna", "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1,
       "--embed-dim", 16, "--bits", 32, "--out", model, "--workers", 0)
    common = ("--model", model, "--index", index, "--workers", 0)
    ok("ingest", "--data", rsna, "--layout", "rsna", "--collection", "labelled", *common)
    line = ok("ingest", "--data", plain, "--layout", "plain", "--patient-regex", r"(patient_\d+)/",
              "--collection", "unlabelled", *common)
    assert f"{N_PLAIN} ingested with unknown labels" in line
    ok("ingest", "--data", rsna, "--layout", "rsna", "--collection", "mixed", *common)
    ok("ingest", "--data", plain, "--layout", "plain", "--patient-regex", r"(patient_\d+)/", "--collection",
       "mixed", *common)
    return {"root": root, "rsna": rsna, "plain": plain, "model": model, "index": index}


def test_payloads_say_the_label_is_unknown(setup: dict[str, Path]) -> None:
    with open_index(str(setup["index"])) as index:
        points = list(index.scroll("unlabelled", with_vectors=False))
        assert len(points) == N_PLAIN and index.count("mixed") == N_RSNA + N_PLAIN
        mixed_unknown = index.count("mixed", Filter(must={"target": -1}))
        splits = {p.payload["split"] for p in points}
    assert mixed_unknown == N_PLAIN
    assert all((p.payload["label"], p.payload["labels"], p.payload["target"]) == (None, [], -1) for p in points)
    assert all(p.payload["dataset"].startswith("d-") and p.payload["path"] is None
               and p.payload["file"].startswith("f-")
               for p in points)   # the dataset's keyed id, never its folder's name; file names are pseudonymised
    assert len({p.payload["dataset"] for p in points}) == 1 and "archive" not in str([p.payload for p in points])
    assert splits <= {"train", "val", "test"} and len(splits) > 1
    by_patient: dict[str, set[str]] = {}
    for p in points:   # two images per patient folder, grouped by --patient-regex: one split per patient
        by_patient.setdefault(p.payload["pseudonym"], set()).add(p.payload["split"])
    assert len(by_patient) == N_PLAIN // 2 and all(len(s) == 1 for s in by_patient.values())


def test_query_of_an_unlabelled_archive_says_the_vote_has_no_voters(setup: dict[str, Path]) -> None:
    image = next(setup["plain"].rglob("*.png"))
    result = json.loads(ok("query", image, "--index", setup["index"], "--collection", "unlabelled", "--k", K,
                           "--json"))
    # the archived query finds itself (flagged, not voting), then K others
    assert len(result["neighbors"]) == K + 1 and result["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert result["neighbors"][0]["self_match"] and result["vote"]["self_matches"] == 1
    assert all(n["label"] is None and n["labels"] == [] for n in result["neighbors"])
    expected = {"label": None, "fraction": 0.0, "positive_fraction": 0.0, "labelled": 0, "skipped_unknown": K,
                "probability": None, "reliable": False}
    assert {key: result["vote"][key] for key in expected} == expected
    text = ok("query", image, "--index", setup["index"], "--collection", "unlabelled", "--k", K)
    assert f"kNN vote: none (all {K} neighbours have unknown labels)" in text and "unknown" in text


def test_query_of_a_mixed_collection_votes_with_the_labelled_neighbours(setup: dict[str, Path]) -> None:
    dicom = sorted((setup["rsna"] / "stage_2_train_images").glob("*.dcm"))[0]
    image = next(setup["plain"].rglob("*.png"))
    for query in (dicom, image):
        result = json.loads(ok("query", query, "--index", setup["index"], "--collection", "mixed", "--k", 70,
                               "--json"))
        vote = result["vote"]
        neighbours = [n for n in result["neighbors"] if not n["self_match"]]   # the query itself does not vote
        assert len(neighbours) == 70 and vote["self_matches"] == len(result["neighbors"]) - 70
        known = [n for n in neighbours if n["label"] is not None]
        assert vote["labelled"] == len(known) and vote["skipped_unknown"] == len(neighbours) - len(known)
        assert vote["skipped_unknown"] >= 10 and len(known) >= 46  # 70 of 60 labelled + 24 unknown: both kinds
        winner = max({n["label"] for n in known}, key=lambda lab: sum(n["label"] == lab for n in known))
        assert vote["fraction"] == pytest.approx(sum(n["label"] == vote["label"] for n in known) / len(known))
        assert sum(n["label"] == vote["label"] for n in known) == sum(n["label"] == winner for n in known)
    text = ok("query", image, "--index", setup["index"], "--collection", "mixed", "--k", 70)
    flat = " ".join(text.split())
    assert f"{vote['labelled']} labelled neighbours" in flat
    assert f"{vote['skipped_unknown']} with unknown labels skipped" in flat


def test_evaluate_skips_unknown_labels_and_counts_them(setup: dict[str, Path]) -> None:
    reports = {}
    for name in ("labelled", "mixed"):
        out = json.loads(ok("evaluate", "--index", setup["index"], "--collection", name, "--k", K, "--out",
                            setup["root"] / f"report-{name}", "--json"))
        reports[name] = out
    with open_index(str(setup["index"])) as index:
        test_unknown = index.count("mixed", Filter(must={"target": -1, "split": "test"}))
    mixed, labelled = reports["mixed"], reports["labelled"]
    assert mixed["unknown_labels"] == {"queries_skipped": test_unknown, "archive_skipped": N_PLAIN - test_unknown}
    assert labelled["unknown_labels"] == {"queries_skipped": 0, "archive_skipped": 0}
    assert 0 < test_unknown < N_PLAIN
    # the unknown images change nothing: the same queries, archive and neighbours as without them
    for key in ("n_queries", "n_archive", "stage1", "stage2", "baseline"):
        assert mixed[key] == labelled[key], key
    markdown = (setup["root"] / "report-mixed" / "report.md").read_text()
    assert (f"**Unknown labels:** {test_unknown} test queries and {N_PLAIN - test_unknown} archive images have "
            "unknown labels") in markdown
    assert "Unknown labels" not in (setup["root"] / "report-labelled" / "report.md").read_text()
    text = ok("evaluate", "--index", setup["index"], "--collection", "mixed", "--k", K, "--out",
              setup["root"] / "report-text")
    assert f"left out (labels unknown): {test_unknown} queries, {N_PLAIN - test_unknown} archive images" in text


def test_unlabelled_only_collection_and_queries_cannot_be_evaluated(setup: dict[str, Path]) -> None:
    code, _, err = run_cli("evaluate", "--index", setup["index"], "--collection", "unlabelled", "--model",
                           setup["model"], "--out", setup["root"] / "r", "--json")
    *warnings, last = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and last.startswith("error:") and "labels are unknown" in warnings[0]
    with open_index(str(setup["index"])) as index:
        n_test = index.count("unlabelled", Filter(must={"split": "test"}))
    assert f"no query images with known labels (the {n_test} images of the test split" in last
    code, _, err = run_cli("evaluate", "--index", setup["index"], "--collection", "labelled", "--queries",
                           setup["plain"], "--layout", "plain", "--out", setup["root"] / "r2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "labels of these" in err and "unknown (plain layout)" in err


@pytest.mark.parametrize("layout", ["plain", "folder"])
def test_training_without_labels_is_one_line(setup: dict[str, Path], layout: str, tmp_path: Path) -> None:
    data = setup["plain"] if layout == "plain" else _one_sub_folder(setup["plain"], tmp_path)
    code, out, err = run_cli("train", "--data", data, "--layout", layout, "--backbone", "test_resnet", "--out",
                             tmp_path / "model", "--workers", 0)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"unknown ({layout} layout), so there is no supervised target for training" in err
    assert not (tmp_path / "model").exists()


def _one_sub_folder(archive: Path, tmp_path: Path) -> Path:
    """A folder layout whose only sub-folder holds the archive: a class that says nothing."""
    root = tmp_path / "folder"
    (root / "images").mkdir(parents=True)
    for path in sorted(archive.rglob("*.png"))[:6]:
        (root / "images" / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    return root
