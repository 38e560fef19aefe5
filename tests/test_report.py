"""cbir.evaluation.summarize and cbir.report.write_report on small synthetic retrieval results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cbir import metrics
from cbir.evaluation import summarize
from cbir.report import write_report

Q, K, ARCHIVE, k = 80, 15, 400, 7
REQUIRED = [
    ("stage1", "roc_auc"), ("stage2", "knn_accuracy"), ("stage2", "balanced_accuracy"),
    ("stage2", "precision_at_k"), ("stage2", "map_at_k"), ("baseline", "majority_accuracy"),
]
FRACTIONS = [
    ("stage1", "roc_auc"), ("stage1", "accuracy_at_0.5"), ("stage1", "balanced_accuracy"),
    ("stage2", "knn_accuracy"), ("stage2", "balanced_accuracy"), ("stage2", "precision_at_k"),
    ("stage2", "map_at_k"), ("stage2", "vote_auc"), ("baseline", "majority_accuracy"),
    ("baseline", "majority_balanced_accuracy"), ("baseline", "archive_positive_rate"),
]


def _data(seed: int = 0, agree: float = 0.7) -> dict:
    """Queries with 30% positives; each neighbour shares the query's label with probability `agree`."""
    rng = np.random.default_rng(seed)
    y = (rng.random(Q) < 0.3).astype(int)
    return {
        "y_query": y,
        "prob_query": np.clip(0.35 * y + 0.65 * rng.random(Q), 0, 1),
        "neighbor_y": np.where(rng.random((Q, K)) < agree, y[:, None], 1 - y[:, None]),
        "archive_y": (rng.random(ARCHIVE) < 0.3).astype(int),
    }


@pytest.fixture(scope="module")
def data() -> dict:
    return _data()


@pytest.fixture(scope="module")
def report(data: dict) -> dict:
    return summarize("Pneumonia", k=k, **data)


# --- summarize -------------------------------------------------------------------------------------


def test_summarize_keys_types_and_ranges(report: dict) -> None:
    assert json.loads(json.dumps(report, allow_nan=False)) == report  # plain JSON, round-trips
    sizes = (report["task"], report["k"], report["n_queries"], report["n_archive"])
    assert sizes == ("Pneumonia", k, Q, ARCHIVE)
    for section, key in REQUIRED:
        assert isinstance(report[section][key], float), (section, key)
    for section, key in FRACTIONS:
        assert 0.0 <= report[section][key] <= 1.0, (section, key)
    assert report["baseline"]["majority_label"] == 0
    assert report["baseline"]["majority_balanced_accuracy"] == 0.5
    curve = report["stage2"]["precision_curve"]
    assert list(curve) == [str(i) for i in range(1, K + 1)]
    assert curve[str(k)] == report["stage2"]["precision_at_k"]
    confusion = np.array(report["stage2"]["confusion"])
    assert confusion.shape == (2, 2) and confusion.sum() == Q
    assert report["stage1"]["n_positive"] + report["stage1"]["n_negative"] == Q


def test_summarize_values_match_metrics(data: dict, report: dict) -> None:
    y, nbr = data["y_query"], data["neighbor_y"]
    pred, _ = metrics.knn_vote(nbr, k)
    relevant = nbr == y[:, None]
    assert report["stage2"]["knn_accuracy"] == pytest.approx(np.mean(pred == y))
    assert report["stage2"]["precision_at_k"] == pytest.approx(relevant[:, :k].mean())
    archive = data["archive_y"]
    n_relevant = np.array([(archive == label).sum() for label in y])
    assert report["stage2"]["map_at_k"] == pytest.approx(metrics.map_at_k(relevant, k, n_relevant))
    assert report["stage2"]["map_at_k_hits"] == pytest.approx(metrics.map_at_k_hits(relevant, k))
    assert report["stage1"]["roc_auc"] == pytest.approx(metrics.roc_auc(y, data["prob_query"]))
    assert report["baseline"]["majority_accuracy"] == pytest.approx(np.mean(y == 0))
    (tn, fp), (fn, tp) = report["stage2"]["confusion"]
    assert (tp, fp) == (int(np.sum((pred == 1) & (y == 1))), int(np.sum((pred == 1) & (y == 0))))
    import sklearn.metrics as sk
    assert report["stage2"]["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    share = (nbr[:, :k] == 1).mean(axis=1)
    assert report["stage2"]["vote_auc"] == pytest.approx(sk.roc_auc_score(y, share))


def test_summarize_custom_relevance_and_extra(data: dict) -> None:
    relevant = np.zeros((Q, K), bool)
    relevant[:, 0] = True
    extra = {"stage2": {"hash_bits": 64}, "timing": {"search_ms": np.float32(1.5)}}
    report = summarize("Pneumonia", k=k, relevant=relevant, extra=extra, n_relevant=np.ones(Q), **data)
    assert report["stage2"]["precision_at_k"] == pytest.approx(1 / k)
    assert report["stage2"]["map_at_k"] == 1.0
    assert report["stage2"]["hash_bits"] == 64 and report["timing"] == {"search_ms": 1.5}
    with pytest.raises(ValueError, match="overwrite"):
        summarize("Pneumonia", k=k, extra={"stage2": {"map_at_k": 1.0}}, **data)
    with pytest.raises(ValueError, match="overwrite"):
        summarize("Pneumonia", k=k, extra={"k": 3}, **data)


def test_summarize_single_class_gives_none_auc(data: dict) -> None:
    ones = dict(data, y_query=np.ones(Q, int))
    report = summarize("Pneumonia", k=k, **ones)
    assert report["stage1"]["roc_auc"] is None and report["stage2"]["vote_auc"] is None
    json.dumps(report, allow_nan=False)


def test_summarize_rejects_bad_input(data: dict) -> None:
    with pytest.raises(ValueError):
        summarize("Pneumonia", k=K + 1, **data)
    with pytest.raises(ValueError):
        summarize("Pneumonia", k=k, **dict(data, prob_query=data["prob_query"][:-1]))
    with pytest.raises(ValueError):
        summarize("Pneumonia", k=k, **dict(data, y_query=data["y_query"] + 1))


# --- write_report ----------------------------------------------------------------------------------

CONTEXT = {"model": {"name": "resnet18", "path": "/models/run1/model.safetensors"},
           "collection": "cxr_test", "dataset": "synthetic", "timings": {"search_s": 0.0123}}


def _written(tmp_path: Path, data: dict, report: dict) -> dict[str, Path]:
    return write_report(report, tmp_path / "out", data["y_query"], data["prob_query"], "Test report", CONTEXT)


def test_write_report_files_and_json(tmp_path: Path, data: dict, report: dict) -> None:
    paths = _written(tmp_path, data, report)
    assert set(paths) == {"json", "markdown", "roc", "precision_at_k"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "report.json", "report.md", "roc.png", "precision_at_k.png"}
    saved = json.loads(paths["json"].read_text())
    assert saved["context"] == CONTEXT and saved["title"] == "Test report"
    assert {key: saved[key] for key in report} == report
    for section, key in REQUIRED:
        assert section in saved and key in saved[section]


def test_write_report_pngs_are_images(tmp_path: Path, data: dict, report: dict) -> None:
    image = pytest.importorskip("PIL.Image")
    paths = _written(tmp_path, data, report)
    for key in ("roc", "precision_at_k"):
        with image.open(paths[key]) as img:
            img.verify()
        with image.open(paths[key]) as img:
            assert img.format == "PNG" and img.size == (600, 480)


def test_write_report_markdown(tmp_path: Path, data: dict, report: dict) -> None:
    md = _written(tmp_path, data, report)["markdown"].read_text()
    assert md.startswith("# Test report\n")
    assert "![ROC](roc.png)" in md and "![Precision@k](precision_at_k.png)" in md
    assert "Majority baseline" in md and 'always "not Pneumonia"' in md
    assert f"{report['baseline']['majority_accuracy']:.3f}" in md
    assert f"{report['stage2']['knn_accuracy']:.3f}" in md and "mAP@7" in md
    assert "resnet18" in md and "cxr_test" in md
    points = 100 * (report["stage2"]["knn_accuracy"] - report["baseline"]["majority_accuracy"])
    assert f"{abs(points):.1f} points above" in md


def test_write_report_says_below_when_knn_loses(tmp_path: Path) -> None:
    data = _data(seed=3, agree=0.35)
    report = summarize("Pneumonia", k=k, **data)
    assert report["stage2"]["knn_accuracy"] < report["baseline"]["majority_accuracy"]
    md = write_report(report, tmp_path, data["y_query"], data["prob_query"], "T", {})["markdown"].read_text()
    assert "points below always predicting" in md


def test_write_report_single_class(tmp_path: Path, data: dict) -> None:
    ones = dict(data, y_query=np.ones(Q, int))
    report = summarize("Pneumonia", k=k, **ones)
    paths = write_report(report, tmp_path, ones["y_query"], ones["prob_query"], "T", {})
    assert paths["roc"].stat().st_size > 0 and "n/a" in paths["markdown"].read_text()


def test_write_report_refuses_patient_keys(tmp_path: Path, data: dict, report: dict) -> None:
    with pytest.raises(ValueError, match="patient"):
        context = {"queries": {"patient_ids": [1]}}
        write_report(report, tmp_path, data["y_query"], data["prob_query"], "T", context)
    assert not (tmp_path / "report.json").exists()


def test_montage_labels_are_coloured_per_finding_and_never_overflow() -> None:
    from PIL import Image, ImageDraw

    from cbir.report.montage import FINDING_COLOURS, TILE, _draw_labels, _font, finding_colour
    nih = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
           "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax"]
    assert len({FINDING_COLOURS[n] for n in nih}) == 14 and finding_colour("Other") == finding_colour("Other")
    image = Image.new("RGB", (TILE + 100, 30), (0, 0, 0))
    _draw_labels(ImageDraw.Draw(image), 6, 5, nih, _font(13), TILE - 12)
    pixels = np.asarray(image)
    drawn = np.flatnonzero(pixels.sum(axis=(0, 2)))
    assert drawn.min() >= 6 and drawn.max() < TILE - 6                # all 14 labels, yet inside the tile
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert FINDING_COLOURS["Atelectasis"] in colours and FINDING_COLOURS["Cardiomegaly"] in colours


# --- document sections written by commands ----------------------------------------------------------------


def test_update_section_replaces_only_its_own_block(tmp_path: Path) -> None:
    from cbir.report.doc import read_section, update_section
    doc = tmp_path / "results.md"
    assert update_section(doc, "a", "first") is False  # created
    update_section(doc, "b", "other")
    doc.write_text("# Title\n\nhand-written intro\n\n" + doc.read_text() + "\nclosing words\n")
    assert update_section(doc, "a", "second\nversion") is True
    text = doc.read_text()
    assert read_section(doc, "a") == "second\nversion" and read_section(doc, "b") == "other"
    assert "first" not in text and text.startswith("# Title\n\nhand-written intro") and "closing words" in text
    assert text.index("second") < text.index("other")  # replaced in place, not appended
    assert read_section(doc, "missing") is None
    assert not list(tmp_path.glob(".*.tmp"))
