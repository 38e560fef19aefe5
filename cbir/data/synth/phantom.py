"""Chest X-ray phantoms: an anatomical density map, findings drawn into it, then a detector model.

Everything is vectorised numpy on float32 grids. Anatomy is described in *body coordinates*: x to the
viewer's right, y down, the chest centred at 0 and roughly ±0.5 across the image; the patient's left
(heart apex, gastric bubble) is on the viewer's right as on a PA film. A per-image pose (shift, scale,
a few degrees of rotation) maps body coordinates onto the image. The density map ``A`` is ~0 for air,
~1 for the soft tissue of the trunk, lower over the lungs, higher over bone; the detector maps it to
[0, 1] with a per-image window, gamma, blur and noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

SIDES = (-1, 1)  # -1: viewer's left (patient's right lung), +1: viewer's right (patient's left lung)
Box = tuple[float, float, float, float]  # x, y, width, height as fractions of the image side


@dataclass(frozen=True)
class Anatomy:
    """One patient's anatomy (shape) plus the pose and exposure of one image of it."""

    sex: str = "M"
    ap: bool = False
    body_w: float = 0.44  # half-width of the trunk
    lat: float = 0.37  # lateral lung wall, distance from the midline
    apex: float = -0.37  # lung apices
    dome: tuple[float, float] = (0.22, 0.25)  # dome tops (viewer's left, viewer's right)
    dome_h: float = 0.09  # drop of each dome towards the costophrenic angle
    heart: tuple[float, float, float, float] = (0.0, 0.0, 0.22, 0.11)  # shift, top, left and right extent
    rib_top: float = -0.42
    rib_step: float = 0.071
    lung_depth: float = 0.7  # how much air lowers the density in mid-lung
    marking_amp: float = 0.22
    texture_seed: int = 0  # vessel pattern and other patient-fixed textures
    # pose and exposure of this image
    shift: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    rot: float = 0.0
    black: float = 0.2
    white: float = 1.0
    gamma: float = 1.0
    noise: float = 0.02
    blur: float = 0.6  # detector blur in pixels at 256 px
    leads: int = 0  # ECG electrodes (bedside films)


def sample_anatomy(rng: np.random.Generator, sex: str = "M", age: float = 50.0) -> Anatomy:
    """A random patient: body habitus, lung and heart size, rib spacing, vessel texture."""
    size = rng.normal(0.0, 1.0)
    child = float(np.clip((18.0 - age) / 18.0, 0.0, 1.0))
    heart_w = math.exp(rng.normal(0.0, 0.07)) * (1.0 + 0.1 * child)
    dome = 0.23 + rng.normal(0.0, 0.02)
    return Anatomy(
        sex=sex,
        body_w=float(np.clip(0.44 + 0.015 * size + (0.01 if sex == "M" else -0.01), 0.40, 0.49)),
        lat=float(np.clip(0.37 + 0.012 * size + rng.normal(0.0, 0.008), 0.33, 0.41)),
        apex=float(-0.37 + rng.normal(0.0, 0.012)),
        dome=(float(dome - 0.02 + rng.normal(0.0, 0.01)), float(dome + 0.015 + rng.normal(0.0, 0.01))),
        dome_h=float(np.clip(0.09 + rng.normal(0.0, 0.012), 0.05, 0.13)),
        heart=(float(rng.normal(0.0, 0.01)), float(rng.normal(0.0, 0.015)), float(0.22 * heart_w),
               float(0.11 * heart_w * math.exp(rng.normal(0.0, 0.06)))),
        rib_top=float(-0.42 + rng.normal(0.0, 0.01)),
        rib_step=float(0.071 * math.exp(rng.normal(0.0, 0.04))),
        lung_depth=float(0.7 * math.exp(rng.normal(0.0, 0.06))),
        marking_amp=float(0.22 * math.exp(rng.normal(0.0, 0.15))),
        texture_seed=int(rng.integers(2**31)),
    )


def sample_pose(anatomy: Anatomy, rng: np.random.Generator, ap: bool = False) -> Anatomy:
    """The patient on one film: position, a few degrees of rotation, exposure, gamma and noise.

    AP (bedside, supine) films magnify the heart, show higher domes, more rotation and noise, and
    often ECG electrodes.
    """
    shift, top, left, right = anatomy.heart
    if ap:
        anatomy = replace(anatomy, heart=(shift, top - 0.01, left * 1.08, right * 1.08),
                          dome=(anatomy.dome[0] - 0.035, anatomy.dome[1] - 0.035))
    return replace(
        anatomy,
        ap=ap,
        shift=(float(rng.normal(0.0, 0.015)), float(rng.normal(0.0, 0.015))),
        scale=float(np.clip(rng.normal(1.0, 0.035), 0.92, 1.08)),
        rot=float(np.deg2rad(rng.normal(0.0, 2.5 if ap else 1.5))),
        black=float(rng.uniform(0.06, 0.2)),
        white=float(rng.uniform(1.04, 1.16) + (0.04 if ap else 0.0)),
        gamma=float(math.exp(rng.normal(0.0, 0.15))),
        noise=float(rng.uniform(0.012, 0.03) * (1.4 if ap else 1.0)),
        blur=float(rng.uniform(0.4, 1.0) * (1.3 if ap else 1.0)),
        leads=int(rng.integers(2, 5)) if ap and rng.random() < 0.7 else 0,
    )


# ---------------------------------------------------------------- small vectorised helpers


def _soft(d: np.ndarray, eps: float) -> np.ndarray:
    """0 → 1 ramp of width `eps` centred on d = 0 (d > 0 inside)."""
    return np.clip(0.5 + d / (2.0 * eps), 0.0, 1.0)


@lru_cache(maxsize=64)
def _resample_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) linear-interpolation weights between cell-centred grids."""
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0.0, src - 1.0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = (pos - lo).astype(np.float32)
    mat = np.zeros((dst, src), dtype=np.float32)
    mat[np.arange(dst), lo] += 1.0 - frac
    mat[np.arange(dst), hi] += frac
    return mat


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (sigma in pixels, edges extended) as sums of shifted copies."""
    if sigma < 0.3:
        return img
    radius = max(1, math.ceil(2.5 * sigma))
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    weights = (weights / weights.sum()).astype(np.float32)
    h, w = img.shape
    padded = np.pad(img, radius, mode="edge")
    rows = sum(wt * padded[i:i + h] for i, wt in enumerate(weights))
    return sum(wt * rows[:, i:i + w] for i, wt in enumerate(weights))


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-variance noise with about `cells` blobs across; the same field at any `size`."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    grid = blur(grid, 0.8)
    m = _resample_matrix(cells, size)
    field = m @ grid @ m.T
    return (field - field.mean()) / (field.std() + 1e-6)


def _bilinear_wrap(grid: np.ndarray, r: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Sample `grid[r, t]` bilinearly at fractional indices, clamped in r and periodic in t."""
    nr, nt = grid.shape
    r = np.clip(r, 0.0, nr - 1.001)
    r0 = r.astype(np.int32)
    fr = r - r0
    t0f = np.floor(t)
    ft = t - t0f
    t0 = t0f.astype(np.int32) % nt
    t1 = (t0 + 1) % nt
    top = grid[r0, t0] * (1 - ft) + grid[r0, t1] * ft
    bot = grid[r0 + 1, t0] * (1 - ft) + grid[r0 + 1, t1] * ft
    return top * (1 - fr) + bot * fr


# ---------------------------------------------------------------- the canvas


@dataclass
class Canvas:
    """Grids, anatomical masks and the density being built for one image."""

    anatomy: Anatomy
    size: int
    u: np.ndarray  # image x in [0, 1]
    v: np.ndarray  # image y in [0, 1]
    x: np.ndarray  # body x
    y: np.ndarray  # body y
    density: np.ndarray
    lung: dict[int, np.ndarray] = field(default_factory=dict)
    heart: np.ndarray | None = None
    body: np.ndarray | None = None
    markings: np.ndarray | None = None  # multiplier on the vessel markings (1 = normal, 0 = none)

    @property
    def px(self) -> float:
        """One pixel in body units."""
        return 1.0 / (self.size * self.anatomy.scale)

    @property
    def lungs(self) -> np.ndarray:
        return np.maximum(self.lung[-1], self.lung[1])

    def dome_y(self, side: int, xs: np.ndarray | float) -> np.ndarray:
        """Height of the hemidiaphragm of `side` at body x (lower = larger y)."""
        a = self.anatomy
        top = a.dome[0] if side < 0 else a.dome[1]
        rel = (side * np.asarray(xs) - 0.19) / (a.lat - 0.19)
        return top + a.dome_h * np.clip(rel, -0.6, 1.3) ** 2

    def lateral_x(self, y: np.ndarray | float) -> np.ndarray:
        """Distance of the lateral lung wall from the midline at height y (narrower towards the apex)."""
        a = self.anatomy
        t = np.clip((0.05 - np.asarray(y)) / (0.05 - a.apex), 0.0, 1.0)
        return a.lat - 0.09 * t**2.2

    def ellipse(self, cx: float, cy: float, a: float, b: float, rot: float = 0.0, soft: float = 1.5) -> np.ndarray:
        """Soft mask of an ellipse in body coordinates (edge `soft` pixels wide)."""
        c, s = math.cos(rot), math.sin(rot)
        dx, dy = self.x - cx, self.y - cy
        xr, yr = c * dx + s * dy, -s * dx + c * dy
        rho = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
        return _soft((1.0 - rho) * min(a, b), soft * self.px)

    def gauss(self, cx: float, cy: float, sx: float, sy: float | None = None) -> np.ndarray:
        sy = sx if sy is None else sy
        return np.exp(-0.5 * (((self.x - cx) / sx) ** 2 + ((self.y - cy) / sy) ** 2))


def _canvas(anatomy: Anatomy, size: int) -> Canvas:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = np.meshgrid(coords, coords)
    cx, cy = 0.5 + anatomy.shift[0], 0.47 + anatomy.shift[1]
    c, s = math.cos(anatomy.rot), math.sin(anatomy.rot)
    du, dv = (u - cx) / anatomy.scale, (v - cy) / anatomy.scale
    x, y = c * du + s * dv, -s * du + c * dv
    return Canvas(anatomy=anatomy, size=size, u=u, v=v, x=x.astype(np.float32), y=y.astype(np.float32),
                  density=np.zeros((size, size), dtype=np.float32))


# ---------------------------------------------------------------- anatomy


def _body(c: Canvas) -> None:
    """Soft-tissue trunk with sloping shoulders and neck; thicker in the middle."""
    a = c.anatomy
    ax = np.abs(c.x)
    half = a.body_w * (1.0 - 0.06 * np.clip((c.y + 0.05) / 0.45, -1.0, 1.0) ** 2)
    shoulder = -0.53 + 0.12 * np.clip(ax / a.body_w, 0, 1) ** 2
    trunk = _soft(half - ax, 2 * c.px) * _soft(c.y - shoulder, 3 * c.px)
    neck = _soft(0.11 + 0.1 * _soft(c.y + 0.45, 0.08) - ax, 3 * c.px)
    c.body = np.maximum(trunk, neck)
    thickness = 0.3 + 0.7 * np.sqrt(np.clip(1.0 - (c.x / half) ** 2, 0.0, 1.0))
    c.density += c.body * thickness
    if a.sex == "F":  # breast shadows over the lower zones
        for side in SIDES:
            m = c.ellipse(side * 0.24, 0.2, 0.19, 0.15, soft=6) * _soft(c.y - 0.14, 0.06)
            c.density += 0.09 * m


def _mediastinum(c: Canvas) -> np.ndarray:
    """Upper mediastinum with the aortic knob (mask, 1 inside)."""
    knob = 0.035 * np.exp(-0.5 * ((c.y + 0.1) / 0.035) ** 2) * (c.x > 0)
    half = 0.06 + knob + 0.05 * _soft(c.y - 0.02, 0.1)
    return _soft(half - np.abs(c.x - 0.005), 2 * c.px) * _soft(0.22 - c.y, 2 * c.px)


def _heart(c: Canvas) -> np.ndarray:
    """Cardiac silhouette: convex left ventricle sweeping out to the apex, right atrial bulge, on the dome."""
    shift, top, left, right = c.anatomy.heart
    base = c.anatomy.dome[1] + 0.02
    t = np.clip((c.y - top) / (base - top), 0.0, 1.0)
    left_x = shift + 0.05 + (left - 0.05) * np.sin(0.5 * np.pi * t) ** 0.8
    right_x = shift - 0.055 - (right - 0.055) * np.sin(0.75 * np.pi * t)
    dx = c.x - shift - 0.02
    crown = top + 0.6 * dx * dx  # the rounded upper border
    return _soft(left_x - c.x, 1.5 * c.px) * _soft(c.x - right_x, 1.5 * c.px) * _soft(c.y - crown, 2 * c.px)


def _lungs(c: Canvas) -> None:
    """Two lung fields: apex, lateral wall, diaphragm dome; minus mediastinum and heart."""
    a = c.anatomy
    c.heart = _heart(c)
    outside = (1.0 - _mediastinum(c)) * (1.0 - c.heart)
    for side in SIDES:
        us = side * c.x
        apex = a.apex + 0.16 * ((us - 0.2) / 0.2) ** 2
        inside = (_soft(c.y - apex, 1.5 * c.px) * _soft(c.lateral_x(c.y) - us, 1.5 * c.px)
                  * _soft(c.dome_y(side, c.x) - c.y, 1.5 * c.px) * _soft(us - 0.03, 1.5 * c.px))
        c.lung[side] = inside * outside
    c.markings = np.ones_like(c.density)


def _lung_air(c: Canvas) -> None:
    """Air in the lungs: darker in the middle of each field, grading towards its edges."""
    a = c.anatomy
    for side in SIDES:
        us = side * c.x
        core = (_soft(c.lateral_x(c.y) - us, 0.05) * _soft(c.dome_y(side, c.x) - c.y, 0.06)
                * _soft(c.y - a.apex, 0.12))
        c.density -= a.lung_depth * c.lung[side] * (0.55 + 0.45 * core)


def _heart_and_bones(c: Canvas) -> None:
    a = c.anatomy
    body = c.body if c.body is not None else 1.0
    below = np.maximum(_soft(c.y - c.dome_y(-1, c.x), 2 * c.px) * (c.x < 0),
                       _soft(c.y - c.dome_y(1, c.x), 2 * c.px) * (c.x >= 0))
    c.density += 0.16 * below * body  # liver and abdomen
    bubble = c.ellipse(0.2, a.dome[1] + a.dome_h * 0.1 + 0.06, 0.05, 0.03, soft=3)
    c.density -= 0.22 * bubble * body
    c.density += 0.12 * np.maximum(c.heart, _mediastinum(c)) if c.heart is not None else 0.0
    for side in SIDES:  # hila
        c.density += 0.2 * c.gauss(side * 0.1, -0.01, 0.028, 0.05) * body
    trachea = _soft(0.022 - np.abs(c.x), 2 * c.px) * _soft(-0.1 - c.y, 3 * c.px)
    c.density -= 0.18 * trachea
    spine = _soft(0.045 - np.abs(c.x), 2 * c.px)
    disc = np.cos(np.pi * (c.y - a.rib_top) / (a.rib_step * 0.95)) ** 12
    c.density += spine * (0.12 - 0.05 * disc) * body
    c.density += _ribs(c) * body
    c.density += _clavicles(c) * body


def _band(c: Canvas, d: np.ndarray, half: np.ndarray | float) -> np.ndarray:
    """Bone band of half-width `half` at signed distance `d` from its centre line: cortex brighter."""
    d = np.abs(d)
    inner = _soft(half - d, 1.2 * c.px)
    edge = np.clip(1.0 - ((d - 0.8 * half) / np.maximum(0.3 * half, c.px)) ** 2, 0.0, 1.0)
    return inner * (0.6 + 0.4 * edge)


def _ribs(c: Canvas) -> np.ndarray:
    """Ten posterior ribs arching out from the spine and down the lateral wall; six fainter anterior ribs.

    Each family is one periodic pattern: the phase along y picks the nearest rib, so all ribs cost a
    handful of array operations.
    """
    a = c.anatomy
    us = np.abs(c.x)
    s = (us - 0.04) / (a.lat - 0.02)
    jitter = np.random.default_rng(a.texture_seed + 2).normal(0.0, 0.004, size=(2, 10)).astype(np.float32)
    side = (c.x > 0).astype(np.intp)
    step = a.rib_step * (1.0 + 0.17 * s * s)  # lower ribs curve down more steeply
    phase = (c.y - a.rib_top + 0.05 * s - 0.2 * s * s) / step
    k = np.clip(np.rint(phase), 0, 9).astype(np.intp)
    out = 0.075 * _band(c, (phase - k) * step - jitter[side, k], 0.01 + 0.001 * k)
    phase = (c.y - a.rib_top - 0.03 - 0.15 * (1.0 - np.clip(s, 0.0, 1.0)) ** 1.3) / a.rib_step
    k = np.clip(np.rint(phase), 1, 6).astype(np.intp)
    anterior = _band(c, (phase - k) * a.rib_step - jitter[side, k], 0.012 + 0.0012 * k)
    out += 0.03 * anterior * _soft(s - 0.4, 0.1)
    reach = _soft(a.lat + 0.035 - us, 3 * c.px) * _soft(us - 0.035, 2 * c.px)
    below = 1.0 - 0.6 * _soft(c.y - np.maximum(c.dome_y(-1, c.x), c.dome_y(1, c.x)) - 0.02, 0.04)
    return out * reach * below


def _clavicles(c: Canvas) -> np.ndarray:
    a = c.anatomy
    us = np.abs(c.x)
    t = np.clip(us / 0.33, 0.0, 1.0)
    lift = 0.03 if a.ap else 0.0
    centre = a.apex + 0.035 - lift - 0.09 * t + 0.025 * np.sin(np.pi * t)
    reach = _soft(0.36 - us, 3 * c.px) * _soft(us - 0.03, 2 * c.px)
    scap = sum(c.ellipse(side * (a.lat - 0.02), -0.2, 0.07, 0.16, soft=4) for side in SIDES)
    return 0.24 * _band(c, c.y - centre, 0.017) * reach + (0.06 if a.ap else 0.03) * scap


def _extent(mask: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns where `mask` is non-zero (empty slices when it is all zero)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _vessel_markings(c: Canvas) -> np.ndarray:
    """Branching vessel shadows radiating from each hilum (zero-crossings of polar noise)."""
    a = c.anatomy
    rng = np.random.default_rng(a.texture_seed)
    out = np.zeros_like(c.density)
    for side in SIDES:
        box = _extent(c.lung[side] > 0.0)
        x, y, lung = c.x[box], c.y[box], c.lung[side][box]
        dx, dy = side * (x - side * 0.09), y + 0.02
        r = np.sqrt(dx * dx + dy * dy)
        theta = (np.arctan2(dy, dx) + np.pi) / (2 * np.pi)
        weight = np.exp(-r / 0.2) * _soft(r - 0.03, 0.03) * lung
        for n_theta, width, amp in ((80, 0.18, 1.0), (150, 0.12, 0.6)):
            grid = rng.standard_normal((7, n_theta)).astype(np.float32)
            grid = (grid + np.roll(grid, 1, axis=1)) * 0.7
            val = _bilinear_wrap(grid, r * (6 / 0.45), (theta + 0.05 * r) * n_theta)
            out[box] += amp * np.exp(-((val / width) ** 2)) * weight
    return out * a.marking_amp


def _leads(c: Canvas, rng: np.random.Generator) -> None:
    """ECG electrodes and a wire (bedside AP films)."""
    pts = []
    for _ in range(c.anatomy.leads):
        px, py = rng.uniform(-0.33, 0.33), rng.uniform(-0.35, 0.1)
        ring = c.ellipse(px, py, 0.022, 0.022, soft=1.5) - 0.6 * c.ellipse(px, py, 0.012, 0.012, soft=1.5)
        c.density += 0.5 * ring
        pts.append((px, py))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        d = np.abs((c.x - x0) * (y1 - y0) - (c.y - y0) * (x1 - x0)) / (math.hypot(x1 - x0, y1 - y0) + 1e-6)
        along = ((c.x - x0) * (x1 - x0) + (c.y - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2 + 1e-6)
        c.density += 0.25 * _soft(0.004 - d, c.px) * (along > 0) * (along < 1)


# ---------------------------------------------------------------- findings

Finding = Callable[[Canvas, np.random.Generator], None]


def _patchy(c: Canvas, rng: np.random.Generator, cells: int, threshold: float, softness: float) -> np.ndarray:
    """Patchy texture in [0, 1]: smooth noise above a soft threshold."""
    n = smooth_noise(rng, c.size, cells)
    return np.clip((n - threshold) / softness + 0.5, 0.0, 1.0)


def _zone(c: Canvas, rng: np.random.Generator, side: int, zone: str | None = None) -> tuple[float, float]:
    """A point inside one lung field, in body coordinates (zone: upper, mid, lower or any)."""
    zone = zone or str(rng.choice(["upper", "mid", "lower"], p=[0.25, 0.35, 0.4]))
    a = c.anatomy
    lo, hi = {"upper": (a.apex + 0.08, -0.12), "mid": (-0.12, 0.06), "lower": (0.06, a.dome[0] + 0.02)}[zone]
    y = rng.uniform(lo, hi)
    lat = float(c.lateral_x(y))
    x = side * rng.uniform(0.12, max(0.13, lat - 0.06))
    if side > 0 and y > 0.02:  # keep left-lower-zone lesions lateral of the heart
        x = max(x, a.heart[0] + a.heart[2] + 0.02)
    return float(x), float(y)


def _lung_weight(c: Canvas, floor: float = 0.25) -> np.ndarray:
    return floor + (1.0 - floor) * np.clip(c.lungs * 1.3, 0.0, 1.0)


def _air_fill(c: Canvas, mask: np.ndarray, amount: float) -> None:
    """Replace a fraction `amount` of the lung air under `mask` with fluid or tissue."""
    c.density += amount * c.anatomy.lung_depth * mask * _lung_weight(c)


def consolidation(c: Canvas, rng: np.random.Generator) -> None:
    """Dense, confluent opacity of part of a lobe, sharp along a fissure, with air bronchograms."""
    side = int(rng.choice(SIDES))
    x, y = _zone(c, rng, side, str(rng.choice(["mid", "lower"])))
    blob = c.gauss(x, y, rng.uniform(0.06, 0.1), rng.uniform(0.06, 0.09)) + 0.12 * smooth_noise(rng, c.size, 14)
    region = _soft(blob - 0.4, 0.2)
    fissure = _soft(c.y - (y - 0.04 + (side * c.x - abs(x)) * rng.uniform(-0.2, 0.2)), 1.5 * c.px)
    texture = 0.75 + 0.25 * _patchy(c, rng, 30, 0.0, 1.0)
    _air_fill(c, region * fissure * texture, rng.uniform(0.55, 0.85))
    if c.markings is not None:
        c.markings *= 1.0 - 0.7 * region


def pneumonia(c: Canvas, rng: np.random.Generator) -> None:
    """Soft, patchy airspace opacity, often multifocal."""
    for _ in range(int(rng.integers(1, 3))):
        side = int(rng.choice(SIDES))
        x, y = _zone(c, rng, side)
        region = c.gauss(x, y, rng.uniform(0.05, 0.09), rng.uniform(0.05, 0.1))
        _air_fill(c, region * _patchy(c, rng, 20, -0.2, 1.2), rng.uniform(0.4, 0.7))


def infiltration(c: Canvas, rng: np.random.Generator) -> None:
    """Ill-defined hazy, mottled opacity over a larger area, sometimes both sides."""
    sides = list(SIDES) if rng.random() < 0.35 else [int(rng.choice(SIDES))]
    for side in sides:
        x, y = _zone(c, rng, side)
        region = c.gauss(x, y, rng.uniform(0.08, 0.13), rng.uniform(0.09, 0.15))
        mottle = 0.5 + 0.5 * _patchy(c, rng, 48, 0.0, 1.6)
        _air_fill(c, region * mottle * c.lungs, rng.uniform(0.25, 0.45))


def edema(c: Canvas, rng: np.random.Generator) -> None:
    """Bilateral perihilar ('bat-wing') haze with basal septal lines."""
    amount = rng.uniform(0.3, 0.5)
    for side in SIDES:
        haze = c.gauss(side * 0.14, 0.0, 0.12, 0.16)
        _air_fill(c, haze * c.lungs, amount)
        for k in range(int(rng.integers(2, 5))):  # Kerley B lines at the lateral bases
            yk = c.anatomy.dome[0] - 0.02 - 0.022 * k
            line = _soft(0.0035 - np.abs(c.y - yk), c.px) * _soft(side * c.x - (c.lateral_x(yk) - 0.05), c.px)
            c.density += 0.12 * line * c.lung[side]
    if c.markings is not None:
        c.markings *= 1.3


def effusion(c: Canvas, rng: np.random.Generator) -> None:
    """Fluid at a lung base: blunted costophrenic angle and a meniscus rising laterally."""
    sides = list(SIDES) if rng.random() < 0.3 else [int(rng.choice(SIDES))]
    for side in sides:
        height = rng.uniform(0.05, 0.22)
        rel = np.clip((side * c.x - 0.1) / (c.anatomy.lat - 0.1), 0.0, 1.1)
        top = c.dome_y(side, c.x) - height * (0.25 + 0.75 * rel**2)
        fluid = _soft(c.y - top, 0.025) * c.lung[side]
        _air_fill(c, fluid, rng.uniform(0.8, 1.0))
        if c.markings is not None:
            c.markings *= 1.0 - fluid


def nodule(c: Canvas, rng: np.random.Generator) -> None:
    """One to three small, well-defined round opacities."""
    for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
        side = int(rng.choice(SIDES))
        x, y = _zone(c, rng, side)
        r = rng.uniform(0.012, 0.024)
        c.density += rng.uniform(0.22, 0.32) * c.ellipse(x, y, r, r * rng.uniform(0.85, 1.15), soft=1.5)


def mass(c: Canvas, rng: np.random.Generator) -> None:
    """A larger round, lobulated opacity."""
    side = int(rng.choice(SIDES))
    x, y = _zone(c, rng, side, str(rng.choice(["upper", "mid"])))
    r = rng.uniform(0.045, 0.08)
    theta = np.arctan2(c.y - y, c.x - x)
    lobes = 1.0 + 0.08 * np.sin(3 * theta + rng.uniform(0, 6)) + 0.05 * np.sin(5 * theta + rng.uniform(0, 6))
    rho = np.hypot(c.x - x, c.y - y) / (r * lobes)
    body = _soft((1.0 - rho) * r, 2 * c.px)
    c.density += rng.uniform(0.3, 0.42) * body * (0.85 + 0.15 * np.sqrt(np.clip(1 - rho**2, 0, 1)))


def pneumothorax(c: Canvas, rng: np.random.Generator) -> None:
    """Lucent rim without lung markings at the apex and lateral wall, with a visible pleural line."""
    side = int(rng.choice(SIDES))
    gap = rng.uniform(0.03, 0.08)
    us = side * c.x
    a = c.anatomy
    edge_lat = c.lateral_x(c.y) - gap * (0.6 + 0.4 * _soft(-c.y, 0.2))
    apex = a.apex + gap * 1.2 + 0.22 * ((us - 0.2) / 0.2) ** 2
    fade = _soft(0.15 + 0.1 * gap / 0.08 - c.y, 0.1)  # the rim tapers off towards the base
    collapsed = _soft(edge_lat - us, 1.5 * c.px) * _soft(c.y - apex, 1.5 * c.px)
    rim = c.lung[side] * (1.0 - collapsed) * fade
    c.density -= 0.12 * rim
    line = np.clip(c.lung[side] * collapsed * (1 - _soft(edge_lat - us, 2.5 * c.px)
                   * _soft(c.y - apex, 2.5 * c.px)) * 2.0, 0.0, 1.0) * fade
    c.density += 0.09 * line
    if c.markings is not None:
        c.markings *= 1.0 - rim


def emphysema(c: Canvas, rng: np.random.Generator) -> None:
    """Hyperlucent lungs (the anatomy is already enlarged and flattened) with apical bullae."""
    for side in SIDES:
        if rng.random() < 0.6:
            x, y = side * rng.uniform(0.15, 0.28), rng.uniform(-0.3, -0.2)
            r = rng.uniform(0.03, 0.05)
            bulla = c.ellipse(x, y, r, r, soft=1.5)
            wall = np.clip(c.ellipse(x, y, r + 0.006, r + 0.006, soft=1.5) - bulla, 0.0, 1.0)
            c.density += (-0.08 * bulla + 0.05 * wall) * c.lung[side]
            if c.markings is not None:
                c.markings *= 1.0 - bulla


def atelectasis(c: Canvas, rng: np.random.Generator) -> None:
    """Linear (plate-like) or wedge-shaped density near a base; volume loss is set in the anatomy."""
    side = int(rng.choice(SIDES))
    a = c.anatomy
    if rng.random() < 0.6:
        for _ in range(int(rng.integers(1, 3))):
            y0 = rng.uniform(0.0, a.dome[0] - 0.02)
            slope = rng.uniform(-0.25, 0.25)
            mid = side * rng.uniform(0.16, 0.26)
            d = np.abs(c.y - (y0 + slope * (c.x - mid)))
            band = _soft(0.008 - d, 1.5 * c.px) * _soft(0.09 - np.abs(c.x - mid), 4 * c.px)
            c.density += rng.uniform(0.18, 0.28) * band * c.lung[side]
    else:  # collapsed lower lobe: a triangle against the heart border, apex at the hilum
        hx, hy = side * 0.09, -0.02
        ang = np.arctan2(c.y - hy, side * (c.x - hx))
        spread = rng.uniform(0.25, 0.4)
        wedge = _soft(spread - np.abs(ang - 1.25), 0.12) * _soft(0.3 - np.hypot(c.x - hx, c.y - hy), 0.05)
        _air_fill(c, wedge * c.lung[side], rng.uniform(0.45, 0.7))


def fibrosis(c: Canvas, rng: np.random.Generator) -> None:
    """Reticular streaks (a net of fine lines), basal and peripheral, in both lungs."""
    net = np.exp(-((smooth_noise(rng, c.size, 40) / 0.22) ** 2))
    net = np.maximum(net, np.exp(-((smooth_noise(rng, c.size, 22) / 0.18) ** 2)))
    where = np.zeros_like(c.density)
    for side in SIDES:
        periphery = _soft(side * c.x - (c.lateral_x(c.y) - 0.14), 0.06)
        basal = _soft(c.y + 0.1, 0.15)
        where += c.lung[side] * np.maximum(periphery, 0.5) * basal
    c.density += rng.uniform(0.13, 0.2) * net * where


def pleural_thickening(c: Canvas, rng: np.random.Generator) -> None:
    """Bright rim along the chest wall (apical cap or lateral), inside the lung edge."""
    side = int(rng.choice(SIDES))
    t = rng.uniform(0.012, 0.026)
    us = side * c.x
    lateral = _soft(us - (c.lateral_x(c.y) - t), 1.5 * c.px)
    y_lo, y_hi = (c.anatomy.apex, -0.15) if rng.random() < 0.4 else (-0.2, c.anatomy.dome[0])
    span = _soft(c.y - y_lo, 0.03) * _soft(y_hi - c.y, 0.03)
    apex = c.anatomy.apex + 0.22 * ((us - 0.2) / 0.2) ** 2
    cap = _soft(apex + t - c.y, 1.5 * c.px) if y_hi < 0 else 0.0
    rim = np.clip(lateral * span + cap, 0.0, 1.0) * c.lung[side]
    _air_fill(c, rim, rng.uniform(0.7, 0.95))


def hernia(c: Canvas, rng: np.random.Generator) -> None:
    """Hiatal hernia: rounded retrocardiac density above the diaphragm, often with an air-fluid level."""
    a = c.anatomy
    r = rng.uniform(0.055, 0.08)
    x, y = rng.uniform(-0.01, 0.06), a.dome[1] - r * 0.9
    sac = c.ellipse(x, y, r * 1.15, r, soft=2)
    level = y + rng.uniform(-0.4, 0.1) * r
    air = sac * (c.y < level) if rng.random() < 0.6 else 0.0
    c.density += 0.18 * sac - 0.14 * air


def cardiomegaly(c: Canvas, rng: np.random.Generator) -> None:
    """Drawn through the anatomy (a wider heart); nothing to add."""


FINDINGS: dict[str, Finding] = {
    "Atelectasis": atelectasis, "Cardiomegaly": cardiomegaly, "Consolidation": consolidation,
    "Edema": edema, "Effusion": effusion, "Emphysema": emphysema, "Fibrosis": fibrosis,
    "Hernia": hernia, "Infiltration": infiltration, "Mass": mass, "Nodule": nodule,
    "Pleural_Thickening": pleural_thickening, "Pneumonia": pneumonia, "Pneumothorax": pneumothorax,
}


def adjust_for_findings(anatomy: Anatomy, findings: Sequence[str], rng: np.random.Generator) -> Anatomy:
    """Findings that change the anatomy itself: heart size, lung volume, diaphragm shape."""
    a = anatomy
    if "Cardiomegaly" in findings:
        grow = rng.uniform(1.3, 1.5)
        a = replace(a, heart=(a.heart[0], a.heart[1] - 0.02, a.heart[2] * grow, a.heart[3] * (1 + 0.8 * (grow - 1))))
    if "Emphysema" in findings:
        a = replace(a, apex=a.apex - 0.015, lat=a.lat + 0.015, dome=(a.dome[0] + 0.07, a.dome[1] + 0.07),
                    dome_h=a.dome_h * 0.35, lung_depth=a.lung_depth * 1.18, marking_amp=a.marking_amp * 0.55,
                    heart=(a.heart[0], a.heart[1] + 0.05, a.heart[2] * 0.8, a.heart[3] * 0.85))
    if "Atelectasis" in findings:  # volume loss: one dome rises, the heart shifts towards it
        side = int(rng.choice(SIDES))
        dome = list(a.dome)
        dome[0 if side < 0 else 1] -= rng.uniform(0.02, 0.05)
        a = replace(a, dome=(dome[0], dome[1]), heart=(a.heart[0] + side * 0.015, *a.heart[1:]))
    if "Fibrosis" in findings:
        a = replace(a, dome=(a.dome[0] - 0.03, a.dome[1] - 0.03), lat=a.lat - 0.01)
    if "Edema" in findings:
        a = replace(a, heart=(a.heart[0], a.heart[1], a.heart[2] * 1.1, a.heart[3] * 1.1))
    return a


def box_opacity(c: Canvas, rng: np.random.Generator, box: Box) -> None:
    """RSNA-style pneumonia: a soft, patchy opacity confined to the ellipse inscribed in `box`."""
    bx, by, bw, bh = box
    ex, ey = (c.u - (bx + bw / 2)) / (bw / 2), (c.v - (by + bh / 2)) / (bh / 2)
    rho = np.sqrt(ex * ex + ey * ey)
    inside = np.clip((1.0 - rho) / 0.45, 0.0, 1.0) ** 1.2
    cells = int(np.clip(round(3.0 / max(min(bw, bh), 0.05)), 8, 48))
    patches = _patchy(c, rng, cells, rng.uniform(-0.6, 0.2), rng.uniform(1.0, 1.6))
    amount = rng.uniform(0.25, 0.6)
    c.density += amount * c.anatomy.lung_depth * inside * patches * _lung_weight(c, 0.35)


# ---------------------------------------------------------------- rendering


def density_map(anatomy: Anatomy, size: int, rng: np.random.Generator, findings: Sequence[str] = (),
                boxes: Sequence[Box] = ()) -> np.ndarray:
    """The density map (before the detector) of `anatomy` with `findings` and RSNA `boxes` drawn in.

    `anatomy` is expected to be adjusted already (see `adjust_for_findings`); `rng` draws the lesions.
    """
    c = _canvas(anatomy, size)
    _body(c)
    _lungs(c)
    _lung_air(c)
    _heart_and_bones(c)
    normal = smooth_noise(np.random.default_rng(anatomy.texture_seed + 1), size, 10)
    c.density += 0.035 * anatomy.lung_depth * normal * c.lungs  # normal variation of lung density
    for name in findings:
        FINDINGS[name](c, rng)
    for box in boxes:
        box_opacity(c, rng, box)
    markings = c.markings if c.markings is not None else 1.0
    c.density += _vessel_markings(c) * np.clip(markings, 0.0, 1.5)
    _leads(c, rng)
    return c.density


_FILM_K = 1.2  # saturation of the film curve: dense regions lose contrast as on a real radiograph


def detector(density: np.ndarray, anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Window, gamma, detector blur and quantum noise: float32 image in [0, 1]."""
    a = anatomy
    film = (1.0 - np.exp(-_FILM_K * density)) / (1.0 - math.exp(-_FILM_K * 1.3))
    img = np.clip((film - a.black) / (a.white - a.black), 0.0, 1.0) ** a.gamma
    img = blur(img.astype(np.float32), a.blur * density.shape[0] / 256)
    noise = rng.standard_normal(img.shape).astype(np.float32)
    img = img + a.noise * noise * (0.6 + 0.6 * np.sqrt(1.0 - img + 1e-6))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render(anatomy: Anatomy, size: int, rng: np.random.Generator, findings: Sequence[str] = (),
           boxes: Sequence[Box] = ()) -> np.ndarray:
    """A size×size float32 chest X-ray in [0, 1] (white = dense) with `findings` and `boxes` drawn."""
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise ValueError(f"unknown findings {unknown}; known: {sorted(FINDINGS)}")
    anatomy = adjust_for_findings(anatomy, findings, rng)
    return detector(density_map(anatomy, size, rng, findings, boxes), anatomy, rng)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
