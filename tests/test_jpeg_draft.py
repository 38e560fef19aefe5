"""Reduced-resolution JPEG decoding (`cbir.io.jpeg_draft`) and the decode path recorded in a model's checkpoint
(`ModelConfig.decode`): real pydicom and Pillow on real files, no mocks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cbir.app.settings import Settings
from cbir.data.loading import model_view
from cbir.data.synth.rsna import jpeg_baseline
from cbir.embed import Embedded, embed_batches, embed_image
from cbir.errors import CbirError
from cbir.io import read_image
from cbir.io.dicom import decode, read_header
from cbir.io.jpeg_draft import draft_scale
from cbir.io.pixels import scale_unit
from cbir.models import LoadedModel, ModelConfig, create_model, decode_size, load_checkpoint, save_checkpoint
from cbir.serve.app import crop
from tests.conftest import run_cli, shared_path
from tests.dicom_corpus import dataset, encapsulated, save

TINY = {"backbone": "test_resnet", "image_size": 32, "embed_dim": 8, "bits": 16}


def _pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth 8-bit image with some texture (JPEG-friendly, not constant)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    noise = np.random.default_rng(seed).normal(0, 8, (height, width))
    return np.clip(128 + 90 * np.sin(6 * x) * np.cos(4 * y) + noise, 0, 255).astype(np.uint8)


def _jpeg_dicom(path: Path, height: int = 256, width: int = 256, seed: int = 0) -> bytes:
    """A single-frame MONOCHROME2 JPEG Baseline DICOM at `path`; returns its JPEG stream."""
    pixels = _pixels(height, width, seed)
    stream = jpeg_baseline(pixels)
    save(encapsulated(dataset(pixels), pydicom.uid.JPEGBaseline8Bit, [stream]), path)
    return stream


def _embedded(loaded: LoadedModel, paths: list) -> list[Embedded]:
    """The ingest path's embeddings, one image per batch (as a query is)."""
    return [item for items, _ in embed_batches(loaded, [str(p) for p in paths], batch_size=1, workers=0)
            for item in items]


def _draft(stream: bytes, size: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(stream)) as img:
        img.draft("L", size)
        img.load()
        return np.asarray(img)


@pytest.mark.parametrize(("need", "side"), [(32, 32), (64, 64), (100, 128), (129, 256), (256, 256)])
def test_a_jpeg_baseline_dicom_decodes_as_pillows_draft_never_below_the_need(tmp_path: Path, need: int,
                                                                              side: int) -> None:
    path = tmp_path / "cr.dcm"
    stream = _jpeg_dicom(path)
    reduced = decode(read_header(path), path, reduce_to=need)
    assert reduced.shape == (side, side) and side >= need
    if side < 256:
        assert np.array_equal(reduced, _draft(stream, (side, side)))
    else:   # nothing to gain: the full decode (GDCM), bit for bit
        assert np.array_equal(reduced, decode(read_header(path), path))
    assert np.array_equal(reduced, decode(read_header(path), path, reduce_to=need))   # deterministic


@pytest.mark.parametrize(("height", "width"), [(250, 190), (190, 250), (1000, 37)])
def test_odd_sizes_keep_the_stored_geometry_and_the_model_input_size(tmp_path: Path, height: int, width: int) -> None:
    path = tmp_path / "odd.dcm"
    _jpeg_dicom(path, height, width, seed=3)
    full, reduced = read_image(path), read_image(path, reduce_to=32)
    assert max(reduced.pixels.shape) >= 32 and reduced.pixels.size < full.pixels.size
    assert reduced.shape == full.shape == (height, width) and reduced.full_shape == (height, width)
    (a, geometry_a), (b, geometry_b) = model_view(full, 32), model_view(reduced, 32)
    assert geometry_a == geometry_b and a.shape == b.shape == (32, 32)
    assert float(np.abs(a - b).mean()) < 0.05


def test_a_grey_jpeg_file_decodes_reduced_and_other_files_fall_back_bit_identically(tmp_path: Path) -> None:
    grey = _pixels(200, 160, seed=1)
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=90)
    reduced = read_image(tmp_path / "grey.jpg", reduce_to=40)
    expected = _draft((tmp_path / "grey.jpg").read_bytes(), (40, 32))
    assert np.array_equal(reduced.pixels, scale_unit(expected.astype(np.float32)))
    assert reduced.shape == (200, 160) and reduced.pixels.shape == (50, 40)

    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "colour.jpg", quality=90)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    save(dataset(grey), tmp_path / "native.dcm")
    rle = dataset(grey)
    rle.compress(pydicom.uid.RLELossless)
    save(rle, tmp_path / "rle.dcm")
    colour = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    stream = io.BytesIO()
    Image.fromarray(colour).save(stream, format="JPEG", quality=90)
    save(encapsulated(dataset(colour, photometric="YBR_FULL_422"), pydicom.uid.JPEGBaseline8Bit, [stream.getvalue()]),
         tmp_path / "colour.dcm")
    for name in ("colour.jpg", "grey.png", "native.dcm", "rle.dcm", "colour.dcm"):
        full, asked = read_image(tmp_path / name), read_image(tmp_path / name, reduce_to=40)
        assert asked.full_shape is None and np.array_equal(full.pixels, asked.pixels), name


def test_a_region_of_a_reduced_image_is_given_in_the_stored_pixels(tmp_path: Path) -> None:
    path = tmp_path / "cr.dcm"
    _jpeg_dicom(path)
    reduced = read_image(path, reduce_to=64)
    part = crop(reduced, (64, 32, 128, 96))
    assert part.shape == (96, 128) and np.array_equal(part.pixels, reduced.pixels[8:32, 16:48])


def test_the_decode_path_is_part_of_the_checkpoint_and_old_ones_decode_in_full(tmp_path: Path) -> None:
    with pytest.raises(CbirError, match="unknown decode 'fast'") as err:
        ModelConfig(decode="fast").validate()
    assert "\n" not in str(err.value)
    model = create_model(ModelConfig(**TINY))
    save_checkpoint(model, tmp_path / "old")
    held = json.loads((tmp_path / "old" / "config.json").read_text())
    assert "decode" not in held     # written as before the field existed: the same fingerprint
    old = load_checkpoint(tmp_path / "old")
    assert old.config.decode == "full" and decode_size(old.config) is None
    model.config.decode = "reduced"
    save_checkpoint(model, tmp_path / "new")
    new = load_checkpoint(tmp_path / "new")
    assert new.config.decode == "reduced" and decode_size(new.config) == 32 and new.fingerprint != old.fingerprint

    paths = [tmp_path / f"{i}.dcm" for i in range(3)]
    for i, path in enumerate(paths):
        _jpeg_dicom(path, seed=i)
    batch = _embedded(old, paths)
    for item, path in zip(batch, paths, strict=True):   # an old checkpoint embeds full-decoded pixels, as before
        assert np.array_equal(item.embedding, embed_image(old, read_image(path)).embedding)
    reduced = _embedded(new, paths)
    assert not np.array_equal(reduced[0].embedding, batch[0].embedding)   # the pixels differ, so does the vector
    assert reduced[0].geometry == batch[0].geometry


def test_a_reduced_model_embeds_a_file_identically_at_ingest_and_at_query(tmp_path: Path) -> None:
    from cbir.app.ingest import ingest_records
    from cbir.data.layout import load_dataset
    from cbir.data.synth import synth_dataset
    from cbir.io import Pseudonymizer
    from cbir.search.query import query_image
    from cbir.search.warm import WarmSearcher
    from cbir.store import open_index

    synth_dataset("rsna", 4, 256, tmp_path / "data", seed=2)
    save_checkpoint(create_model(ModelConfig(**TINY, decode="reduced")), tmp_path / "model")
    loaded = load_checkpoint(tmp_path / "model")
    records = load_dataset(tmp_path / "data", "rsna")
    paths = records.meta["path"].tolist()
    batch = _embedded(loaded, paths)
    pseudonymize = Pseudonymizer(b"test-key-test-key-test-key-00000")
    with open_index(str(tmp_path / "index"), writable=True, create=True) as index:
        ingest_records(records, loaded, index, "c", pseudonymize, 4, 0)
        warm = WarmSearcher(index, "c", loaded, pseudonymize, state_dir=Settings.from_env().state_dir)
        for item, path in zip(batch, paths, strict=True):
            image = warm.read(path)
            assert image.pixels.shape == (32, 32) and image.shape == (256, 256)
            assert np.array_equal(embed_image(loaded, image).embedding, item.embedding)
            for result in (warm.query(path, k=1), query_image(path, loaded, index, "c", k=1,
                                                                pseudonymize=pseudonymize)):
                assert result.neighbors[0]["score"] == pytest.approx(1.0, abs=1e-5), result.neighbors[0]


def test_real_rsna_dicom_reduced_changes_the_model_input_only_slightly() -> None:
    path = shared_path("data", "real", "rsna", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    full, reduced = read_image(path), read_image(path, reduce_to=224)
    assert reduced.pixels.shape == (256, 256) and reduced.shape == full.shape == (1024, 1024)
    (a, geometry_a), (b, geometry_b) = model_view(full, 224), model_view(reduced, 224)
    assert geometry_a == geometry_b
    assert float(np.abs(a - b).mean()) < 0.03 and np.array_equal(read_image(path, reduce_to=224).pixels,
                                                                  reduced.pixels)


def test_draft_scale_is_the_largest_that_leaves_the_need() -> None:
    assert [draft_scale(1024, 1024, need) for need in (128, 129, 224, 256, 257, 512, 513)] == [8, 4, 4, 4, 2, 2, 1]
    assert draft_scale(1000, 37, 125) == 8 and draft_scale(37, 1000, 126) == 4


def test_cbir_train_refuses_an_unknown_decode_and_a_reduced_detector_in_one_line(tmp_path: Path) -> None:
    for extra, said in ((("--decode", "fast"), "unknown decode 'fast'"),
                        (("--decode", "reduced", "--task", "detection"), "--decode: the detector decodes")):
        code, _, err = run_cli("train", "--data", tmp_path, "--out", tmp_path / "run", *extra)
        assert code != 0 and said in err and len(err.strip().splitlines()) == 1, err
