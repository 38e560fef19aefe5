"""`cbir demo`: the whole pipeline on a small synthetic RSNA-layout set, in minutes on a CPU."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbir.app.evaluate import evaluate_collection
from cbir.app.ingest import ingest_records
from cbir.app.open import open_index
from cbir.app.settings import Settings
from cbir.console import QUIET, Reporter
from cbir.data.layout import load_dataset
from cbir.data.splits import SplitSpec
from cbir.data.synth import synth_dataset
from cbir.errors import CbirError
from cbir.io import load_pseudonymizer
from cbir.models import ModelConfig, load_checkpoint
from cbir.report.montage import write_montage
from cbir.search import query_image
from cbir.search.pictures import neighbor_pictures
from cbir.search.query import describe_vote
from cbir.store import Filter
from cbir.train import TrainSettings, train_model

MARKER = ".cbir-demo"
COLLECTION = "demo"


@dataclass
class DemoResult:
    out: Path
    index: str
    seconds: dict[str, float] = field(default_factory=dict)
    query_file: str = ""
    query: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        s1, s2, base = self.report["stage1"], self.report["stage2"], self.report["baseline"]
        vote, pred = self.query["vote"], self.query["prediction"]
        total = sum(self.seconds.values())
        return [
            f"demo finished in {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in self.seconds.items())})",
            f"  data      {self.out / 'data'}  (synthetic RSNA layout: DICOM + stage_2_train_labels.csv)",
            f"  model     {self.out / 'model'}",
            f"  index     {self.index}  (Qdrant Edge, collection {COLLECTION!r})",
            f"  query     {self.query_file}  (held out; searched against the train/val archive)",
            f"            its own label: {self.query['query'].get('label')}; model P(Pneumonia) = "
            f"{pred['probability']:.2f} → {pred['label']}",
            f"            vote: {describe_vote(vote, len(self.query['neighbors']))}",
            f"            query JSON {self.out / 'query.json'}",
            f"  montage   {self.out / 'montage.png'}",
            f"  report    {self.out / 'report' / 'report.md'}",
            f"            ROC-AUC {_pct(s1['roc_auc'], s1.get('roc_auc_ci'))}; the vote: balanced accuracy "
            f"{_pct(s2['weighted_vote']['balanced_accuracy'], s2['weighted_vote'].get('balanced_accuracy_ci'))}; "
            f"majority of {self.report['k']}: accuracy {_pct(s2['knn_accuracy'], s2.get('knn_accuracy_ci'))}, "
            f"balanced {_pct(s2['balanced_accuracy'], s2.get('balanced_accuracy_ci'))}; mAP@{self.report['k']} "
            f"{_pct(s2['map_at_k'])}, majority baseline {_pct(base['majority_accuracy'])} "
            f"({self.report['n_queries']} test images; 95 % intervals by patient)",
            f"try:      cbir query {self.query_file} --index {self.index} --collection {COLLECTION} "
            "--filter split=train --montage similar.png",
        ]


def _pct(value: float | None, interval: list[float] | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f} %" + (f" [{100 * interval[0]:.1f}–{100 * interval[1]:.1f}]" if interval else "")


def _fresh(out: Path) -> None:
    """Start clean, but never delete a folder that an earlier demo did not create."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise CbirError(f"{out}: exists and is not a cbir demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("created by `cbir demo`; safe to delete\n")


def run_demo(out: Path, n: int = 400, size: int = 64, epochs: int = 8, backbone: str = "resnet10t",
             index: str | None = None, reporter: Reporter = QUIET, seed: int = 0,
             settings: Settings | None = None) -> DemoResult:
    settings = (settings or Settings.from_env()).with_options(index=index or str(out.resolve() / "index"))
    out = out.resolve()
    _fresh(out)
    result = DemoResult(out, settings.index)
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result.seconds[name] = round(now - clock, 1)
        clock = now

    reporter.log(f"1/6 synth: {n} RSNA-layout DICOMs at {size} px")
    with reporter.task("synth", n) as bar:
        synth_dataset("rsna", n, size, out / "data", seed=seed, progress=bar.advance)
    records = load_dataset(out / "data", "rsna", split=SplitSpec(seed=seed))
    lap("synth")

    reporter.log(f"2/6 train: {backbone} from scratch, {epochs} epochs")
    config = ModelConfig(backbone=backbone, image_size=size, embed_dim=64, bits=64,
                         label_names=list(records.label_names), target=records.target)
    train_model(records, config, TrainSettings(epochs=epochs, batch_size=32, lr=2e-3, seed=seed),
                out / "model", reporter)
    loaded = load_checkpoint(out / "model")
    lap("train")

    reporter.log("3/6 ingest into the embedded Qdrant Edge index")
    pseudonymize = load_pseudonymizer()
    with open_index(settings, writable=True, create=True) as idx:
        summary = ingest_records(records, loaded, idx, COLLECTION, pseudonymize, reporter=reporter,
                                 settings=settings)
    reporter.log(summary.line)
    lap("ingest")

    reporter.log("4/6 query one held-out DICOM; 5/6 montage")
    test = records.split("test")
    positives = test.meta[test.y == 1]
    query_file = str((positives if len(positives) else test.meta)["path"].iloc[0])
    with open_index(settings) as idx:
        archive = Filter(must={"split": ["train", "val"]})  # the held-out case is not its own neighbour
        known = records.target if len(positives) else str(idx.record(COLLECTION).negative_label)
        answer = query_image(query_file, loaded, idx, COLLECTION, k=10, flt=archive, pseudonymize=pseudonymize,
                             known_label=known, policy=settings.reader)
        result.query = answer.to_json()
        (out / "query.json").write_text(json.dumps(result.query, indent=2) + "\n")
        pictures = neighbor_pictures(idx, COLLECTION, result.query["neighbors"], settings.state_dir)
        assert answer.pixels is not None  # `query_image` keeps the decoded query
        write_montage(result.query, answer.pixels, pictures, out / "montage.png")
        result.query_file = query_file
        lap("query")

        reporter.log("6/6 evaluate on the test split")
        result.report = evaluate_collection(idx, COLLECTION, loaded, out / "report", k=10, reporter=reporter,
                                            settings=settings)
    lap("evaluate")
    return result
