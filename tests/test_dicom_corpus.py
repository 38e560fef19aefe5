"""Real-world DICOM: every file of the corpus (tests/dicom_corpus.py) is either decoded as pydicom itself reads
it or refused with one line — in the reader, through `cbir query`, and through one `cbir ingest` of the whole
corpus in DataLoader workers (a subprocess, so that what C libraries write to fd 2 would show)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_corpus import TEST_FILES, Entry, colour, image, reference_pixels, tolerance, write_corpus

from cbir.errors import BadInputError
from cbir.io import DEFAULT_READER, ReaderPolicy, read_image
from cbir.io.dicom import decode, read_header
from tests.badinputs import write_good
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Entry]]:
    root = tmp_path_factory.mktemp("corpus") / "data"
    return root, write_corpus(root)


@pytest.fixture
def any_modality() -> ReaderPolicy:
    return ReaderPolicy(any_modality=True)


def outcome(path: Path, policy: ReaderPolicy = DEFAULT_READER) -> tuple[str, np.ndarray | None]:
    """("decoded", pixels) or (the reason, None); anything but a BadInputError fails the test."""
    try:
        return "decoded", read_image(path, policy=policy).pixels
    except BadInputError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
        return exc.reason, None


def check(root: Path, entry: Entry, expect: str, policy: ReaderPolicy = DEFAULT_READER) -> str:
    path = root / entry.relpath
    got, pixels = outcome(path, policy)
    if expect == "decoded":
        assert got == "decoded", (entry.relpath, got)
        reference = reference_pixels(path)
        assert pixels.shape == reference.shape, entry.relpath
        difference = float(np.abs(pixels - reference).max())
        assert difference <= tolerance(path), (entry.relpath, difference)
    else:
        assert got != "decoded", entry.relpath
        assert expect == "refused" or expect in got, (entry.relpath, expect, got)
    return got


def reason_kind(reason: str) -> str:
    return "decoded" if reason == "decoded" else re.split(r" \(|:| \d", reason, maxsplit=1)[0]


def test_every_file_is_decoded_as_pydicom_reads_it_or_refused_in_one_line(corpus) -> None:
    root, entries = corpus
    counts = Counter(reason_kind(check(root, entry, entry.expect)) for entry in entries)
    print(f"\n{len(entries)} files: {dict(sorted(counts.items(), key=lambda kv: -kv[1]))}")
    assert sum(counts.values()) == len(entries) >= 100
    assert counts["decoded"] >= 40 and counts["not a radiograph"] >= 10


def test_with_any_modality_the_other_modalities_decode_correctly(corpus, any_modality: ReaderPolicy) -> None:
    root, entries = corpus
    others = [e for e in entries if e.any_modality]
    assert len(others) >= 10
    counts = Counter(reason_kind(check(root, entry, entry.any_modality, any_modality)) for entry in others)
    print(f"\n--any-modality, {len(others)} files refused by modality otherwise: {dict(counts)}")
    assert counts["decoded"] >= 10


def test_each_transfer_syntax_is_decoded(corpus) -> None:
    """Every syntax cbir claims has at least one file in the corpus that decodes (HTJ2K has no encoder here)."""
    root, entries = corpus
    decoded = {str(pydicom.dcmread(root / e.relpath, stop_before_pixels=True).file_meta.TransferSyntaxUID)
               for e in entries if e.expect == "decoded" or e.any_modality == "decoded"}
    wanted = {pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian,
              pydicom.uid.DeflatedExplicitVRLittleEndian, pydicom.uid.RLELossless, pydicom.uid.JPEGBaseline8Bit,
              pydicom.uid.JPEGExtended12Bit, pydicom.uid.JPEGLosslessSV1, pydicom.uid.JPEGLSLossless,
              pydicom.uid.JPEGLSNearLossless, pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000}
    assert wanted <= decoded, wanted - decoded


def test_12_bit_jpeg_matches_pydicoms_reference_values(any_modality: ReaderPolicy) -> None:
    """JPGExtended.dcm (12-bit JPEG Extended): pydicom's pixel reference is arr[420, 140] == 244 and
    arr[230, 120] == 95 (GDCM and Pillow refuse it; imagecodecs' libjpeg-turbo decodes it)."""
    for name in ("JPGExtended.dcm", "JPEG-lossy.dcm"):
        path = TEST_FILES / name
        arr = decode(read_header(path), path)
        assert arr.dtype == np.uint16 and arr.shape == (1024, 256)
        assert (arr[420, 140], arr[230, 120]) == (244, 95), name
        assert read_image(path, policy=any_modality).pixels.shape == (1024, 256)   # an NM file


def test_12_bit_jpeg_written_here_decodes_close_to_its_source(corpus) -> None:
    root, _ = corpus
    path = root / "written" / "jpeg_extended12.dcm"
    arr = decode(read_header(path), path)
    assert np.abs(arr.astype(float) - image()).mean() < 4      # lossy at quality 95, out of 4095


def test_ybr_is_luminance_not_the_red_channel(corpus) -> None:
    """pydicom gives YBR data as RGB: the grey image is its luminance, not (as it was) the red channel."""
    root, _ = corpus
    rgb = colour().astype(float)
    luma = rgb @ [0.299, 0.587, 0.114]
    luma = (luma - luma.min()) / np.ptp(luma)
    red = rgb[..., 0] / 255
    for name in ("ybr_full.dcm", "rgb.dcm", "rgb_rle.dcm"):
        pixels = read_image(root / "written" / name).pixels
        assert np.abs(pixels - luma).max() < 0.02, name
        assert np.abs(pixels - red).max() > 0.3, name
    for name in ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        path = TEST_FILES / name
        rgb = pydicom.dcmread(path).pixel_array.astype(float)   # pydicom's RGB of the YBR file
        pixels = read_image(path).pixels
        assert np.corrcoef(pixels.ravel(), (rgb @ [0.299, 0.587, 0.114]).ravel())[0, 1] > 0.999, name
        assert np.corrcoef(pixels.ravel(), rgb[..., 0].ravel())[0, 1] < 0.9, name


def test_palette_colour_gives_the_palettes_colours(corpus) -> None:
    root, _ = corpus
    path = root / "written" / "palette_ot.dcm"
    ds = pydicom.dcmread(path)
    indices = ds.pixel_array
    pixels = read_image(path).pixels
    assert np.abs(pixels - reference_pixels(path)).max() < 1e-5
    assert abs(np.corrcoef(pixels.ravel(), indices.ravel().astype(float))[0, 1]) < 0.99   # not the raw indices


def test_a_huge_header_is_refused_before_anything_is_allocated(corpus) -> None:
    root, _ = corpus
    path = root / "written" / "huge_header.dcm"
    tracemalloc.start()
    try:
        got, _ = outcome(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == "image too large (20000×20000 pixels, limit 80000000; see --max-pixels)"
    assert peak < 20 * 2**20, peak


def test_only_the_first_frame_is_read(tmp_path: Path) -> None:
    """A 40 MB multi-frame file costs one 2 MB frame and its float copies, not all 20 frames."""
    from dicom_corpus import dataset, save

    frames = np.stack([image(1024, seed=i % 3) for i in range(20)])
    path = save(dataset(frames[0], bits_stored=12, NumberOfFrames=20, PixelData=frames.tobytes()),
                tmp_path / "native.dcm")
    assert path.stat().st_size > 40 * 2**20
    tracemalloc.start()
    try:
        pixels = read_image(path).pixels
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"\npeak {peak / 2**20:.1f} MiB for a {path.stat().st_size / 2**20:.0f} MiB file")
    assert np.abs(pixels - reference_pixels(path)).max() < 1e-5
    assert peak < frames.nbytes / 2, peak


def test_the_pixel_limit_holds_with_malformed_rows(corpus) -> None:
    root, _ = corpus
    assert outcome(root / "written" / "multi_rows.dcm")[0] == "malformed header: Rows has 2 values [32768, 0]"
    assert outcome(root / "written" / "frames_1a.dcm")[0] == "malformed header: NumberOfFrames is '1A', not a number"


# -- through the CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cbir.models import ModelConfig, create_model, save_checkpoint
    root = tmp_path_factory.mktemp("cli")
    save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32,
                                             label_names=["normal", "pneumonia"], target="pneumonia")),
                    root / "model")
    write_good(root / "base", count=3)
    code, _, err = run_cli("ingest", "--data", root / "base", "--model", root / "model", "--index", root / "index",
                           "--collection", "c", "--layout", "folder", "--workers", 0)
    assert code == 0, err
    return {"model": root / "model", "index": root / "index"}


def test_cbir_query_on_each_file_answers_or_says_one_line(corpus, index) -> None:
    root, entries = corpus
    for entry in entries:
        code, out, err = run_cli("query", root / entry.relpath, "--index", index["index"], "--collection", "c",
                                 "--k", 2, "--json")
        assert "Traceback" not in out + err and code in (0, 2), (entry.relpath, code, err)
        if entry.expect == "decoded":
            assert code == 0 and json.loads(out)["neighbors"], (entry.relpath, err)
        else:
            assert code == 2 and len(err.strip().splitlines()) == 1, (entry.relpath, err)
            assert entry.expect == "refused" or entry.expect in err, (entry.relpath, err)
    parametric = root / "written" / "parametric_map.dcm"
    code, out, err = run_cli("query", parametric, "--index", index["index"], "--collection", "c", "--json",
                             "--any-modality")
    assert code == 0, err


def test_cbir_ingest_of_the_corpus_counts_every_file_and_says_one_line_per_bad_one(corpus, index,
                                                                                   tmp_path: Path) -> None:
    """In a subprocess with two DataLoader workers: a C library's own output on fd 2, or a worker's crash,
    would show here."""
    root, entries = corpus
    done = subprocess.run([sys.executable, "-m", "cbir.cli.main", "ingest", "--data", str(root), "--layout", "folder",
                           "--model", str(index["model"]), "--index", str(tmp_path / "index"), "--collection",
                           "corpus", "--workers", "2", "--batch-size", "4", "--label-map", "pydicom=normal",
                           "--label-map", "written=pneumonia"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr and "internal error" not in done.stderr
    lines = done.stderr.strip().splitlines()
    # progress, and the vote's calibration when the split (keyed by this machine's pseudonym key) leaves enough
    # labelled validation images
    progress = re.compile(r"^ingest \S+: \d+/\d+$|^calibrated the vote on \d+ validation images ")
    other = [line for line in lines if not progress.match(line) and str(root) not in line]
    assert other == [], other                                  # nothing but progress and one line per file
    bad = [e for e in entries if e.expect != "decoded"]
    for entry in entries:
        mine = [line for line in lines if f"{root / entry.relpath}:" in line]
        assert len(mine) == (0 if entry.expect == "decoded" else 1), (entry.relpath, mine)
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{len(entries)} files: {len(entries) - len(bad)} ingested, 0 already in the index, "
                              f"0 duplicates skipped, {len(bad)} failed"), summary


def test_a_decoders_own_output_does_not_reach_the_user(corpus, index) -> None:
    """libjpeg (in GDCM) may print "Corrupt JPEG data" for these damaged files: `cbir query` (a subprocess) says
    exactly one line for the one it cannot decode and nothing for the other, whose stdout stays JSON."""
    root, _ = corpus
    answers = []
    for name in ("jpeg_restart_markers.dcm", "jpeg_garbled.dcm"):
        path = root / "written" / name
        answers.append(subprocess.run([sys.executable, "-m", "cbir.cli.main", "query", str(path), "--index",
                                       str(index["index"]), "--collection", "c", "--json"], cwd=ROOT,
                                      capture_output=True, text=True, timeout=300,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    refused, garbled = answers
    assert refused.returncode == 2 and refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith(f"error: {root / 'written' / 'jpeg_restart_markers.dcm'}: corrupt pixel data "
                           "(RuntimeError: Unable to decode as exceptions were raised by all available plugins: "
                           "gdcm:"), line
    assert garbled.returncode == 0 and garbled.stderr == "", garbled.stderr
    assert json.loads(garbled.stdout)["neighbors"]              # stdout is still pure JSON


CHATTY = """
import ctypes, os
from cbir.io.capture import captured_output
with captured_output() as said:
    os.write(2, b"written to fd 2\\n")
    ctypes.CDLL(None).puts(b"buffered in C stdout")
print("done:", said.first_line(), "|", said.text.count("\\n"), flush=True)
"""


def test_what_c_code_writes_to_fd_1_and_2_is_captured() -> None:
    """Direct writes to fd 2 and C stdio's buffered stdout, as decoders' C libraries do, stay in the capture."""
    done = subprocess.run([sys.executable, "-c", CHATTY], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stderr == "" and done.stdout == "done: written to fd 2 | 2\n", (done.stdout, done.stderr)


def test_real_rsna_dicoms_decode_as_pydicom_reads_them() -> None:
    """Real RSNA files (JPEG Baseline, GDCM): the new first-frame path gives exactly pydicom's own pixels, so
    archives ingested before keep their embeddings."""
    from tests.conftest import shared_path

    folder = shared_path("data", "rsna", "stage_2_train_images")
    paths = sorted(folder.glob("*.dcm"))[:12]
    assert paths
    for path in paths:
        pixels = read_image(path).pixels
        assert np.abs(pixels - reference_pixels(path)).max() < 1e-6, path.name


def test_a_dicom_without_pixels_says_so_whatever_its_modality() -> None:
    """An SR's modality is SR: the line says it has no pixel data, not that it is no radiograph."""
    assert outcome(TEST_FILES / "reportsi.dcm")[0] == "no pixel data (Basic Text SR Storage)"
    assert outcome(TEST_FILES / "rtplan.dcm")[0] == "no pixel data (RT Plan Storage)"
