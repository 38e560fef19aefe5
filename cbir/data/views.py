"""The two views of self-supervised pretraining: which images (`PatientPairs`, MICLe-style patient positives) and
how they are distorted (`ssl_augment`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cbir.data.transforms import gaussian_blur


class PatientPairs:
    """For each image, the other images of its patient: the second view of an image is drawn from them with
    probability `p` (MICLe, Azizi et al. 2021; MedAug), else it is the same image (two augmentations of it).

    `patients`: one key per image; None (or "") means no key, so that image is only ever paired with itself.
    """

    def __init__(self, patients: Sequence[object | None]) -> None:
        keys = [None if k is None or k == "" else str(k) for k in patients]
        members: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key is not None:
                members.setdefault(key, []).append(i)
        self.n = len(keys)
        ids = {key: g for g, key in enumerate(members)}
        # group id per image: its patient's, or a fresh one (-1 - i) for an image without a key
        self.groups = torch.tensor([ids[k] if k is not None else -1 - i for i, k in enumerate(keys)],
                                   dtype=torch.long)
        self._others = [np.asarray([j for j in members[k] if j != i], dtype=np.int64) if k is not None
                        else np.zeros(0, dtype=np.int64) for i, k in enumerate(keys)]

    @property
    def images_with_partner(self) -> int:
        """How many images have another image of the same patient."""
        return sum(len(o) > 0 for o in self._others)

    def others(self, i: int) -> np.ndarray:
        return self._others[i]

    def partners(self, idx: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
        """Per index in `idx`: another image of its patient with probability `p` (when it has one), else itself."""
        draws = torch.rand(len(idx), generator=generator).tolist()
        picks = torch.rand(len(idx), generator=generator).tolist()
        out = []
        for i, draw, pick in zip(idx.tolist(), draws, picks, strict=True):
            others = self._others[i]
            out.append(int(others[min(int(pick * len(others)), len(others) - 1)]) if len(others) and draw < p
                       else i)
        return torch.tensor(out, dtype=torch.long)


def ssl_augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A strong view of (B, 1, S, S) images in [0, 1], per image: random resized crop (35–100 % of the area,
    aspect 3/4–4/3) with ±10° rotation, horizontal flip (half), gamma (×e^±0.4) and contrast (±30 %) jitter,
    Gaussian blur (half, σ 0.1–1.5 px at 224 px, scaled to S) and detector noise (σ 0–0.04)."""
    n, _, size, _ = batch.shape
    rand = torch.rand(n, 10, generator=generator)
    area = 0.35 + 0.65 * rand[:, 0]
    ratio = torch.exp((rand[:, 1] * 2 - 1) * math.log(4 / 3))
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (rand[:, 2] * 2 - 1) * (1 - sx)
    ty = (rand[:, 3] * 2 - 1) * (1 - sy)
    angle = (rand[:, 4] * 2 - 1) * (10 * math.pi / 180)
    flip = torch.where(rand[:, 5] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx * flip, -sin * sy, tx], 1),
                         torch.stack([sin * sx * flip, cos * sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch.float(), grid, align_corners=False, padding_mode="zeros").clamp(0, 1)
    out = out ** torch.exp((rand[:, 6] * 2 - 1) * 0.4).view(-1, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * (1 + (rand[:, 7] * 2 - 1) * 0.3).view(-1, 1, 1, 1) + mean).clamp(0, 1)
    blurred = []
    for i in range(n):
        img = out[i:i + 1]
        if rand[i, 8] < 0.5:
            img = gaussian_blur(img, max(0.05, (0.1 + 1.4 * float(rand[i, 9])) * size / 224))
        blurred.append(img)
    out = torch.cat(blurred)
    noise = torch.randn(out.shape, generator=generator) * (0.04 * torch.rand(n, 1, 1, 1, generator=generator))
    return (out + noise).clamp(0, 1)
