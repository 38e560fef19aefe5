"""The detection approach: FCOS on a timm backbone, box geometry, the RSNA box mAP, training, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.data.rsna import load_rsna
from cbir.data.synth import synth_dataset
from cbir.data.transforms import augment_with_boxes, letterbox, standardize
from cbir.errors import CbirError
from cbir.metrics_detection import RSNA_THRESHOLDS, box_iou, box_map, image_precision
from cbir.models.checkpoint import is_detector_checkpoint, load_detector
from cbir.models.detection import (
    CbirDetector,
    DetectorConfig,
    boxes_to_input,
    boxes_to_original,
    create_detector,
    image_score,
    letterbox_geometry,
)
from cbir.models.tasks import get_task
from cbir.train.detection import DetectorData, original_shape, prepare_split
from cbir.train.loop import TrainSettings, train_epoch, train_model

BACKBONE = "test_resnet"


def tiny_config(**kw) -> DetectorConfig:
    return DetectorConfig(**{"backbone": BACKBONE, "image_size": 64, "bits": 12,
                             "fpn_channels": 32, "head_convs": 1} | kw)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they make it 5× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rsna(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rsna")
    synth_dataset("rsna", 40, 64, root, seed=3)
    return load_rsna(root)


@pytest.fixture(scope="module")
def trained(rsna, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("det") / "model"
    result = train_model(rsna, tiny_config(), TrainSettings(epochs=2, batch_size=8, workers=0), out)
    return result


# -- model -------------------------------------------------------------------------------------------------


def test_detector_outputs_mirror_cbirnet():
    torch.manual_seed(0)
    model = create_detector(tiny_config()).eval()
    x = standardize(torch.rand(3, 1, 64, 64))
    with torch.no_grad():
        out = model(x)
        pyramid = model.forward_features(x)
        detections = model.detect(x, threshold=0.0)
    assert out.embedding.shape == (3, 3 * 32) and out.code.shape == (3, 12) and out.logits.shape == (3, 1)
    assert out.code.dtype == torch.uint8 and set(out.code.unique().tolist()) <= {0, 1}
    assert torch.allclose(out.embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.isfinite(out.logits).all()
    assert [p.shape[-1] for p in pyramid.values()] == [8, 4, 2]  # strides 8, 16, 32
    pooled = torch.cat([p.amax(dim=(2, 3)) for p in pyramid.values()], dim=1)  # the embedding: max-pooled FPN
    assert torch.allclose(out.embedding, pooled / pooled.norm(dim=1, keepdim=True), atol=1e-5)
    assert len(detections) == 3
    for d, logit in zip(detections, out.logits[:, 0], strict=True):
        assert d["boxes"].shape[1] == 4 and (d["boxes"] >= 0).all() and (d["boxes"] <= 64).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
        if len(d["scores"]):  # the image logit is the best box's score
            assert math.isclose(float(torch.sigmoid(logit)), image_score(d), rel_tol=1e-4)
    assert image_score({"scores": torch.zeros(0)}) == 0.0


def test_detector_refuses_other_tasks_and_backbones():
    with pytest.raises(CbirError, match="task"):
        CbirDetector(tiny_config(task="binary"))
    with pytest.raises(CbirError, match="backbone"):
        CbirDetector(tiny_config(backbone="no_such_net"))


def test_training_steps_reduce_the_loss(rsna):
    torch.manual_seed(0)
    split = prepare_split(rsna, 64, TrainSettings(workers=0), _quiet(), "all")
    model = create_detector(tiny_config())
    boxed = np.flatnonzero([len(b) > 0 for b in split.boxes])
    use = np.concatenate([boxed[:4], np.flatnonzero(split.y == 0)[:4]])  # one batch: 4 with boxes, 4 without
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    task, data, settings = get_task("detection"), DetectorData(split, split, use, torch.device("cpu")), TrainSettings(
        batch_size=8)
    first = train_epoch(model, task, data, optimizer, None, settings, generator)
    for _ in range(7):
        last = train_epoch(model, task, data, optimizer, None, settings, generator)
    assert set(first) == {"classification", "bbox_regression", "bbox_ctrness", "loss"}
    assert last["loss"] < 0.9 * first["loss"]


def test_flip_moves_boxes_with_pixels():
    x = torch.zeros(2, 1, 8, 8)
    x[:, :, 2:4, 1:3] = 1
    boxes = [torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.zeros(0, 4)]
    for seed in range(6):
        out, moved = augment_with_boxes(x, boxes, torch.Generator().manual_seed(seed))
        x0, y0, x1, y1 = moved[0][0].int().tolist()
        inside = out[0, 0, y0:y1, x0:x1]
        assert inside.min() > out[0, 0].mean()  # the bright patch is still inside its box
        assert moved[1].shape == (0, 4)


# -- boxes -------------------------------------------------------------------------------------------------


def test_boxes_round_trip_through_a_non_square_letterbox():
    pixels = np.zeros((100, 200), dtype=np.float32)
    pixels[40:70, 120:180] = 1.0
    resized, geometry = letterbox(pixels, 64)
    for shape in [(100, 200), (200, 100), (64, 64), (37, 1000), (1000, 37), (999, 1001)]:
        assert letterbox_geometry(*shape, 64) == letterbox(np.zeros(shape, np.float32), 64)[1]
    box = np.array([[120.0, 40.0, 60.0, 30.0]])  # x, y, w, h in the original 200×100 image
    xyxy = boxes_to_input(box, geometry)
    x0, y0, x1, y1 = xyxy[0]
    assert resized[int(y0) + 1:int(y1) - 1, int(x0) + 1:int(x1) - 1].min() > 0.9  # on the bright patch
    assert (x0, y0) == pytest.approx((120 * 0.32, 40 * 0.32 + 16), abs=1e-4)
    np.testing.assert_allclose(boxes_to_original(xyxy, geometry), box, atol=1e-3)
    # boxes running into the padding are clipped to the original image
    clipped = boxes_to_original(np.array([[0.0, 0.0, 64.0, 64.0]]), geometry)
    np.testing.assert_allclose(clipped, [[0, 0, 200, 100]], atol=1e-3)
    assert boxes_to_input(np.zeros((0, 4)), geometry).shape == (0, 4)


def test_detect_original_reports_original_pixels():
    torch.manual_seed(0)
    model = create_detector(tiny_config(score_thresh=0.0)).eval()
    geometry = letterbox_geometry(100, 200, 64)
    x = standardize(torch.from_numpy(letterbox(np.random.default_rng(0).random((100, 200), np.float32), 64)[0])
                    [None, None])
    with torch.no_grad():
        inputs = model.detect(x, threshold=0.0)[0]
        originals = model.detect_original(x, [geometry], threshold=0.0)[0]
    assert len(inputs["boxes"]) > 0
    expected = boxes_to_original(inputs["boxes"].numpy(), geometry)
    np.testing.assert_allclose(originals["boxes"], expected)
    b = originals["boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 0] + b[:, 2] <= 200 + 1e-3).all()
    assert (b[:, 1] >= 0).all() and (b[:, 1] + b[:, 3] <= 100 + 1e-3).all()


def test_detect_image_gives_scored_boxes_in_original_pixels():
    from cbir.embed import detect_image
    from cbir.io import SafeMeta, XrayImage
    from cbir.models.checkpoint import LoadedModel

    torch.manual_seed(0)
    config = tiny_config(score_thresh=0.0, box_threshold=0.0)
    model = create_detector(config).eval()
    pixels = np.random.default_rng(0).random((100, 200), np.float32)
    found = detect_image(LoadedModel(model, config, "f", Path(".")), XrayImage(pixels, SafeMeta(), None, "raster"))
    x = standardize(torch.from_numpy(letterbox(pixels, 64)[0])[None, None])
    with torch.no_grad():
        expected = model.detect_original(x, [letterbox_geometry(100, 200, 64)], threshold=0.0)[0]
    assert len(found) == len(expected["boxes"]) > 0
    np.testing.assert_allclose([f["box"] for f in found], expected["boxes"], atol=0.051)
    assert [f["score"] for f in found] == sorted((f["score"] for f in found), reverse=True)


def test_original_shape_reads_headers(rsna, tmp_path: Path):
    assert original_shape(rsna.meta["path"][0]) == (64, 64)
    from PIL import Image

    Image.fromarray(np.zeros((30, 50), np.uint8)).save(tmp_path / "a.png")
    assert original_shape(tmp_path / "a.png") == (30, 50)


# -- the RSNA metric ---------------------------------------------------------------------------------------


def test_box_map_hand_made_cases():
    gt = [np.array([[10, 10, 20, 20]])]
    assert box_map([np.array([[10, 10, 20, 20]])], [np.array([0.9])], gt) == 1.0
    assert box_map([np.array([[50, 50, 10, 10]])], [np.array([0.9])], gt) == 0.0
    # no GT and no prediction: skipped; no GT but a prediction: 0; GT and no prediction: 0
    assert math.isnan(box_map([np.zeros((0, 4))], None, [np.zeros((0, 4))]))
    assert box_map([np.zeros((0, 4)), np.array([[0, 0, 5, 5]])], None, [np.zeros((0, 4))] * 2) == 0.0
    assert box_map([np.array([[10, 10, 20, 20]]), np.zeros((0, 4))], None, [gt[0], np.zeros((0, 4))]) == 1.0
    assert box_map([np.zeros((0, 4))], None, gt) == 0.0
    # one hit and one false positive: TP/(TP+FP+FN) = 1/2 at every threshold
    two = np.array([[50, 50, 10, 10], [10, 10, 20, 20]])
    assert box_map([two], [np.array([0.2, 0.9])], gt) == 0.5
    # IoU 0.5 (a 20×20 box shifted by a third): a hit for thresholds below 0.5 only
    shifted = np.array([[10 + 20 / 3, 10, 20, 20]])
    assert box_iou([[10 + 20 / 3, 10, 30 + 20 / 3, 30]], [[10, 10, 30, 30]])[0, 0] == pytest.approx(0.5)
    assert image_precision(shifted, None, gt[0]) == pytest.approx(np.mean(RSNA_THRESHOLDS < 0.5))
    assert len(RSNA_THRESHOLDS) == 8


def test_box_map_matches_by_descending_score():
    gt = np.array([[0, 0, 10, 10]])
    near, exact = [0, 0, 10, 8], [0, 0, 10, 10]   # IoU 0.8 and 1.0
    # the higher-scoring box takes the GT box; the other becomes a false positive either way
    assert image_precision(np.array([near, exact]), np.array([0.9, 0.1]), gt) == 0.5
    # with the exact box first, the same: one TP and one FP at every threshold
    assert image_precision(np.array([near, exact]), np.array([0.1, 0.9]), gt) == 0.5
    # order decides: p1 overlaps A (IoU 2/3) and B (IoU 3/7), p2 is exactly A. When p2 goes first it takes A
    # and p1 takes B at t = 0.40; when p1 goes first it takes A and p2 is left with nothing.
    a_b = np.array([[0, 0, 10, 10], [6, 0, 10, 10]])
    p1, p2 = [2, 0, 10, 10], [0, 0, 10, 10]
    assert image_precision(np.array([p1, p2]), np.array([0.1, 0.9]), a_b) == pytest.approx((1 + 7 / 3) / 8)
    assert image_precision(np.array([p1, p2]), np.array([0.9, 0.1]), a_b) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        image_precision(np.array([exact]), np.array([0.1, 0.2]), gt)


# -- training and checkpoints ------------------------------------------------------------------------------


def test_train_detector_writes_a_reloadable_checkpoint(trained, rsna):
    out = trained.out
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "detection" and config["backbone"] == BACKBONE
    assert is_detector_checkpoint(out) and (out / "fingerprint").is_file()
    assert trained.best_epoch in (1, 2) and len(trained.history) == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"val_auc", "val_map", "box_threshold", "train_loss"} <= set(rows[0])
    assert json.loads((out / "train.json").read_text())["task"] == "detection"
    assert config["box_threshold"] == trained.box_threshold

    loaded = load_detector(out)
    again = load_detector(out / "config.json")
    assert loaded.fingerprint == trained.fingerprint == again.fingerprint
    x = standardize(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        a, b = loaded.model(x), again.model(x)
        da, db = loaded.model.detect(x, 0.0), again.model.detect(x, 0.0)
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.logits, b.logits) and torch.equal(a.code, b.code)
    for u, v in zip(da, db, strict=True):
        assert torch.equal(u["boxes"], v["boxes"]) and torch.equal(u["scores"], v["scores"])


def test_classifier_checkpoints_and_pretrained_weights_are_told_apart(rsna, tmp_path: Path):
    from cbir.models import ModelConfig, create_model, save_checkpoint

    save_checkpoint(create_model(ModelConfig(backbone=BACKBONE, image_size=32)), tmp_path / "cls")
    assert not is_detector_checkpoint(tmp_path / "cls")
    with pytest.raises(CbirError, match="not a detector"):
        load_detector(tmp_path / "cls")
    with pytest.raises(CbirError, match="from scratch"):
        train_model(rsna, tiny_config(), TrainSettings(pretrained=True), tmp_path / "det")


def test_tampered_checkpoint_is_refused(trained, tmp_path: Path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained.out, copy)
    (copy / "fingerprint").write_text("0" * 16 + "\n")
    with pytest.raises(CbirError, match="fingerprint"):
        load_detector(copy)
    with pytest.raises(CbirError, match="not a cbir model"):
        load_detector(tmp_path)


def _quiet():
    from cbir.console import QUIET

    return QUIET


# -- RetinaNet and the pooling of the embedding (measured in `cbir study detector` / `pooling`) ----------


def test_retinanet_trains_detects_and_reloads(rsna, tmp_path: Path):
    config = tiny_config(detector="retinanet")
    result = train_model(rsna, config, TrainSettings(epochs=1, batch_size=8, workers=0), tmp_path / "r")
    loaded = load_detector(tmp_path / "r")
    assert loaded.config.detector == "retinanet" and loaded.fingerprint == result.fingerprint
    x = standardize(torch.rand(2, 1, 64, 64))
    with torch.no_grad():
        out = loaded.model(x)
        parts = loaded.model.train().loss(x, [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 50.0]])},
                                              {"boxes": torch.zeros(0, 4)}])
    assert out.embedding.shape == (2, config.embed_dim) and set(parts) == {"classification", "bbox_regression"}
    assert all(torch.isfinite(v) for v in parts.values())


def test_pooling_changes_the_embedding_but_not_old_fingerprints():
    torch.manual_seed(0)
    model = create_detector(tiny_config()).eval()
    x = standardize(torch.rand(2, 1, 64, 64))
    embeddings = {}
    for how in ("max", "avg", "gem"):
        model.config.pooling = how
        with torch.no_grad():
            embeddings[how] = model(x).embedding
        assert torch.allclose(embeddings[how].norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(embeddings["max"], embeddings["avg"])
    with torch.no_grad():
        pyramid = list(model.forward_features(x).values())
    expected = torch.nn.functional.normalize(torch.cat([p.mean(dim=(2, 3)) for p in pyramid], dim=1), dim=1)
    assert torch.allclose(embeddings["avg"], expected, atol=1e-6)
    # the default is left out of config.json, so configs written before the field keep their fingerprint
    assert "pooling" not in tiny_config().to_dict() and tiny_config(pooling="gem").to_dict()["pooling"] == "gem"
    with pytest.raises(CbirError, match="unknown pooling"):
        create_detector(tiny_config(pooling="median"))


def test_a_detector_query_runs_the_network_once():
    """`cbir query` with a detector used to run the backbone twice (embed, then detect): one pass gives both,
    with the same embedding and boxes as the two separate calls."""
    from cbir.embed import detect_image, embed_image
    from cbir.io import SafeMeta, XrayImage
    from cbir.models.checkpoint import LoadedModel
    from cbir.search.query import Search, answer
    from cbir.store.record import CollectionRecord

    torch.manual_seed(0)
    config = tiny_config(score_thresh=0.0, box_threshold=0.0)
    model = create_detector(config).eval()
    loaded = LoadedModel(model, config, "f", Path("."))
    image = XrayImage(np.random.default_rng(1).random((100, 200), np.float32), SafeMeta(), None, "raster")
    expected_embedding, expected_boxes = embed_image(loaded, image).embedding, detect_image(loaded, image)
    passes = []
    run = model._run

    def counted(*args, **kwargs):
        passes.append(1)
        return run(*args, **kwargs)

    model._run = counted
    result = answer(image, "q.png", loaded, CollectionRecord.of({"target": "Pneumonia"}, "c"), Search(k=3),
                    lambda embedded: [])
    assert len(passes) == 1
    assert result.prediction["boxes"] == expected_boxes and len(expected_boxes) > 0
    assert np.allclose(embed_image(loaded, image).embedding, expected_embedding)


def test_box_iou_from_torchvision_keeps_degenerate_boxes_at_zero() -> None:
    from cbir.models.detection import xywh_to_xyxy, xyxy_to_xywh
    a = np.array([[0, 0, 10, 10], [5, 5, 5, 9], [8, 8, 2, 2]], dtype=float)   # normal, empty, inverted
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10]], dtype=float)
    iou = box_iou(a, b)
    assert iou.shape == (3, 2) and np.isfinite(iou).all()
    assert iou[0, 0] == pytest.approx(50 / 150) and iou[0, 1] == pytest.approx(1.0)
    assert (iou[1:] == 0).all()
    xywh = np.array([[1, 2, 3, 4], [10, 20, 0, 5]], dtype=np.float32)
    assert np.array_equal(xywh_to_xyxy(xywh), [[1, 2, 4, 6], [10, 20, 10, 25]])
    assert np.array_equal(xyxy_to_xywh(xywh_to_xyxy(xywh)), xywh)
