"""`cbir bench`: the query path against the alternatives in one run, and what thumbnails cost on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cbir.app.open import open_index
from cbir.cli.common import CollectionOpt, IndexOpt, guarded, make_reporter, out, settings
from cbir.errors import CbirError


def register(app: typer.Typer) -> None:
    app.command()(guarded(bench))


def bench(ctx: typer.Context,
          n: Annotated[str, typer.Option("--n", help="collection sizes, comma-separated")] = "10000,100000",
          dim: Annotated[int, typer.Option("--dim", min=2, help="embedding size of the synthetic points")] = 512,
          bits: Annotated[int, typer.Option("--bits", min=8, help="their code bits")] = 64,
          queries: Annotated[int, typer.Option("--queries", min=5, help="queries per row")] = 200,
          prefilter: Annotated[str, typer.Option("--prefilter", help="N of the top-N Hamming prefilter; several "
                                                 "(e.g. 1000,4000) give a row each")] = "1000",
          radius: Annotated[int | None, typer.Option("--radius", min=0,
                                                     help="Hamming radius (default bits/4)")] = None,
          json_out: Annotated[Path | None, typer.Option("--json-out", help="write the results as JSON here")
                              ] = None,
          markdown_out: Annotated[Path | None, typer.Option(
              "--markdown-out", help="write the table as Markdown here")] = None,
          from_index: Annotated[bool, typer.Option("--from-index", help="use --index/--collection's points")
                                ] = False,
          index: IndexOpt = None, collection: CollectionOpt = None,
          hnsw: Annotated[bool, typer.Option("--hnsw/--no-hnsw", help="also build and query an HNSW graph")] = True,
          pipeline: Annotated[bool, typer.Option("--pipeline/--no-pipeline", help="also time the model side")
                              ] = True,
          backbone: Annotated[str, typer.Option("--backbone", help="pipeline: backbone")] = "resnet18",
          image_size: Annotated[int, typer.Option("--image-size", help="pipeline: model input size")] = 224,
          pipeline_images: Annotated[int, typer.Option("--pipeline-images", min=8, help="pipeline: DICOMs")] = 96,
          source_size: Annotated[int, typer.Option("--source-size", min=32, help="pipeline: DICOM size (px)")
                                 ] = 1024,
          storage: Annotated[bool, typer.Option(
              "--storage", help="instead: the Edge index's size on disk per 1,000 points at the --n sizes, with "
              "and without thumbnails")] = False,
          storage_images: Annotated[Path | None, typer.Option(
              "--storage-images", help="--storage: make the thumbnails from these images (default: synthetic)")
          ] = None,
          load: Annotated[bool, typer.Option(
              "--load", help="repeat the in-process engines' rows (and the serve rows) while a second process "
              "keeps one core busy; every row says load true/false")] = False,
          large_n: Annotated[str, typer.Option(
              "--large-n", help="further sizes built as arrays and run through the in-process engines only "
              "(cbir-memory, NumPy, FAISS), e.g. 1000000")] = "",
          serve_queries: Annotated[int, typer.Option(
              "--serve-queries", min=0, help="pipeline: queries per client against a `cbir serve` process, "
              "1 and 2 parallel clients (0: skip)")] = 40,
          ) -> None:
    """Time the query path against the alternatives in one run (Qdrant Edge exact/HNSW/prefilters, local mode,
    NumPy, FAISS, cbir's in-memory searcher) and the model pipeline; prints a table, writes JSON. --storage
    measures what thumbnails cost instead."""
    from cbir.bench.data import from_index as data_from_index
    from cbir.bench.data import synthetic, synthetic_arrays
    from cbir.bench.pipeline import bench_pipeline
    from cbir.bench.run import bench_vectors, markdown, to_json
    reporter = make_reporter()
    rows: list[Any] = []
    batch_rows: list[Any] = []
    try:
        sizes = [int(x) for x in n.split(",") if x.strip()]
        large = [int(x) for x in large_n.split(",") if x.strip()]
        prefilters = [int(x) for x in prefilter.split(",") if x.strip()]
    except ValueError:
        raise CbirError(f"--n {n!r} / --large-n {large_n!r} / --prefilter {prefilter!r}: give whole numbers like "
                        "10000,100000") from None
    if not prefilters or min(prefilters) < 10:
        raise CbirError(f"--prefilter {prefilter!r}: give one or more N of at least 10, like 1000,4000")
    if storage:
        _bench_storage(sizes, dim, bits, storage_images, json_out, markdown_out)
        return
    if from_index:
        chosen = settings(ctx, index)
        with open_index(chosen) as idx:
            datasets = [data_from_index(idx, collection or chosen.collection, queries)]
    else:
        datasets = [synthetic(size, dim, bits, queries) for size in sizes]
    for data in datasets:
        reporter.log(f"{len(data):,} points ({data.source})")
        rows += bench_vectors(data, prefilter=prefilters, radius=radius, hnsw=hnsw, reporter=reporter, load=load,
                              batch_rows=batch_rows)
    for size in large:
        data = synthetic_arrays(size, dim, bits, queries)
        reporter.log(f"{size:,} points ({data.source}; in-process engines only)")
        rows += bench_vectors(data, prefilter=prefilters, radius=radius, reporter=reporter, load=load,
                              in_process_only=True, batch_rows=batch_rows)
        del data
    model_side = (bench_pipeline(backbone, image_size, n_images=pipeline_images, source_size=source_size,
                                 serve_queries=serve_queries, load=load, reporter=reporter) if pipeline else None)
    result = to_json(rows, model_side, {"n": n, "large_n": large_n, "dim": dim, "bits": bits, "queries": queries,
                                        "prefilter": prefilters, "radius": radius, "from_index": from_index,
                                        "load": load}, batch_rows)
    table = Table(title="cbir bench")
    columns = ("engine", "method", "n", "filter", "load", "p50_ms", "p99_ms", "vs_memory", "recall_at_10",
               "ingest_points_per_s", "build_s", "queries", "copied")
    for column in columns:
        table.add_column(column, justify="left" if column in ("engine", "method", "filter") else "right")
    for row in result["rows"]:
        table.add_row(*("" if row.get(c) is None else f"{row[c]:,}" if isinstance(row[c], int)
                        and not isinstance(row[c], bool) else str(row[c]) for c in columns))
    out.print(table, width=max(out.width, 150))
    if model_side:
        for row in model_side["decodes"]:
            out.print(f"pipeline ({model_side['backbone']} at {model_side['image_size']} px, decode {row['decode']}): "
                      f"{row['images_per_s']} images/s with decoding vs {model_side['bare_forward_images_per_s']} "
                      f"bare forward ({100 * row['pipeline_fraction_of_bare']:.0f} %); warm query "
                      f"{row['warm_query_ms']} ms p50", markup=False)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        out.print(f"wrote {json_out}", markup=False)
    if markdown_out is not None:
        markdown_out.write_text(markdown(result))
        out.print(f"wrote {markdown_out}", markup=False)


def _bench_storage(sizes: list[int], dim: int, bits: int, images: Path | None, json_out: Path | None,
                   markdown_out: Path | None) -> None:
    from cbir.bench.run import machine
    from cbir.bench.storage import bench_storage, storage_markdown, storage_pictures
    if images is not None and not images.is_dir():
        raise CbirError(f"{images}: --storage-images must be a folder of images")
    reporter = make_reporter()
    try:
        pictures, source = storage_pictures(images, reporter)
    except ValueError as exc:
        raise CbirError(str(exc)) from None
    rows = bench_storage(sizes, dim, bits, pictures, reporter)
    text = storage_markdown(rows, source)
    out.print(text, markup=False)
    if json_out is not None:
        json_out.write_text(json.dumps({"storage": rows, "thumbnails_from": source, "machine": machine()}, indent=2)
                            + "\n")
        out.print(f"wrote {json_out}", markup=False)
    if markdown_out is not None:
        markdown_out.write_text(text)
        out.print(f"wrote {markdown_out}", markup=False)
