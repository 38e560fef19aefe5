"""Crashes and concurrent use: `cbir ingest` killed with SIGKILL mid-run and run again; a second process that
wants to write a collection another process is writing."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pandas as pd
import pytest

from cbir.store import open_index
from tests.conftest import payload_path

N = 500
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cbir.models import ModelConfig, create_model, save_checkpoint
    root = tmp_path_factory.mktemp("crash")
    done = subprocess.run([sys.executable, "-m", "cbir.cli.main", "synth", "--layout", "rsna", "--n", str(N), "--size",
                           "48", "--out", str(root / "data"), "--seed", "4"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32)),
                    root / "model")
    return {"data": root / "data", "model": root / "model", "root": root}


def _ingest(archive: dict[str, Path], index: Path, workers: int = 0, **env: str) -> subprocess.Popen:
    """`cbir ingest` in a subprocess that leads a process group of its own (its workers join it)."""
    command = [sys.executable, "-m", "cbir.cli.main", "ingest", "--data", str(archive["data"]), "--model",
               str(archive["model"]), "--index", str(index), "--collection", "rsna", "--workers", str(workers),
               "--batch-size", "8"]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env}, start_new_session=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _lines(stream: IO[str]) -> queue.Queue[str | None]:
    """The stream's lines, read by a daemon thread, so that waiting for one can time out (None: the end)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next_line(lines: queue.Queue[str | None], deadline: float, what: str) -> str | None:
    """The next line, or an AssertionError at `deadline` whether or not anything was printed."""
    try:
        return lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise AssertionError(f"no {what} before the deadline") from None


def _wait_for_progress(process: subprocess.Popen, fraction: float, timeout: float = 120) -> str:
    """Read the plain progress lines (`ingest rsna: k/N`) until k/N ≥ fraction; returns that line. The
    deadline holds even when the process prints nothing (it is killed then)."""
    deadline = time.monotonic() + timeout
    assert process.stderr is not None
    lines = _lines(process.stderr)
    try:
        while (line := _next_line(lines, deadline, "progress")) is not None:
            if line.startswith("ingest rsna: "):
                done, total = (int(x) for x in line.split(": ")[1].split("/"))
                if done >= fraction * total:
                    return line
    except AssertionError:
        process.kill()
        raise
    raise AssertionError(f"ingest ended before {fraction:.0%}: {process.wait()}")


def test_the_progress_deadline_holds_when_nothing_is_printed() -> None:
    """A silent, hung process fails the wait at its deadline (it used to be checked only when a line came)."""
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], stderr=subprocess.PIPE,
                              text=True)
    started = time.monotonic()
    with pytest.raises(AssertionError, match="no progress"):
        _wait_for_progress(silent, 0.5, timeout=1.0)
    assert time.monotonic() - started < 10
    assert silent.wait(10) != 0                                # killed, not left running


def _expected_payloads(data: Path) -> dict[str, int]:
    """relpath → Target, from the label CSV (one row per box; any positive row makes the patient positive)."""
    labels = pd.read_csv(data / "stage_2_train_labels.csv").groupby("patientId")["Target"].max()
    return {f"stage_2_train_images/{pid}.dcm": int(t) for pid, t in labels.items()}


@pytest.mark.parametrize(("workers", "at"), [(0, 0.4), (2, 0.02), (2, 0.4), (2, 0.9)])
def test_ingest_killed_mid_run_then_resumed(archive: dict[str, Path], tmp_path: Path, workers: int, at: float
                                            ) -> None:
    """SIGKILL at the first batches, midway and near the end, then at once a reader and a new run. With decoding
    workers, the workers used to survive their parent (blocked, holding the inherited collection lock), and
    every re-run was refused until a user found and killed them."""
    index = tmp_path / "index"
    first = _ingest(archive, index, workers, CBIR_EDGE_FLUSH_POINTS="40")
    _wait_for_progress(first, at)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert first.returncode == -signal.SIGKILL
    with open_index(str(index)) as idx:                        # at once: the killed writer's lock went with it
        survived = idx.count("rsna")
    deadline = time.monotonic() + 10                           # its workers die with it (no orphans left)
    while _group_alive(first.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group_alive(first.pid), "the killed ingest's workers outlived it"
    assert 0 <= survived < N, survived                         # what was flushed, never more
    second = _ingest(archive, index, workers)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    summary = out.strip().splitlines()[-1]
    assert f"{N} files: {N - survived} ingested, {survived} already in the index" in summary, summary
    assert not survived or f"{survived} of {N} images are already in 'rsna'; not read again" in err
    expected = _expected_payloads(archive["data"])
    with open_index(str(index)) as idx:
        points = list(idx.scroll("rsna"))
    assert len(points) == N == len({p.id for p in points})     # exactly one point per image
    assert {payload_path(p.payload): p.payload["target"] for p in points} == expected
    assert all(p.payload["label"] == ("Pneumonia" if p.payload["target"] else "No Pneumonia") for p in points)


HOLDER = """
import sys
from cbir.store import open_index
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
        assert holder.stdout is not None and holder.stdin is not None
        said = _lines(holder.stdout)
        first = _next_line(said, time.monotonic() + 120, "line from the holder")
        assert (first or "").strip() == "writing", first
        second = _ingest(archive, index)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "'rsna__v1': the collection is being written by another process" in err and "Qdrant server" in err
        dicom = next((archive["data"] / "stage_2_train_images").glob("*.dcm"))
        query = subprocess.run([sys.executable, "-m", "cbir.cli.main", "query", str(dicom), "--index", str(index),
                                "--collection", "rsna"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert query.returncode == 2 and len(query.stderr.strip().splitlines()) == 1
        assert "being written by another process" in query.stderr
    finally:
        holder.stdin.close()                                   # the holder closes its index and says so
        holder.wait(60)
    deadline = time.monotonic() + 10
    rest = list(iter(lambda: _next_line(said, deadline, "end of the holder's output"), None))
    assert "closed" in "".join(rest), holder.stderr.read() if holder.stderr else ""
    with open_index(str(index)) as idx:                        # nothing was corrupted
        assert idx.count("rsna") == N
        assert len({payload_path(p.payload) for p in idx.scroll("rsna")}) == N
    query = subprocess.run([sys.executable, "-m", "cbir.cli.main", "query", str(dicom), "--index", str(index),
                            "--collection", "rsna", "--k", "3"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert query.returncode == 0, query.stderr
