"""A montage PNG: the query, then its k nearest cases with rank, similarity, labels and boxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cbir.data.transforms import letterbox
from cbir.errors import BadInputError
from cbir.index.schema import archive_file
from cbir.io import read_image

TILE = 256
CAPTION = 44
COLS = 4
POSITIVE = (230, 80, 60)
NEGATIVE = (90, 190, 110)


def _tile(pixels: np.ndarray | None) -> tuple[Image.Image, float, float, float]:
    if pixels is None:
        return Image.new("RGB", (TILE, TILE), (40, 40, 40)), 1.0, 0.0, 0.0
    low, high = np.percentile(pixels, [1, 99])
    windowed = np.clip((pixels - low) / max(high - low, 1e-6), 0, 1)
    square, geo = letterbox(windowed, TILE)
    return Image.fromarray((square * 255).astype(np.uint8)).convert("RGB"), geo.scale, geo.pad_x, geo.pad_y


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def write_montage(result: dict[str, Any], query_pixels: np.ndarray, roots: dict[str, Any], out: Path) -> Path:
    """Draw `result` (the query JSON) to `out`; unreadable archive images become grey tiles."""
    neighbors = result["neighbors"]
    rows = 1 + (len(neighbors) + COLS - 1) // COLS
    header = 36
    canvas = Image.new("RGB", (COLS * TILE, header + rows * (TILE + CAPTION)), (15, 15, 15))
    draw = ImageDraw.Draw(canvas)
    small, big = _font(13), _font(16)
    pred, vote = result["prediction"], result["vote"]
    title = (f"model: P({pred.get('target')}) = {pred['probability']:.2f}   "
             f"kNN vote: {vote['label']} ({vote['fraction']:.0%} of {len(neighbors)})")
    draw.text((8, 10), _fit(draw, title, big, COLS * TILE - 16), fill=(255, 255, 255), font=big)
    query_lines = ["query", _demographics(result.get("query") or {})]
    predicted = [b["box"] for b in pred.get("boxes") or []]
    if predicted:
        query_lines[0] = f"query: {len(predicted)} predicted box{'es' if len(predicted) > 1 else ''}"
    _paste(canvas, draw, _tile(query_pixels), 0, header, query_lines, small, None, predicted)
    for i, hit in enumerate(neighbors):
        col, row = i % COLS, 1 + i // COLS
        pixels = _neighbor_pixels(hit, roots)
        labels = ", ".join(hit.get("labels") or []) or "-"
        hamming = f"  H={hit['hamming']}" if hit.get("hamming") is not None else ""
        lines = [f"#{hit['rank']}  sim {hit['score']:.3f}{hamming}  {_demographics(hit)}", labels]
        colour = POSITIVE if hit.get("label") == pred.get("target") else NEGATIVE
        _paste(canvas, draw, _tile(pixels), col * TILE, header + row * (TILE + CAPTION), lines, small, colour,
               hit.get("boxes") or [])
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def _demographics(entry: dict[str, Any]) -> str:
    """View, sex and age band only: file names can carry identifiers, so they are never drawn."""
    parts = [entry.get("view"), entry.get("sex"), entry.get("age_band")]
    return " · ".join(str(p) for p in parts if p) or "no header data"


def _neighbor_pixels(hit: dict[str, Any], roots: dict[str, Any]) -> np.ndarray | None:
    path = archive_file({"roots": roots}, hit.get("dataset"), hit.get("path"))
    if path is None:
        return None
    try:
        return read_image(path).pixels
    except BadInputError:
        return None


def _paste(canvas: Image.Image, draw: ImageDraw.ImageDraw, tile: tuple[Image.Image, float, float, float],
           x: int, y: int, lines: list[str], font: ImageFont.ImageFont, colour: tuple[int, int, int] | None,
           boxes: list) -> None:
    image, scale, pad_x, pad_y = tile
    canvas.paste(image, (x, y))
    for bx, by, bw, bh in boxes:
        x0, y0 = x + bx * scale + pad_x, y + by * scale + pad_y
        draw.rectangle([x0, y0, x0 + bw * scale, y0 + bh * scale], outline=(255, 200, 0), width=2)
    if colour is not None:
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], outline=colour, width=3)
    for j, line in enumerate(lines):
        draw.text((x + 6, y + TILE + 4 + j * 18), _fit(draw, line, font, TILE - 12),
                  fill=colour or (230, 230, 230), font=font)


def windowed_png(pixels: np.ndarray, size: int, boxes: list | None = None,
                 colour: tuple[int, int, int] = POSITIVE) -> bytes:
    """The image with the montage's grey windowing (1st–99th percentile), letterboxed to size×size, with
    `boxes` ([x, y, w, h] in the image's pixels) drawn, as PNG bytes with no metadata."""
    import io
    low, high = np.percentile(pixels, [1, 99])
    windowed = np.clip((pixels - low) / max(high - low, 1e-6), 0, 1)
    square, geo = letterbox(windowed, size)
    picture = Image.fromarray((square * 255).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for x, y, w, h in boxes or []:
        x0, y0 = geo.pad_x + x * geo.scale, geo.pad_y + y * geo.scale
        draw.rectangle([x0, y0, x0 + w * geo.scale, y0 + h * geo.scale], outline=colour, width=max(2, size // 128))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
