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


def letterbox(pixels: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    """Resize the longer side to `size` (antialiased) and centre-pad to a square with black."""
    height, width = pixels.shape
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


AUGMENTATIONS = {"basic": augment, "strong": augment_strong}
