"""Crashes and concurrent use: `cbir ingest` killed with SIGKILL mid-run and run again; a second process that
wants to write a collection another process is writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cbir.index import open_index

N = 500
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cbir.models import ModelConfig, create_model, save_checkpoint
    root = tmp_path_factory.mktemp("crash")
    done = subprocess.run([sys.executable, "-m", "cli.main", "synth", "--layout", "rsna", "--n", str(N), "--size",
                           "48", "--out", str(root / "data"), "--seed", "4"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32)),
                    root / "model")
    return {"data": root / "data", "model": root / "model", "root": root}


def _ingest(archive: dict[str, Path], index: Path, **env: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "cli.main", "ingest", "--data", str(archive["data"]), "--model",
               str(archive["model"]), "--index", str(index), "--collection", "rsna", "--workers", "0",
               "--batch-size", "8"]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def _wait_for_progress(process: subprocess.Popen, fraction: float, timeout: float = 120) -> str:
    """Read the plain progress lines (`ingest rsna: k/N`) until k/N ≥ fraction; returns that line."""
    deadline = time.monotonic() + timeout
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("ingest rsna: "):
            done, total = (int(x) for x in line.split(": ")[1].split("/"))
            if done >= fraction * total:
                return line
        assert time.monotonic() < deadline, "no progress"
    raise AssertionError(f"ingest ended before {fraction:.0%}: {process.wait()}")


def _expected_payloads(data: Path) -> dict[str, int]:
    """relpath → Target, from the label CSV (one row per box; any positive row makes the patient positive)."""
    labels = pd.read_csv(data / "stage_2_train_labels.csv").groupby("patientId")["Target"].max()
    return {f"stage_2_train_images/{pid}.dcm": int(t) for pid, t in labels.items()}


def test_ingest_killed_mid_run_then_resumed(archive: dict[str, Path], tmp_path: Path) -> None:
    index = tmp_path / "index"
    first = _ingest(archive, index, CBIR_EDGE_FLUSH_POINTS="40")
    _wait_for_progress(first, 0.4)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert first.returncode == -signal.SIGKILL
    with open_index(str(index)) as idx:                        # the killed writer's lock went with it
        survived = idx.count("rsna")
    assert 0 < survived < N, survived                          # some flushed points, not all
    second = _ingest(archive, index)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    summary = out.strip().splitlines()[-1]
    assert f"{N} files: {N - survived} ingested, {survived} already in the index" in summary, summary
    assert f"{survived} of {N} images are already in 'rsna'; not read again" in err
    expected = _expected_payloads(archive["data"])
    with open_index(str(index)) as idx:
        points = list(idx.scroll("rsna"))
    assert len(points) == N == len({p.id for p in points})     # exactly one point per image
    assert {p.payload["path"]: p.payload["target"] for p in points} == expected
    assert all(p.payload["label"] == ("Pneumonia" if p.payload["target"] else "No Pneumonia") for p in points)


HOLDER = """
import sys
from cbir.index import open_index
index = open_index(sys.argv[1], writable=True)
points = list(index.scroll("rsna", with_vectors=True))[:10]
index.upsert("rsna", points)            # now this process writes the collection
print("writing", flush=True)
sys.stdin.read()                        # until the test closes stdin
index.close()
print("closed", flush=True)
"""


def test_a_second_process_gets_one_line_and_nothing_breaks(archive: dict[str, Path], tmp_path: Path) -> None:
    index = tmp_path / "index"
    done = _ingest(archive, index)
    assert done.wait(300) == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(index)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "writing", holder.stderr
        second = _ingest(archive, index)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "'rsna__v1': the collection is being written by another process" in err and "Qdrant server" in err
        dicom = next((archive["data"] / "stage_2_train_images").glob("*.dcm"))
        query = subprocess.run([sys.executable, "-m", "cli.main", "query", str(dicom), "--index", str(index),
                                "--collection", "rsna"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert query.returncode == 2 and len(query.stderr.strip().splitlines()) == 1
        assert "being written by another process" in query.stderr
    finally:
        out, err = holder.communicate("", timeout=60)
    assert "closed" in out, err
    with open_index(str(index)) as idx:                        # nothing was corrupted
        assert idx.count("rsna") == N
        assert len({p.payload["path"] for p in idx.scroll("rsna")}) == N
    query = subprocess.run([sys.executable, "-m", "cli.main", "query", str(dicom), "--index", str(index),
                            "--collection", "rsna", "--k", "3"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert query.returncode == 0, query.stderr
