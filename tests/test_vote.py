"""The weighted, prior-corrected, calibrated vote (`cbir.search.vote`) and its calibration on validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cbir.search.vote import VoteCalibration, corrected_share, decide, fit, platt, weights
from tests.conftest import run_cli


def test_corrected_share_by_hand() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    targets = np.array([[1, 0, 0, 0]])
    # equal weights, no correction: one of four
    assert corrected_share(scores, targets, None, math.inf)[0] == 0.25
    # a 20 % positive archive: v1 = 1/0.2 = 5, v0 = 3/0.8 = 3.75 → r = 5/8.75
    assert math.isclose(corrected_share(scores, targets, 0.2, math.inf)[0], 5 / 8.75)
    # τ = 0.1: w = 1, e^-1, e^-2, e^-3
    w = np.exp(-np.arange(4))
    assert np.allclose(weights(scores, 0.1)[0], w)
    assert math.isclose(corrected_share(scores, targets, 0.5, 0.1)[0], w[0] / w.sum())


def test_padded_neighbours_weigh_nothing() -> None:
    scores = np.array([[0.9, np.nan], [np.nan, np.nan]])
    targets = np.array([[1, 0], [0, 0]])
    assert corrected_share(scores, targets, 0.3, 0.05).tolist() == [1.0, 0.5]


def test_the_majority_class_no_longer_wins_by_being_common() -> None:
    """A 3:7 split of neighbours in a 25 % positive archive is evidence for the positive class."""
    label, _, r = decide(np.full((1, 10), 0.5), np.array([[1] * 3 + [0] * 7]), VoteCalibration(prior=0.25))
    assert label[0] == 1 and r[0] > 0.5
    label, _, _ = decide(np.full((1, 10), 0.5), np.array([[1] * 3 + [0] * 7]), VoteCalibration(prior=None))
    assert label[0] == 0


def test_platt_recovers_a_known_slope() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-(2.0 * x - 0.5)))).astype(int)
    a, b = platt(x, y)
    assert abs(a - 2.0) < 0.2 and abs(b + 0.5) < 0.15


def test_fit_picks_the_temperature_with_the_lowest_validation_loss() -> None:
    rng = np.random.default_rng(1)
    n, k = 400, 10
    y = rng.integers(0, 2, n)
    scores = np.sort(rng.uniform(0.5, 1.0, (n, k)), axis=1)[:, ::-1]
    # only the nearest neighbour knows the answer: a sharp temperature must win
    targets = rng.integers(0, 2, (n, k))
    targets[:, 0] = y
    fitted = fit(scores, targets, y, prior=0.5)
    assert fitted.temperature <= 0.05 and fitted.a > 0
    back = VoteCalibration.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert back == fitted


def test_ingest_calibrates_and_query_reports_the_vote(tmp_path: Path) -> None:
    data, model, index = tmp_path / "data", tmp_path / "model", tmp_path / "index"
    assert run_cli("synth", "--layout", "rsna", "--n", 120, "--size", 48, "--out", data, "--seed", 7)[0] == 0
    code, _, err = run_cli("train", "--data", data, "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1,
                           "--embed-dim", 16, "--bits", 32, "--out", model, "--workers", 0, "--val-fraction", 0.25)
    assert code == 0, err
    code, out, err = run_cli("ingest", "--data", data, "--model", model, "--index", index, "--workers", 0)
    assert code == 0, err
    from cbir.store import open_index
    with open_index(str(index)) as idx:
        body = idx.get_meta("cbir")["calibration"]
    assert body["vote"]["n_validation"] >= 20 and -1 <= body["nearest"]["threshold"] <= body["nearest"]["median"]
    query = sorted((data / "stage_2_train_images").glob("*.dcm"))[0]
    code, out, err = run_cli("query", query, "--index", index, "--json")   # k = 10, as calibrated
    assert code == 0, err
    result = json.loads(out)
    v = result["vote"]
    assert {"label", "fraction", "positive_fraction"} <= set(v)          # the stable fields stay
    assert v["calibrated"] is True and v["uncalibrated_because"] is None
    assert 0 <= v["probability"] <= 1 and isinstance(v["close_case"], bool)
    # one meaning: the label is the calibrated probability read at the stated operating point
    assert (v["label"] == v["target"]) == (v["probability"] >= v["operating_point"])
    stored = VoteCalibration.from_dict(body["vote"])        # σ(b): an even prior-corrected share
    assert math.isclose(v["operating_point"], 1 / (1 + math.exp(-stored.b)), abs_tol=1e-6)
    # the query is an archived training image: it finds itself, which is flagged and does not vote
    assert result["neighbors"][0]["self_match"] is True and v["self_matches"] == 1 and not v["included_self"]
    assert len(result["neighbors"]) == 11 and not any(n["self_match"] for n in result["neighbors"][1:])
    assert len(v["weights"]) == 10 and math.isclose(sum(v["weights"]), 1.0, abs_tol=1e-4)
    assert 1.0 <= v["effective_neighbours"] <= 10.0
    # the model's own probability is calibrated on validation (class-weighted BCE made its sigmoid a score)
    from cbir.models.calibration import ProbabilityCalibration
    calibration = ProbabilityCalibration.load(model, (model / "fingerprint").read_text().strip())
    pred = result["prediction"]
    assert calibration is not None and pred["calibrated"] is True
    assert math.isclose(pred["operating_point"], calibration.operating_point, abs_tol=1e-6)
    assert math.isclose(pred["probability"], float(calibration.apply(pred["raw_score"])), abs_tol=1e-5)
    assert (pred["label"] == pred["target"]) == (pred["probability"] >= pred["operating_point"])
    code, out, err = run_cli("query", query, "--index", index, "--json", "--include-self")
    assert code == 0, err
    both = json.loads(out)
    assert len(both["neighbors"]) == 10 and both["vote"]["included_self"] and both["neighbors"][0]["self_match"]
    code, out, err = run_cli("query", query, "--index", index, "--k", 5, "--json")   # not the calibrated k
    assert code == 0, err
    v = json.loads(out)["vote"]
    assert v["calibrated"] is False and "k = 5 (calibrated at k = 10)" in v["uncalibrated_because"]
    assert any("not calibrated" in w for w in v["warnings"]) and v["reliable"] is False
    code, out, err = run_cli("query", query, "--index", index, "--filter", "view=PA", "--json")
    assert code == 0, err
    assert "a filter on view" in json.loads(out)["vote"]["uncalibrated_because"]
    code, out, err = run_cli("query", query, "--index", index)
    flat = " ".join(out.split())
    assert code == 0 and "already in the archive" in flat and "│ 1 self │" in out, out
    code, out, err = run_cli("query", query, "--index", index, "--json", "--k", 10)
    v = json.loads(out)["vote"]
    assert v["reliable"] == (v["warnings"] == []) and isinstance(v["in_domain"], bool)
    assert v["reliable"] == (v["close_case"] and v["in_domain"])
    photo, grey_rgb = _colour_photo(tmp_path / "photo.png"), _grey_as_rgb(query, tmp_path / "grey.png")
    code, out, err = run_cli("query", photo, "--index", index, "--k", 5, "--json")
    assert code == 0, err
    v = json.loads(out)["vote"]
    assert v["reliable"] is False and any(w.startswith("a colour picture") for w in v["warnings"])
    code, out, err = run_cli("query", photo, "--index", index, "--k", 5)
    assert code == 0 and "warning: a colour picture" in out and "the vote is unreliable" in out
    code, out, err = run_cli("query", grey_rgb, "--index", index, "--k", 5, "--json")   # RGB with equal channels
    assert code == 0, err
    assert not any(w.startswith("a colour picture") for w in json.loads(out)["vote"]["warnings"])
    code, out, err = run_cli("evaluate", "--index", index, "--k", 5, "--out", tmp_path / "rep", "--json")
    assert code == 0, err
    report = json.loads(out)
    wv = report["stage2"]["weighted_vote"]
    assert 0 <= wv["agreement_with_model"] <= 1 and wv["balanced_accuracy_ci"] is not None
    assert math.isclose(report["stage1"]["operating_point"], calibration.operating_point, abs_tol=1e-9)
    # the stored calibration is for k = 10: at k = 5 evaluate refits it on validation images, and says so
    used = report["vote_calibration"]
    assert used["stored"] is False and used["calibrated"] and "k = 5" in used["refitted_because"]
    assert "refitted on the validation images at k = 5" in err
    # the stored test queries are read the way the collection's record says its payloads' probability is
    with open_index(str(index), writable=True) as idx:
        idx.update_meta("cbir", lambda meta: meta.update(probability={"calibrated": False, "operating_point": 0.5}))
    code, out, err = run_cli("evaluate", "--index", index, "--k", 10, "--out", tmp_path / "rep2", "--json")
    assert code == 0 and json.loads(out)["stage1"]["operating_point"] == 0.5 and "stores raw scores" in err
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Vote balanced accuracy (what cbir query shows)" in text and "Majority of 5 accuracy (baseline)" in text


def test_index_calibrate_refits_and_refuses_an_unknown_collection(tmp_path: Path) -> None:
    data, model, index = tmp_path / "data", tmp_path / "model", tmp_path / "index"
    assert run_cli("synth", "--layout", "rsna", "--n", 100, "--size", 48, "--out", data, "--seed", 8)[0] == 0
    assert run_cli("train", "--data", data, "--backbone", "test_resnet", "--image-size", 32, "--epochs", 1,
                   "--embed-dim", 16, "--bits", 32, "--out", model, "--workers", 0, "--val-fraction", 0.3)[0] == 0
    assert run_cli("ingest", "--data", data, "--model", model, "--index", index, "--workers", 0)[0] == 0
    code, out, err = run_cli("index", "calibrate", "--index", index, "--k", 3)
    assert code == 0, err
    assert "validation images" in out
    from cbir.store import open_index
    with open_index(str(index)) as idx:
        assert idx.get_meta("cbir")["calibration"]["k"] == 3
    code, _, err = run_cli("index", "calibrate", "nope", "--index", index)
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1


def test_platt_never_does_worse_than_the_prevalence() -> None:
    """Shares that barely vary, with a few at 0 or 1 (logit ±9.2), as kNN shares of real validation queries
    gave: undamped Newton steps diverged there (a = 3,613, log-loss 4.1 on RSNA)."""
    from cbir.search.vote import log_loss
    rng = np.random.default_rng(3)
    y = (rng.random(105) < 0.25).astype(int)
    x = rng.normal(0, 0.02, 105) + 0.01 * y
    x[:3] = [9.2, -9.2, 9.2]
    a, b = platt(x, y)
    fitted = log_loss(1 / (1 + np.exp(-(a * x + b))), y)
    assert fitted <= log_loss(np.full(y.size, y.mean()), y) + 1e-6 and abs(a) < 10


def _colour_photo(path: Path) -> Path:
    """A photograph-like colour picture: smooth colour gradients, noise and a few saturated blobs."""
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:160] / 120.0
    rgb = np.stack([np.sin(3 * xx + 1) * 0.5 + 0.5, yy, np.cos(5 * yy * xx) * 0.5 + 0.5], -1)
    rgb[30:60, 40:80] = (0.9, 0.1, 0.1)
    rgb = np.clip(rgb + rng.normal(0, 0.05, rgb.shape), 0, 1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


def _grey_as_rgb(dicom: Path, path: Path) -> Path:
    """The DICOM's pixels saved as an RGB PNG with three equal channels, as many radiograph exports are."""
    from PIL import Image

    from cbir.io import read_image
    grey = (read_image(dicom).pixels * 255).astype(np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(path)
    return path


def test_a_sharp_temperature_is_called_a_nearest_case_label() -> None:
    """τ = 0.01 (the demo's) gives the nearest of 8 neighbours ~99.99 % of the weight: before, the text read
    "No Pneumonia (88 % of 8 neighbours)", like an 8-way vote."""
    from cbir.search.query import describe_vote, vote
    from cbir.store.base import Hit
    from cbir.store.record import CollectionRecord
    hits = [Hit(str(i), 0.95 - 0.1 * i, {"target": int(i == 0), "label": "x", "labels": ["x"]}) for i in range(8)]
    meta = {"negative_label": "No Pneumonia",
            "calibration": {"k": 8, "vote": VoteCalibration(0.01, 1.0, 0.0, 0.25, 50, 0.5).to_dict()}}
    v = vote(hits, "Pneumonia", CollectionRecord.of(meta, "c"))
    assert v["effective_neighbours"] < 1.01 and v["nearest_case"] is True and v["weights"][0] > 0.999
    assert "a nearest-case label: the nearest of 8 neighbours carries 100% of the weight" in describe_vote(v, 8)
    flat = vote(hits, "Pneumonia", CollectionRecord.of(
        {**meta, "calibration": {"k": 8, "vote": VoteCalibration(prior=0.25).to_dict()}}, "c"))
    assert math.isclose(flat["effective_neighbours"], 8.0) and not flat["nearest_case"]
    assert "8 neighbours, weighted like 8.0" in describe_vote(flat, 8)


def test_a_flat_calibration_does_not_call_one_positive_neighbour_of_ten_a_vote_for_the_target() -> None:
    """The slopes fitted on RSNA's validation images are flat (a ≈ 0.27, b ≈ −0.47 on fold 1): read at the
    prevalence π = 0.26, p said the target for 1 positive neighbour of 10 (corrected share 0.25, p = 0.31 ≥ 0.26),
    and the vote's balanced accuracy fell below the model's. Read at σ(b), the label is r ≥ ½ again, on p."""
    from cbir.search.vote import decide
    calibration = VoteCalibration(math.inf, 0.268, -0.472, 0.258, 105, 0.55)
    scores = np.full((3, 10), 0.9)
    targets = np.array([[1] + [0] * 9, [1] * 3 + [0] * 7, [1] * 5 + [0] * 5])   # 1, 3 and 5 positives of 10
    label, p, r = decide(scores, targets, calibration)
    assert list(label) == [0, 1, 1] and list(label) == list((r >= 0.5).astype(int))
    assert all((p >= calibration.operating_point) == (r >= 0.5))            # one rule, on p or on r
    assert p[0] > calibration.prior                                          # what p ≥ π would have called

