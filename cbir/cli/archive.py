"""`cbir ingest`, `cbir query` and `cbir evaluate`: the archive's three steps, each one use-case of `cbir.app`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cbir.cli.common import (
    AnyModalityOpt,
    BatchOpt,
    CollectionOpt,
    DatasetIdOpt,
    DeviceOpt,
    FoldOpt,
    FoldsOpt,
    IndexOpt,
    JsonOpt,
    KOpt,
    LabelMapOpt,
    LayoutOpt,
    LocalPathsOpt,
    MaxPixelsOpt,
    OtherSplitOpt,
    RegexOpt,
    SeedOpt,
    TeamOpt,
    TestFractionOpt,
    ValFractionOpt,
    WorkersOpt,
    guarded,
    heavy_imports,
    make_reporter,
    out,
    settings,
    split_options,
)

FILTER_HELP = ("key=value or key!=value, repeatable (a repeated key matches any of its values): label, view "
               "(PA, AP, LL, OBL), sex (M, F), age (a band, e.g. 40-49), modality, dataset, split (train, val, "
               "test), team, or patient (a PatientID, keyed as the payloads store it)")


def register(app: typer.Typer) -> None:
    for command in (ingest, query, evaluate):
        app.command()(guarded(command))


def ingest(ctx: typer.Context,
           data: Annotated[Path, typer.Option("--data", help="dataset folder")],
           model: Annotated[Path, typer.Option("--model", help="run folder from `cbir train`")],
           index: IndexOpt = None, collection: CollectionOpt = None, layout: LayoutOpt = "auto",
           batch_size: BatchOpt = 32, workers: WorkersOpt = 2,
           strict: Annotated[bool, typer.Option("--strict", help="stop at the first bad file")] = False,
           device: DeviceOpt = "auto",
           seed: SeedOpt = None, val_fraction: ValFractionOpt = None, test_fraction: TestFractionOpt = None,
           folds: FoldsOpt = None, fold: FoldOpt = None, other_split: OtherSplitOpt = False,
           patient_regex: RegexOpt = None,
           codes: Annotated[str | None, typer.Option(
               "--codes", show_default=False, help="binary codes of a new collection: model (the hash layer, or "
               "LSH) or itq (fitted here) [default: model]")] = None,
           part: Annotated[str | None, typer.Option(
               "--part", help="i/n: only the i-th of n deterministic slices (n machines ingest in parallel)")
           ] = None,
           shards: Annotated[int, typer.Option("--shards", min=1, help="server: shards of a new collection")] = 1,
           replicas: Annotated[int, typer.Option("--replicas", min=1, help="server: copies of each shard")] = 1,
           team: TeamOpt = None, max_pixels: MaxPixelsOpt = None, any_modality: AnyModalityOpt = False,
           reindex: Annotated[bool, typer.Option(
               "--reindex", help="build the next version of the collection (e.g. with a new model) while queries "
               "go on, then swap it in and delete the old version")] = False,
           allow_count_change: Annotated[bool, typer.Option(
               "--allow-count-change", help="--reindex: swap even if the point counts differ (keeps the old "
               "version)")] = False,
           keep_paths: Annotated[bool, typer.Option(
               "--keep-paths", help="store each file's relative path in the index, for private archives whose "
               "file names identify nobody (default: a keyed pseudonym; the path stays in this machine's file "
               "map)")] = False,
           thumbnails: Annotated[bool, typer.Option(
               "--thumbnails", help="store a small de-identified picture (192 px WebP) with each point, so that "
               "other teams see the cases in the viewer and in montages")] = False,
           label_map: LabelMapOpt = None, dataset_id: DatasetIdOpt = None,
           ) -> None:
    """Embed every image of a dataset and upsert it into the index, split as the model's training data was
    (each point's payload `split`; the collection records the split), then calibrate the vote on the validation
    images. Payloads name files by keyed pseudonyms unless --keep-paths."""
    with heavy_imports():
        from cbir.app.folders import DatasetOptions, IngestOptions
        from cbir.app.folders import ingest as run_ingest
    summary = run_ingest(
        data, model, collection,
        DatasetOptions(layout, split_options(seed, val_fraction, test_fraction, folds, fold), other_split,
                       patient_regex, dataset_id, list(label_map or [])),
        IngestOptions(batch_size, workers, strict, device, codes, part, shards, replicas, reindex, allow_count_change,
                      keep_paths, thumbnails),
        settings(ctx, index, max_pixels, any_modality), team, make_reporter())
    out.print(summary.line, markup=False)
    if summary.failed:
        raise typer.Exit(1)


def query(ctx: typer.Context,
          image: Annotated[Path, typer.Argument(help="DICOM, PNG or JPEG file")],
          model: Annotated[Path | None, typer.Option(
              "--model", show_default=False, help="run folder [default: the collection's model]")] = None,
          index: IndexOpt = None, collection: CollectionOpt = None, k: KOpt = 10,
          filters: Annotated[list[str] | None, typer.Option("--filter", help=FILTER_HELP)] = None,
          prefilter: Annotated[int | None, typer.Option(
              "--prefilter", min=1, help="first keep the N nearest by Hamming distance of the binary codes")] = None,
          hamming_radius: Annotated[int | None, typer.Option(
              "--hamming-radius", min=0, help="first keep the codes within this Hamming distance")] = None,
          as_json: JsonOpt = False,
          montage: Annotated[Path | None, typer.Option("--montage", help="write a PNG montage")] = None,
          device: DeviceOpt = "auto", team: TeamOpt = None,
          max_pixels: MaxPixelsOpt = None, any_modality: AnyModalityOpt = False,
          local_paths: LocalPathsOpt = False,
          include_self: Annotated[bool, typer.Option(
              "--include-self", help="let an archived copy of the query itself vote (left out by default)")] = False
          ) -> None:
    """Find the k most similar archived cases to one image. File names are not printed unless --local-paths."""
    with heavy_imports():
        from cbir.app.query import QueryOptions
        from cbir.app.query import query as run_query
    payload = run_query(image, collection, model,
                        QueryOptions(k, list(filters or []), prefilter, hamming_radius, include_self, local_paths,
                                     montage, device),
                        settings(ctx, index, max_pixels, any_modality), team)
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    _print_query(payload)


def evaluate(ctx: typer.Context,
             model: Annotated[Path | None, typer.Option(
                 "--model", show_default=False, help="run folder [default: the collection's model]")] = None,
             index: IndexOpt = None, collection: CollectionOpt = None,
             queries: Annotated[Path | None, typer.Option(
                 "--queries", show_default=False, help="another dataset as queries [default: the model's test "
                 "patients, from the collection]")] = None,
             layout: LayoutOpt = "auto", k: KOpt = 10,
             out_dir: Annotated[Path, typer.Option("--out", help="report folder")] = Path("cbir-report"),
             as_json: JsonOpt = False, device: DeviceOpt = "auto",
             patient_regex: RegexOpt = None, team: TeamOpt = None, other_split: OtherSplitOpt = False,
             robustness: Annotated[bool, typer.Option(
                 "--robustness", help="also re-encode every query (JPEG q60, cropped 12-bit MONOCHROME1 DICOM, "
                                      "blur + gamma, 5° rotation): rank of the original and the metrics' change"
             )] = False, label_map: LabelMapOpt = None, dataset_id: DatasetIdOpt = None,
             max_pixels: MaxPixelsOpt = None, any_modality: AnyModalityOpt = False) -> None:
    """Stage-1 ROC-AUC and stage-2 kNN metrics with 95 % CIs and the majority baseline; writes report.md/json.

    The queries are the test split the model was trained with (from the collection), or --queries: another
    dataset's images (only its test split when it is the model's own training data)."""
    with heavy_imports():
        from cbir.app.folders import DatasetOptions
        from cbir.app.folders import evaluate as run_evaluate
    report = run_evaluate(collection, model, queries, out_dir, k,
                          DatasetOptions(layout, {}, other_split, patient_regex, dataset_id, list(label_map or [])),
                          robustness, device, settings(ctx, index, max_pixels, any_modality), team,
                          make_reporter(quiet=as_json))
    report.pop("per_query", None)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
        return
    _print_report(report, out_dir)


def _describe_prediction(pred: dict[str, Any]) -> str:
    """The model's own answer in words: its probability, whether calibrated, and the point it is read at."""
    if "operating_point" not in pred:
        return f"P({pred['target']}) = {pred['probability']:.3f} → {pred['label']}"
    how = "calibrated" if pred.get("calibrated") else "a raw score, not calibrated"
    return (f"P({pred['target']}) = {pred['probability']:.3f}, {how} → {pred['label']} ({pred['target']} from "
            f"{pred['operating_point']:.2f} on)")


def _print_query(result: dict[str, Any]) -> None:
    from cbir.search.query import describe_vote
    table = Table(title=f"{result['k']} nearest cases in {result['collection']!r}")
    for column in ("rank", "score", "hamming", "labels", "view", "sex", "age", "file"):
        table.add_column(column, justify="right" if column in ("rank", "score", "hamming") else "left")
    vote, pred = result["vote"], result["prediction"]
    for n in result["neighbors"]:
        own = " self" if n.get("self_match") and not vote.get("included_self") else ""
        table.add_row(f"{n['rank']}{own}", f"{n['score']:.4f}", "" if n["hamming"] is None else str(n["hamming"]),
                      ", ".join(n["labels"] or []) or ("unknown" if n.get("label") is None else ""),
                      n["view"] or "", n["sex"] or "", n["age_band"] or "",
                      n["path"] or n.get("file") or "")
    out.print(table)
    if (result.get("query") or {}).get("label"):
        out.print(f"query's own label: {result['query']['label']}", markup=False)
    if vote.get("self_matches") and not vote.get("included_self"):
        out.print("the query is already in the archive (rank marked self, similarity ≥ 0.9999): left out of the "
                  "vote (--include-self keeps it)", markup=False)
    out.print(f"kNN vote: {describe_vote(vote, len(result['neighbors']))}", markup=False)
    for warning in vote.get("warnings") or []:
        out.print(f"warning: {warning}; the vote is unreliable", markup=False)
    out.print(f"model: {_describe_prediction(pred)}", markup=False)
    for found in pred.get("boxes") or []:
        x, y, w, h = found["box"]
        out.print(f"model box: x {x:.0f}, y {y:.0f}, w {w:.0f}, h {h:.0f} (score {found['score']:.2f})", markup=False)
    if result.get("montage"):
        out.print(f"montage: {result['montage']}", markup=False)


def _print_report(report: dict[str, Any], out_dir: Path) -> None:
    """The console table: stage 1, then the vote that `cbir query` shows, then the plain majority of k and the
    other retrieval figures as baselines (docs/metrics.md)."""
    s1, s2, base, k = report["stage1"], report["stage2"], report["baseline"], report["k"]
    vote = s2.get("weighted_vote") or {}
    table = Table(title=f"evaluation: {report['n_queries']} queries, k = {k}")
    for column in ("metric", "value", "95 % CI"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    rows = [("stage 1 ROC-AUC", s1["roc_auc"], s1.get("roc_auc_ci")),
            *([("box mAP (IoU 0.40–0.75)", s1["box_map"], None)] if "box_map" in s1 else []),
            *([("vote balanced accuracy (what cbir query shows)", vote["balanced_accuracy"],
                vote.get("balanced_accuracy_ci")),
               ("vote minus model, balanced accuracy", vote["minus_model_balanced_accuracy"],
                vote.get("minus_model_balanced_accuracy_ci")),
               ("vote sensitivity / specificity", None, None),
               ("model sensitivity / specificity", None, None)] if vote else []),
            (f"majority of {k}: accuracy (baseline)", s2["knn_accuracy"], s2.get("knn_accuracy_ci")),
            (f"majority of {k}: balanced accuracy (baseline)", s2["balanced_accuracy"],
             s2.get("balanced_accuracy_ci")),
            (f"precision@{k}", s2["precision_at_k"], None), (f"mAP@{k}", s2["map_at_k"], s2.get("map_at_k_ci")),
            *[(name, s2[key], None) for key, name in (("map_at_k_any_finding", "mAP, any shared finding"),
                                                      ("hamming_map_at_k", "mAP, Hamming ranking"),
                                                      ("prefilter_knn_accuracy", "kNN accuracy, Hamming prefilter"))
              if key in s2],
            (f"majority baseline (always {_majority_name(report)})", base["majority_accuracy"], None)]

    def pair(block: dict[str, Any]) -> str:
        return " / ".join("n/a" if block.get(key) is None else f"{100 * block[key]:.1f} %"
                          for key in ("sensitivity", "specificity"))
    for name, value, ci in rows:
        if name.endswith("sensitivity / specificity"):
            table.add_row(name, pair(vote if name.startswith("vote") else s1), "")
            continue
        interval = "" if not ci else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}"
        table.add_row(name, "n/a" if value is None else f"{100 * value:.2f} %", interval)
    out.print(table)
    unknown = report.get("unknown_labels") or {}
    if any(unknown.values()):
        out.print(f"left out (labels unknown): {unknown['queries_skipped']} queries, {unknown['archive_skipped']} "
                  "archive images", markup=False)
    out.print(f"report: {out_dir / 'report.md'}", markup=False)


def _majority_name(report: dict[str, Any]) -> str:
    context = report.get("context") or {}
    if report["baseline"].get("majority_label") == 1:
        return str(context.get("target") or "positive")
    return str(context.get("negative_label") or "negative")
