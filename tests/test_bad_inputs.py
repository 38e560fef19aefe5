"""Bad input, with nothing lost: every kind of bad file gets one line naming it and the reason, ingest goes on
and counts every file, --strict stops, `cbir query` exits 2 with one line, and the index keeps what it held."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from badinputs import corpus_files, write_folder_corpus, write_good, write_rsna_missing

from cbir.errors import printable
from cbir.store import open_index
from tests.conftest import payload_path
from tests.conftest import run_cli as run


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cbir.models import ModelConfig, create_model, save_checkpoint
    out = tmp_path_factory.mktemp("model") / "m"
    save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32,
                                             label_names=["normal", "pneumonia"], target="pneumonia")), out)
    return out


def _snapshot(index: Path, collection: str) -> dict[str, tuple]:
    with open_index(str(index)) as idx:
        return {p.id: (json.dumps(p.payload, sort_keys=True), p.embedding.tobytes(), p.code.tobytes())
                for p in idx.scroll(collection, with_vectors=True)}


def test_ingest_reports_every_bad_file_counts_all_and_loses_nothing(model: Path, tmp_path: Path) -> None:
    index = tmp_path / "index"
    base = tmp_path / "base"
    write_good(base, count=5)
    ingest = ("--model", model, "--index", index, "--collection", "cases", "--layout", "folder", "--workers", 0)
    assert run("ingest", "--data", base, *ingest)[0] == 0
    before = _snapshot(index, "cases")
    corpus = tmp_path / "corpus"
    kinds = write_folder_corpus(corpus)
    assert len(kinds) >= 15
    code, out, err = run("ingest", "--data", corpus, *ingest, "--max-pixels", 10000)
    assert code == 1, err                                   # finished, some files failed
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    for kind in kinds:
        path = printable(str(corpus / kind.relpath))
        mine = [line for line in lines if path in line]
        if kind.outcome == "ingested":
            assert mine == [], (kind.name, mine)
        else:
            assert len(mine) == 1 and kind.message in mine[0], (kind.name, mine)
    total = corpus_files(corpus)
    summary = out.strip().splitlines()[-1]
    numbers = [int(word) for word in summary.replace(",", "").replace(";", "").split() if word.isdigit()]
    assert summary.startswith(f"{total} files:"), summary
    files, ingested, already, skipped, failed = numbers[:5]
    assert ingested + already + skipped + failed == files == total
    assert failed == sum(k.outcome == "failed" for k in kinds) and skipped == 1
    with open_index(str(index)) as idx:
        paths = {payload_path(p.payload) for p in idx.scroll("cases")}
    for kind in kinds:
        assert (printable(kind.relpath) in paths) == (kind.outcome == "ingested"), kind.name
    assert "pneumonia/caf\\xe9.png" in paths                  # a non-UTF-8 name is stored with an escape
    assert "pneumonia/dup_a.dcm" in paths and "pneumonia/dup_c.dcm" not in paths  # the first one is kept
    after = _snapshot(index, "cases")
    assert {k: after[k] for k in before} == before            # nothing that was there changed


def test_strict_stops_at_the_first_bad_file(model: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_folder_corpus(corpus)
    code, out, err = run("ingest", "--data", corpus, "--model", model, "--index", tmp_path / "index",
                         "--collection", "c", "--layout", "folder", "--workers", 0, "--strict")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(corpus) in err and "Traceback" not in err


def test_query_on_each_bad_file_is_one_line(model: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    write_good(base, count=3)
    index = tmp_path / "index"
    assert run("ingest", "--data", base, "--model", model, "--index", index, "--collection", "c", "--layout",
               "folder", "--workers", 0)[0] == 0
    corpus = tmp_path / "corpus"
    kinds = write_folder_corpus(corpus)
    for kind in kinds:
        code, out, err = run("query", corpus / kind.relpath, "--index", index, "--collection", "c", "--k", 3,
                             "--max-pixels", 10000)
        assert "Traceback" not in out + err, kind.name
        if kind.outcome == "failed" and "SOPInstanceUID" not in kind.message:
            assert code == 2 and len(err.strip().splitlines()) == 1, (kind.name, err)
            assert kind.message in err, (kind.name, err)
        else:                                                 # readable files (a UID conflict is an ingest matter)
            assert code == 0, (kind.name, err)


def test_label_csv_problems(model: Path, tmp_path: Path) -> None:
    data = tmp_path / "rsna"
    absent = write_rsna_missing(data)
    code, out, err = run("ingest", "--data", data, "--model", model, "--index", tmp_path / "index",
                         "--collection", "c", "--layout", "rsna", "--workers", 0)
    assert code == 1, err
    for pid in absent:
        (line,) = [x for x in err.splitlines() if f"{pid}.dcm" in x]
        assert "listed in stage_2_train_labels.csv but not found" in line
    assert out.strip().splitlines()[-1].startswith("9 files: 6 ingested")
    broken = tmp_path / "broken"
    write_rsna_missing(broken)
    (broken / "stage_2_train_labels.csv").write_text("patient,label\np1,0\n")
    code, out, err = run("ingest", "--data", broken, "--model", model, "--index", tmp_path / "index",
                         "--collection", "c", "--layout", "rsna")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "stage_2_train_labels.csv: missing column 'patientId'" in err


def test_duplicate_policy_is_per_pixels(model: Path, tmp_path: Path) -> None:
    """Same SOPInstanceUID and same pixels: skipped; other pixels: the first is kept, the conflict reported."""
    corpus = tmp_path / "corpus"
    write_folder_corpus(corpus)
    index = tmp_path / "index"
    code, out, err = run("ingest", "--data", corpus, "--model", model, "--index", index, "--collection", "c",
                         "--layout", "folder", "--workers", 0, "--max-pixels", 10000)
    with open_index(str(index)) as idx:
        first = [p for p in idx.scroll("c") if payload_path(p.payload) == "pneumonia/dup_a.dcm"]
    assert len(first) == 1
    assert "same SOPInstanceUID and pixels as" in err and "SOPInstanceUID conflict" in err
    assert np.isfinite(first[0].payload["probability"])
