"""ITQ codes fitted at ingest (`cbir ingest --codes itq`), on both index backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.app.ingest import ingest_records
from cbir.cli.main import app
from cbir.data.layout import load_dataset
from cbir.data.records import Records
from cbir.data.synth import synth_dataset
from cbir.embed.codes import collection_itq
from cbir.errors import CbirError
from cbir.io import load_pseudonymizer
from cbir.models import LoadedModel, ModelConfig, load_checkpoint
from cbir.search.query import query_image
from cbir.store import open_index
from cbir.train import TrainSettings, train_model

KINDS = ["edge", "local"]


@pytest.fixture(scope="module")
def rsna(tmp_path_factory: pytest.TempPathFactory) -> Records:
    root = tmp_path_factory.mktemp("itq") / "rsna"
    synth_dataset("rsna", 40, 32, root, seed=7)
    return load_dataset(root, "rsna")


@pytest.fixture(scope="module")
def model(rsna: Records, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    config = ModelConfig(backbone="test_resnet", task="binary", image_size=32, embed_dim=16, bits=16,
                         label_names=list(rsna.label_names), target=rsna.target)
    result = train_model(rsna, config, TrainSettings(epochs=1, batch_size=8, workers=0),
                         tmp_path_factory.mktemp("itq") / "model")
    return load_checkpoint(result.out)


def _location(kind: str, tmp_path: Path) -> str:
    return str(tmp_path / "index") if kind == "edge" else f"local:{tmp_path / 'index'}"


@pytest.mark.parametrize("kind", KINDS)
def test_itq_is_fitted_once_and_codes_every_point(kind: str, rsna: Records, model: LoadedModel,
                                                  tmp_path: Path) -> None:
    pseudonymize = load_pseudonymizer()
    with open_index(_location(kind, tmp_path), writable=True, create=True) as index:
        summary = ingest_records(rsna, model, index, "c", pseudonymize, batch_size=8, workers=0, codes="itq",
                                 itq_fit_size=20)
        meta = index.get_meta("c")
        points = list(index.scroll("c", with_vectors=True))
        assert summary.ingested == len(rsna) == index.count("c") == len(points)
        assert meta["codes"] == "itq" and 20 <= meta["itq"]["fitted_on"] < len(rsna)
        itq = collection_itq(index.record("c"))
        embeddings = np.stack([p.embedding for p in points])
        stored = np.stack([p.code for p in points])
        assert np.array_equal(stored, itq.encode(embeddings))
        # the model's own (LSH) codes differ: the points really carry ITQ codes
        lsh = (embeddings @ model.model.code_projection.numpy() > 0).astype(np.uint8)
        assert not np.array_equal(stored, lsh)
        # a second ingest keeps the fitted parameters and adds nothing new
        ingest_records(rsna, model, index, "c", pseudonymize, batch_size=8, workers=0)
        assert index.get_meta("c")["itq"] == meta["itq"] and index.count("c") == len(rsna)
        # a query is coded the same way as the points
        path = rsna.meta["path"].iloc[0]
        hits = query_image(path, model, index, "c", k=3, prefilter=10, pseudonymize=pseudonymize).neighbors
        assert hits[0]["hamming"] == 0 and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        with pytest.raises(CbirError, match="stores itq codes"):
            ingest_records(rsna, model, index, "c", pseudonymize, workers=0, codes="model")


def test_itq_needs_no_more_bits_than_dimensions(rsna: Records, tmp_path: Path) -> None:
    config = ModelConfig(backbone="test_resnet", task="binary", image_size=32, embed_dim=8, bits=16,
                         label_names=list(rsna.label_names), target=rsna.target, appearance_size=0)
    result = train_model(rsna, config, TrainSettings(epochs=1, batch_size=8, workers=0), tmp_path / "m")
    with open_index(str(tmp_path / "index"), writable=True, create=True) as index, \
            pytest.raises(CbirError, match="bits ≤ the embedding size"):
        ingest_records(rsna, load_checkpoint(result.out), index, "c", load_pseudonymizer(), workers=0, codes="itq")


def test_cli_codes_option(rsna: Records, model: LoadedModel, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["ingest", "--data", str(rsna.root), "--layout", "rsna", "--model", str(model.path), "--index",
            str(tmp_path / "index"), "--collection", "c", "--workers", "0"]
    bad = runner.invoke(app, [*args, "--codes", "pq"])
    assert bad.exit_code not in (0, 1) and "unknown code source 'pq'" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout
    good = runner.invoke(app, [*args, "--codes", "itq"])
    assert good.exit_code == 0, good.stderr
    with open_index(str(tmp_path / "index")) as index:
        assert index.get_meta("c")["codes"] == "itq" and index.count("c") == len(rsna)
