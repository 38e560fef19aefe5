"""A montage PNG: the query, then its k nearest cases with rank, similarity, labels and boxes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cbir.data.transforms import letterbox
from cbir.io.thumbnails import windowed
from cbir.search.query import describe_vote

#: Pillow's default font: a FreeType font, or the bitmap one before Pillow 10.1
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

if TYPE_CHECKING:
    from cbir.search.pictures import Picture

TILE = 256
CAPTION = 44
#: One colour per finding, the same in every montage (the 14 NIH findings, then RSNA's and the negatives).
FINDING_COLOURS = {
    "Atelectasis": (230, 25, 75), "Cardiomegaly": (60, 180, 75), "Consolidation": (255, 225, 25),
    "Edema": (67, 99, 216), "Effusion": (245, 130, 49), "Emphysema": (145, 30, 180), "Fibrosis": (70, 240, 240),
    "Hernia": (240, 50, 230), "Infiltration": (188, 246, 12), "Mass": (250, 190, 190), "Nodule": (0, 168, 168),
    "Pleural_Thickening": (230, 190, 255), "Pneumonia": (255, 99, 71), "Pneumothorax": (255, 250, 200),
    "No Pneumonia": (140, 200, 140), "No Finding": (140, 200, 140), "NORMAL": (140, 200, 140),
    "PNEUMONIA": (255, 99, 71),
}
COLS = 4
POSITIVE = (230, 80, 60)
NEGATIVE = (90, 190, 110)
UNKNOWN = (150, 150, 150)  # a neighbour whose label is unknown


def _tile(pixels: np.ndarray | None) -> tuple[Image.Image, float, float, float]:
    if pixels is None:
        return Image.new("RGB", (TILE, TILE), (40, 40, 40)), 1.0, 0.0, 0.0
    square, geo = letterbox(windowed(pixels), TILE)
    return Image.fromarray((square * 255).astype(np.uint8)).convert("RGB"), geo.scale, geo.pad_x, geo.pad_y


def finding_colour(name: str) -> tuple[int, int, int]:
    """The finding's colour (`FINDING_COLOURS`, else a stable colour derived from the name)."""
    if name in FINDING_COLOURS:
        return FINDING_COLOURS[name]
    import hashlib
    digest = hashlib.sha256(name.encode()).digest()
    return (96 + digest[0] % 160, 96 + digest[1] % 160, 96 + digest[2] % 160)


def _draw_labels(draw: ImageDraw.ImageDraw, x: int, y: int, labels: list[str], font: Font,
                 width: int) -> None:
    """Each label in its finding's colour, left to right; what does not fit becomes "+N"."""
    cursor: float = x
    for i, label in enumerate(labels):
        rest = f" +{len(labels) - i}"
        text = label + (", " if i < len(labels) - 1 else "")
        room = x + width - cursor - (draw.textlength(rest, font=font) if i < len(labels) - 1 else 0)
        if draw.textlength(text, font=font) > room:
            fitted = _fit(draw, label, font, int(x + width - cursor - draw.textlength(rest, font=font)))
            if fitted:
                draw.text((cursor, y), fitted, fill=finding_colour(label), font=font)
                cursor += draw.textlength(fitted, font=font)
            if len(labels) - i - (1 if fitted else 0) > 0:
                draw.text((cursor, y), f" +{len(labels) - i - (1 if fitted else 0)}", fill=(200, 200, 200), font=font)
            return
        draw.text((cursor, y), text, fill=finding_colour(label), font=font)
        cursor += draw.textlength(text, font=font)


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def write_montage(result: dict[str, Any], query_pixels: np.ndarray, pictures: Sequence[Picture | None],
                  out: Path) -> Path:
    """Draw `result` (the query JSON) to `out`, each neighbour as its picture (`cbir.search.pictures`, one per
    neighbour); a neighbour without one becomes a grey tile."""
    neighbors = result["neighbors"]
    rows = 1 + (len(neighbors) + COLS - 1) // COLS
    header = 36
    canvas = Image.new("RGB", (COLS * TILE, header + rows * (TILE + CAPTION)), (15, 15, 15))
    draw = ImageDraw.Draw(canvas)
    small, big = _font(13), _font(16)
    pred, vote = result["prediction"], result["vote"]
    how = "" if pred.get("calibrated", True) else " (raw score)"
    title = (f"model: P({pred.get('target')}) = {pred['probability']:.2f}{how}, says {pred.get('label')}   "
             f"kNN vote: {describe_vote(vote, len(neighbors))}")
    draw.text((8, 10), _fit(draw, title, big, COLS * TILE - 16), fill=(255, 255, 255), font=big)
    query = result.get("query") or {}
    query_lines = [f"query: {query['label']} (its own label)" if query.get("label") else "query", _demographics(query)]
    predicted = [b["box"] for b in pred.get("boxes") or []]
    if predicted:
        query_lines[0] = f"query: {len(predicted)} predicted box{'es' if len(predicted) > 1 else ''}"
    _paste(canvas, draw, _tile(query_pixels), 0, header, query_lines, small, None, predicted)
    for i, (hit, picture) in enumerate(zip(neighbors, pictures, strict=True)):
        col, row = i % COLS, 1 + i // COLS
        hamming = f"  H={hit['hamming']}" if hit.get("hamming") is not None else ""
        own = "  SELF (not in the vote)" if hit.get("self_match") and not vote.get("included_self") else ""
        lines = [f"#{hit['rank']}  sim {hit['score']:.3f}{hamming}{own}  {_demographics(hit)}"]
        known = hit.get("target") in (0, 1)     # the stored binary target, never a label string compared
        colour = (POSITIVE if hit.get("target") == 1 else NEGATIVE) if known else UNKNOWN
        labels = list(hit.get("labels") or ["-" if known else "unknown"])
        x, y = col * TILE, header + row * (TILE + CAPTION)
        _paste(canvas, draw, _tile(picture.pixels if picture else None), x, y, lines, small, colour,
               picture.boxes if picture else [], finding_colour(labels[0]))
        _draw_labels(draw, x + 6, y + TILE + 4 + 18, labels, small, TILE - 12)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def _demographics(entry: dict[str, Any]) -> str:
    """View, sex and age band only: file names can carry identifiers, so they are never drawn."""
    parts = [entry.get("view"), entry.get("sex"), entry.get("age_band")]
    return " · ".join(str(p) for p in parts if p) or "no header data"


def _paste(canvas: Image.Image, draw: ImageDraw.ImageDraw, tile: tuple[Image.Image, float, float, float],
           x: int, y: int, lines: list[str], font: Font, colour: tuple[int, int, int] | None,
           boxes: list, box_colour: tuple[int, int, int] = (255, 200, 0)) -> None:
    image, scale, pad_x, pad_y = tile
    canvas.paste(image, (x, y))
    for bx, by, bw, bh in boxes:
        x0, y0 = x + bx * scale + pad_x, y + by * scale + pad_y
        draw.rectangle([x0, y0, x0 + bw * scale, y0 + bh * scale], outline=box_colour, width=2)
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
    square, geo = letterbox(windowed(pixels), size)
    picture = Image.fromarray((square * 255).astype(np.uint8))
    if boxes:
        picture = picture.convert("RGB")
    draw = ImageDraw.Draw(picture)
    for x, y, w, h in boxes or []:
        x0, y0 = geo.pad_x + x * geo.scale, geo.pad_y + y * geo.scale
        draw.rectangle([x0, y0, x0 + w * geo.scale, y0 + h * geo.scale], outline=colour, width=max(2, size // 128))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)  # fast to write; a thumbnail is sent once
    return buffer.getvalue()
