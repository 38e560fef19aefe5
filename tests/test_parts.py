"""Ingest for a shared server: `--part i/n` slices that cover a dataset exactly once, and `--shards/--replicas`
(on local mode, and, with $CBIR_TEST_QDRANT_URL, on a live server or cluster)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_index import SERVER_REPLICAS, SERVER_SHARDS, SERVER_SKIP, SERVER_URL, server_index
from typer.testing import CliRunner

from cbir.cli.main import app
from cbir.data.layout import load_dataset
from cbir.data.records import Records
from cbir.data.splits import parse_part, part_mask
from cbir.data.synth import synth_dataset
from cbir.models import ModelConfig
from cbir.store import open_index
from cbir.store.versions import drop
from cbir.train import TrainSettings, train_model


def test_parts_cover_every_key_once_whatever_the_order() -> None:
    keys = [f"images/{i:05d}.dcm" for i in range(1000)]
    masks = np.stack([part_mask(keys, i, 4) for i in range(1, 5)])
    assert (masks.sum(axis=0) == 1).all()
    assert all(200 < m.sum() < 300 for m in masks)  # roughly even
    shuffled = list(np.random.default_rng(0).permutation(keys))
    again = {k for k, keep in zip(shuffled, part_mask(shuffled, 2, 4), strict=True) if keep}
    assert again == {k for k, keep in zip(keys, masks[1], strict=True) if keep}


@pytest.mark.parametrize("text", ["0/4", "5/4", "1/0", "a/b", "3", "1/-2"])
def test_bad_part_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bad part"):
        parse_part(text)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Records, Path]:
    """30 synthetic RSNA images and a 1-epoch model trained on them."""
    root = tmp_path_factory.mktemp("parts") / "rsna"
    synth_dataset("rsna", 30, 32, root, seed=4)
    records = load_dataset(root, "rsna")
    config = ModelConfig(backbone="test_resnet", task="binary", image_size=32, embed_dim=16, bits=16,
                         label_names=list(records.label_names), target=records.target)
    settings = TrainSettings(epochs=1, batch_size=8, workers=0)
    return records, train_model(records, config, settings, root.parent / "model").out


def test_two_parts_ingest_one_collection_without_duplicates(dataset: tuple[Records, Path], tmp_path: Path) -> None:
    records, model = dataset
    runner = CliRunner()
    args = ["ingest", "--data", str(records.root), "--model", str(model), "--index", str(tmp_path / "idx"),
            "--workers", "0"]
    bad = runner.invoke(app, [*args, "--collection", "itq", "--codes", "itq", "--part", "2/2"])
    assert bad.exit_code != 0 and "ingest part 1 first" in bad.stderr
    assert runner.invoke(app, [*args, "--collection", "c", "--part", "5/2"]).exit_code not in (0, 1)
    sizes = []
    for part in ("2/2", "1/2"):
        result = runner.invoke(app, [*args, "--collection", "c", "--part", part])
        assert result.exit_code == 0, result.stderr
        sizes.append(int(result.stdout.split(" files")[0].split()[-1]))
    with open_index(str(tmp_path / "idx")) as index:
        ids = [p.id for p in index.scroll("c", with_vectors=False)]
    assert sum(sizes) == len(records) == len(ids) == len(set(ids)) and min(sizes) > 0


def test_shards_and_replicas(dataset: tuple[Records, Path], tmp_path: Path) -> None:
    records, model = dataset
    runner = CliRunner()
    args = ["ingest", "--data", str(records.root), "--model", str(model), "--workers", "0", "--shards", "3",
            "--replicas", "2"]
    edge = runner.invoke(app, [*args, "--index", str(tmp_path / "edge")])
    assert edge.exit_code == 2 and "need a Qdrant server" in edge.stderr and len(edge.stderr.splitlines()) == 1
    local = runner.invoke(app, [*args, "--index", f"local:{tmp_path / 'local'}"])  # the server's code path
    assert local.exit_code == 0, local.stderr
    with open_index(f"local:{tmp_path / 'local'}") as index:
        meta = index.get_meta("cbir")
        assert (meta["shards"], meta["replicas"]) == (3, 2) and index.count("cbir") == len(records)


@pytest.mark.skipif(not SERVER_URL, reason=SERVER_SKIP)
def test_cli_on_a_live_server_with_shards_and_replicas(dataset: tuple[Records, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`cbir ingest --shards S --replicas R` (the test run's, 3 and 2 on the CI cluster) in two parts, then query and
    evaluate through the server."""
    records, model = dataset
    if os.environ.get("CBIR_TEST_QDRANT_API_KEY"):
        monkeypatch.setenv("CBIR_QDRANT_API_KEY", os.environ["CBIR_TEST_QDRANT_API_KEY"])
    name, runner = f"cbir_test_{uuid.uuid4().hex[:8]}", CliRunner()
    args = ["--data", str(records.root), "--model", str(model), "--index", SERVER_URL, "--collection", name,
            "--workers", "0", "--shards", str(SERVER_SHARDS), "--replicas", str(SERVER_REPLICAS)]
    try:
        for part in ("1/2", "2/2"):
            result = runner.invoke(app, ["ingest", *args, "--part", part])
            assert result.exit_code == 0, result.stderr
        with server_index() as index:
            stored = index.resolve(name)
            params = index._client.get_collection(stored).config.params
            assert (params.shard_number, params.replication_factor) == (SERVER_SHARDS, SERVER_REPLICAS)
            assert index.count(name) == len(records)
            meta = index.get_meta(name)
        assert (meta["shards"], meta["replicas"]) == (SERVER_SHARDS, SERVER_REPLICAS)
        query = runner.invoke(app, ["query", records.meta["path"][0], "--index", SERVER_URL, "--collection", name,
                                    "--k", "5", "--json"])
        assert query.exit_code == 0, query.stderr
        assert json.loads(query.stdout)["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        report = runner.invoke(app, ["evaluate", "--index", SERVER_URL, "--collection", name, "--k", "5", "--out",
                                     str(tmp_path / "report"), "--json"])
        assert report.exit_code == 0, report.stderr
        assert json.loads(report.stdout)["n_queries"] > 0
    finally:
        with server_index() as index:
            if name in index.list_aliases():
                drop(index, name)
