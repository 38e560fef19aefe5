"""The model side of `cbir bench`, memory order and batch: images/s of a no-gradient forward pass and of a
training step (the default recipe's trainable groups), with the convolution weights contiguous (NCHW) or
channels-last (`cbir.models.device.place`), side by side in one run, interleaved so a shared machine's load
falls on every row alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cbir.console import QUIET, Reporter

ORDERS = {"contiguous (NCHW)": torch.contiguous_format, "channels-last": torch.channels_last}


def bench_layouts(backbone: str, image_size: int, inference_batches: Sequence[int] = (16, 64, 128),
                  train_batch: int = 32, images: int = 128, rounds: int = 3, reporter: Reporter = QUIET
                  ) -> list[dict[str, Any]]:
    """One row per (pass, memory order, batch): median images/s over `rounds`, and for channels-last the largest
    difference of its outputs from the contiguous model's (the same weights)."""
    from cbir.models import ModelConfig, create_model
    from cbir.train.settings import TrainSettings
    from cbir.train.transfer import hold_frozen, set_trainable

    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone=backbone, image_size=image_size, embed_dim=128, bits=64))
    recipe = TrainSettings()
    pixels = torch.rand(images, 1, image_size, image_size)
    with torch.inference_mode():
        reference = model.eval()(pixels[:8]).embedding

    def inference(batch: int) -> Callable[[], float]:
        def run() -> float:
            model.eval()
            with torch.inference_mode():
                started = time.perf_counter()
                for start in range(0, images, batch):
                    model(pixels[start:start + batch])
                return images / (time.perf_counter() - started)
        return run

    def training() -> float:
        set_trainable(model, recipe.unfreeze)
        model.train()
        hold_frozen(model, recipe.unfreeze, recipe.freeze_bn)
        started = time.perf_counter()
        for start in range(0, images, train_batch):
            model(pixels[start:start + train_batch]).logits.sum().backward()
        model.zero_grad(set_to_none=True)
        return images / (time.perf_counter() - started)

    cases = [("inference", b, inference(b)) for b in inference_batches] + [("training step", train_batch, training)]
    speeds: dict[tuple[str, str, int], list[float]] = {}
    differences: dict[str, float] = {}
    for round_ in range(rounds + 1):   # round 0 warms up each case and is not kept
        for order_name, order in ORDERS.items():
            model.to(memory_format=order)
            if round_ == 0:
                with torch.inference_mode():
                    differences[order_name] = float((model.eval()(pixels[:8]).embedding - reference).abs().max())
            for name, batch, run in cases:
                rate = run()
                if round_:
                    speeds.setdefault((name, order_name, batch), []).append(rate)
    rows = [{"pass": name, "memory": order_name, "batch": batch, "images_per_s": round(float(np.median(v)), 1),
             "max_output_difference": differences[order_name]} for (name, order_name, batch), v in speeds.items()]
    for row in rows:
        reporter.log(f"  memory order: {row['pass']}, {row['memory']}, batch {row['batch']}: "
                     f"{row['images_per_s']} images/s")
    return rows


def layouts_markdown(rows: list[dict[str, Any]], backbone: str, image_size: int, rounds: int) -> list[str]:
    """The rows as a Markdown table, each beside the contiguous row of the same pass and batch."""
    base = {(r["pass"], r["batch"]): r["images_per_s"] for r in rows if r["memory"] == "contiguous (NCHW)"}
    lines = ["", f"Memory order and batch ({backbone} at {image_size} px, random weights; interleaved, median of "
                 f"{rounds} rounds; the training step trains `cbir train`'s default groups):", "",
             "| pass | memory order | batch | images/s | × contiguous | largest output difference |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['pass']} | {r['memory']} | {r['batch']} | {r['images_per_s']} | "
              f"{r['images_per_s'] / base[(r['pass'], r['batch'])]:.2f}× | {r['max_output_difference']:.1e} |"
              for r in rows]
    return lines
