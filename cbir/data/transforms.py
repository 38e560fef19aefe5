"""Model input geometry and intensity: pure functions on grey float32 images in [0, 1]."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Geometry:
    """How an original (H, W) image maps onto the S×S model input: x_in = x_orig * scale + pad_x."""

    height: int
    width: int
    size: int
    scale: float
    pad_x: float
    pad_y: float

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """[x, y, w, h] boxes in original pixels → model-input pixels."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
        boxes[:, :2] = boxes[:, :2] * self.scale + (self.pad_x, self.pad_y)
        boxes[:, 2:] *= self.scale
        return boxes

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Model-input [x, y, w, h] boxes → original pixels."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
        boxes[:, :2] = (boxes[:, :2] - (self.pad_x, self.pad_y)) / self.scale
        boxes[:, 2:] /= self.scale
        return boxes


def letterbox(pixels: np.ndarray, size: int, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, Geometry]:
    """Resize the longer side to `size` (antialiased) and centre-pad to a square with black. `shape`: the
    stored image's (height, width) when `pixels` were decoded smaller; the geometry is then that image's."""
    height, width = shape or pixels.shape
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
                         .resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=2.0))
    out = np.zeros((size, size), dtype=np.float32)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    out[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = np.clip(resized, 0.0, 1.0)
    return out, Geometry(height, width, size, scale, float(pad_x), float(pad_y))


def standardize(batch: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean and unit variance, so exposure differences between archives cancel out."""
    flat = batch.flatten(1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1).clamp_min(1e-3).view(-1, 1, 1, 1)
    return (batch - mean) / std


def augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Small random affine (±7°, ±6 % shift, 0.9–1.1 scale) and gamma/contrast jitter, per image."""
    n = batch.shape[0]
    rand = torch.rand(n, 6, generator=generator, device=batch.device) * 2 - 1
    angle = rand[:, 0] * (7 * np.pi / 180)
    scale = 1 + rand[:, 1] * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, rand[:, 2] * 0.06], 1),
                         torch.stack([sin, cos, rand[:, 3] * 0.06], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(batch.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(batch, grid, align_corners=False, padding_mode="zeros")
    gamma = torch.exp(rand[:, 4] * 0.25).view(-1, 1, 1, 1)
    out = out.clamp(0, 1) ** gamma
    contrast = (1 + rand[:, 5] * 0.15).view(-1, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean).clamp(0, 1)


def augment_strong(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """What real queries bring, per image: `augment`'s affine, gamma and contrast with a wider zoom (±10 %),
    then a random window (the lowest/highest 0–8 % of the range clipped and stretched), a resolution change
    (down to 50–100 % and back), Gaussian blur (σ 0–1.2 px, half the images), detector noise (σ 0–0.03) and,
    for half the images, JPEG re-encoding at quality 40–95."""
    out = augment(batch, generator)
    n, _, h, w = out.shape
    rand = torch.rand(n, 8, generator=generator)
    low, high = rand[:, 0] * 0.08, 1 - rand[:, 1] * 0.08
    out = ((out - low.view(-1, 1, 1, 1)) / (high - low).view(-1, 1, 1, 1)).clamp(0, 1)
    images = []
    for i in range(n):
        img = out[i:i + 1]
        factor = 0.5 + 0.5 * float(rand[i, 2])
        if factor < 0.95:
            small = F.interpolate(img, size=(max(8, round(h * factor)), max(8, round(w * factor))),
                                  mode="bilinear", align_corners=False, antialias=True)
            img = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        if rand[i, 3] < 0.5:
            img = gaussian_blur(img, 0.1 + 1.1 * float(rand[i, 4]))
        img = img + torch.randn(img.shape, generator=generator) * 0.03 * float(rand[i, 5])
        if rand[i, 6] < 0.5:
            img = _jpeg(img.clamp(0, 1), 40 + int(55 * float(rand[i, 7])))
        images.append(img.clamp(0, 1))
    return torch.cat(images)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (…, H, W) images with standard deviation `sigma` pixels (kernel ±3σ, reflected edges)."""
    from torchvision.transforms.functional import gaussian_blur as blur
    kernel = 2 * math.ceil(3 * sigma) + 1
    return blur(img, [kernel, kernel], [sigma, sigma])


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """(1, 1, H, W) in [0, 1] through an 8-bit JPEG at `quality` and back."""
    buf = io.BytesIO()
    Image.fromarray((img[0, 0].numpy() * 255).round().astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0
    return torch.from_numpy(back)[None, None]


def augment_with_boxes(x: torch.Tensor, boxes: list[torch.Tensor], generator: torch.Generator
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random horizontal flip (boxes follow) and gamma/contrast jitter of a (B, 1, S, S) batch in [0, 1]."""
    n, size = x.shape[0], x.shape[-1]
    rand = torch.rand(n, 3, generator=generator)
    flip = rand[:, 0] < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    out = []
    for b, f in zip(boxes, flip.tolist(), strict=True):
        out.append(torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], dim=1) if f and len(b) else b)
    gamma = torch.exp((rand[:, 1] * 2 - 1) * 0.25).view(-1, 1, 1, 1)
    x = x.clamp(0, 1) ** gamma
    contrast = (1 + (rand[:, 2] * 2 - 1) * 0.15).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean).clamp(0, 1), out


def no_augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The images as they are: with a frozen encoder, its features are then computed once per image (cached)."""
    return batch


AUGMENTATIONS = {"basic": augment, "strong": augment_strong, "none": no_augment}


def equalize(batch: torch.Tensor) -> torch.Tensor:
    """Global histogram equalisation of (B, 1, H, W) images: each pixel → the fraction of the image's non-zero
    pixels at or below it (its empirical CDF), in (0, 1]. Exact zeros (letterbox padding) are left out of the CDF
    and stay 0, so the padding does not dominate it."""
    flat = batch.flatten(1).float()
    valid = flat != 0
    n_valid = valid.sum(dim=1, keepdim=True)
    ordered = torch.sort(torch.where(valid, flat, torch.full_like(flat, -math.inf)), dim=1).values
    at_or_below = torch.searchsorted(ordered, flat.contiguous(), right=True) - (flat.shape[1] - n_valid)
    cdf = at_or_below.float() / n_valid.clamp_min(1).float()
    return torch.where(valid, cdf, torch.zeros_like(cdf)).view_as(batch)


def clahe(batch: torch.Tensor, tiles: int = 8, clip_limit: float = 2.0, bins: int = 256) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation of (B, 1, H, W) images in [0, 1], result in [0, 1].

    Each of `tiles`×`tiles` tiles gets its own equalising map from a `bins`-bin histogram whose bins are clipped
    at `clip_limit` times the tile's mean count, the excess spread evenly over all bins (so no map rises faster
    than (clip_limit + 1)/bins per bin); pixels take the bilinear blend of the maps of the four nearest tile
    centres. Exact zeros (letterbox padding) are left out of the histograms and stay 0.
    """
    b, _, h, w = batch.shape
    x = batch.float().clamp(0, 1).reshape(b, h, w)
    level = (x * (bins - 1)).round().long()
    valid = (x != 0).float()
    ty = torch.arange(h, device=x.device) * tiles // h
    tx = torch.arange(w, device=x.device) * tiles // w
    tile = (ty[:, None] * tiles + tx[None, :]).expand(b, h, w)
    counts = torch.zeros(b, tiles * tiles * bins, device=x.device)
    counts.scatter_add_(1, (tile * bins + level).reshape(b, -1), valid.reshape(b, -1))
    counts = counts.view(b, tiles * tiles, bins)
    total = counts.sum(dim=2, keepdim=True)
    clipped = counts.clamp(max=clip_limit * total / bins)
    clipped = clipped + (total - clipped.sum(dim=2, keepdim=True)) / bins
    ramp = torch.linspace(0, 1, bins, device=x.device).expand_as(clipped)
    maps = torch.where(total > 0, clipped.cumsum(dim=2) / total.clamp_min(1), ramp).reshape(b, -1)

    def neighbours(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) * tiles / size - 0.5
        low = pos.floor()
        weight = pos - low
        low = low.long()
        return low.clamp(0, n - 1), (low + 1).clamp(0, n - 1), weight

    y0, y1, wy = neighbours(tiles, h)
    x0, x1, wx = neighbours(tiles, w)
    levels = level.reshape(b, -1)

    def mapped(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        index = ((rows[:, None] * tiles + cols[None, :]).reshape(1, -1) * bins + levels)
        return maps.gather(1, index).view(b, h, w)

    wy, wx = wy[:, None], wx[None, :]
    out = ((1 - wy) * ((1 - wx) * mapped(y0, x0) + wx * mapped(y0, x1))
           + wy * ((1 - wx) * mapped(y1, x0) + wx * mapped(y1, x1)))
    return (out * valid).view_as(batch).to(batch.dtype)


#: How a CbirNet's input intensities are prepared (`ModelConfig.intensity`): name → (B, 1, H, W) → (B, 1, H, W).
INTENSITIES = {"standardize": standardize,
               "unit": lambda batch: batch,   # [0, 1] as read: a frozen encoder's contract normalises
               "equalize": lambda batch: standardize(equalize(batch)),
               "clahe": lambda batch: standardize(clahe(batch))}


def model_input(batch: torch.Tensor, intensity: str = "standardize") -> torch.Tensor:
    """The model input for a (B, 1, H, W) batch in [0, 1] (after any augmentation): `INTENSITIES[intensity]`."""
    try:
        prepare = INTENSITIES[intensity]
    except KeyError:
        raise ValueError(f"intensity must be one of {', '.join(INTENSITIES)}, not {intensity!r}") from None
    return prepare(batch)
