"""Procedural metal masks and body outlines for simulation (DESIGN.md §5, "Metal masks").

Notation:

    M        metal mask, bool [row, col]
    |M|      metal pixel count (``size_px``), 30–2500 at 416², scaled by H·W / 416² elsewhere
    B        body outline, bool [row, col]; every metal pixel lies in B eroded by ``margin_px``
    s        the length scale of a shape template; |M| is matched by bisection on s

Shapes (``KINDS``): ``disc``, ``ellipse``, ``rod`` (capsule), ``screw`` (threaded shaft with a
head and a tapered tip, lying in the slice), ``dental`` (a cluster of 2–5 fillings along an
arc), ``hip_stem`` (tapered rounded-rectangle cross-section), ``multi`` (2–4 separate implants
at once). ``SIZE_GROUPS`` bins metal sizes for reporting, large to small.

Everything random comes from ``numpy.random.default_rng(seed)``, so a seed gives the same mask
on every machine. Sizes hit the target within ``SIZE_TOLERANCE`` (relative) or one pixel,
whichever is larger, when the template allows it, and always within 10 %.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage as ndi
from scipy.signal import fftconvolve

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.units import hu_to_mu

KINDS = ("disc", "ellipse", "rod", "screw", "dental", "hip_stem", "multi")
"""Mask shapes :func:`generate_metal_mask` can draw."""

REFERENCE_SHAPE = FanBeamGeometry.syndeeplesion().image_shape
"""The SynDeepLesion image grid (416, 416) that sizes in px refer to."""

SIZE_RANGE_PX = (30, 2500)
"""Allowed metal pixel counts at 416² (scaled by area for other shapes)."""

SIZE_TOLERANCE = 0.03
"""Relative size error the bisection aims for."""

# Sizes (px at 416²) each kind is drawn for when ``kind`` is None.
_KIND_SIZES = {
    "disc": (30, 2500),
    "ellipse": (30, 2500),
    "rod": (30, 1200),
    "screw": (60, 1500),
    "dental": (40, 1200),
    "hip_stem": (400, 2500),
    "multi": (60, 2500),
}
_MULTI_PARTS = ("disc", "ellipse", "rod", "screw", "hip_stem")

Template = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class SizeGroup:
    """A reporting bin of metal sizes: ``lo ≤ pixels < hi`` at 416²."""

    label: str
    lo: float
    hi: float

    def __contains__(self, metal_px: float) -> bool:
        return self.lo <= metal_px < self.hi


SIZE_GROUPS: tuple[SizeGroup, ...] = (
    SizeGroup("large", 886, math.inf),
    SizeGroup("medium-large", 339, 886),
    SizeGroup("medium", 121, 339),
    SizeGroup("medium-small", 77, 121),
    SizeGroup("small", 0, 77),
)
"""Size groups, large to small. The published SynDeepLesion test set has ten masks (2061, 890,
881, 451, 254, 124, 118, 112, 53 and 35 px); the DuDoNet/InDuDoNet tables report them in
pairs from large to small. The bounds are the geometric means between neighbouring pairs, so
each published mask falls in its published group."""


def size_group(metal_px: float) -> str:
    """Label of the :data:`SIZE_GROUPS` entry holding ``metal_px`` (ValueError if negative)."""
    if not metal_px >= 0:
        raise ValueError(f"metal_px must be a non-negative pixel count, got {metal_px!r}")
    for group in SIZE_GROUPS:
        if metal_px in group:
            return group.label
    raise AssertionError("SIZE_GROUPS covers [0, inf)")


# --- shape templates: inside(X, Y, s) on local pixel coordinates ---------------------------
def _rotate(x: np.ndarray, y: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(theta), np.sin(theta)
    return c * x + s * y, -s * x + c * y


def _disc(rng: np.random.Generator) -> tuple[Template, float]:
    return (lambda x, y, s: x**2 + y**2 <= s**2), 1.0


def _ellipse(rng: np.random.Generator) -> tuple[Template, float]:
    q = rng.uniform(1.3, 3.0)
    a, b, theta = np.sqrt(q), 1 / np.sqrt(q), rng.uniform(0, np.pi)

    def inside(x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
        u, v = _rotate(x, y, theta)
        return (u / (a * s)) ** 2 + (v / (b * s)) ** 2 <= 1

    return inside, max(a, b)


def _capsule(half_len: float, theta: float) -> Template:
    def inside(x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
        u, v = _rotate(x, y, theta)
        du = np.maximum(np.abs(u) - half_len * s, 0)
        return du**2 + v**2 <= s**2

    return inside


def _rod(rng: np.random.Generator) -> tuple[Template, float]:
    half_len = rng.uniform(2.0, 6.0)
    return _capsule(half_len, rng.uniform(0, np.pi)), half_len + 1


def _screw(rng: np.random.Generator) -> tuple[Template, float]:
    length = rng.uniform(6.0, 12.0)
    depth = rng.uniform(0.3, 0.6)
    pitch = rng.uniform(1.2, 2.0)
    head_w, head_r, tip = rng.uniform(0.6, 1.0), rng.uniform(1.6, 2.0), 1.5
    theta = rng.uniform(0, np.pi)

    def inside(x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
        u, v = _rotate(x, y, theta)
        u = u / s + length / 2
        v = np.abs(v / s)
        tooth = 1 - 2 * np.abs((u / pitch) % 1 - 0.5)  # triangle wave in [0, 1]
        radius = 1 + depth * tooth
        radius = radius * np.clip((length - u) / tip, 0, 1)  # tapered tip
        shaft = (u >= 0) & (u <= length) & (v <= radius)
        head = (u >= -head_w) & (u < 0) & (v <= head_r)
        return shaft | head

    return inside, length / 2 + head_w + head_r


def _dental(rng: np.random.Generator) -> tuple[Template, float]:
    n = int(rng.integers(2, 6))
    arc_r, step = 8.0, rng.uniform(2.6, 3.4)
    phi0, centre_phi = rng.uniform(0, 2 * np.pi), None
    centre_phi = phi0
    parts = []
    for i in range(n):
        phi = centre_phi + (i - (n - 1) / 2) * step / arc_r
        cx, cy = arc_r * np.cos(phi), arc_r * np.sin(phi)
        cx, cy = cx + rng.normal(0, 0.2), cy + rng.normal(0, 0.2)
        a, b = rng.uniform(1.0, 1.6), rng.uniform(0.8, 1.3)
        parts.append((cx, cy, a, b, phi + rng.normal(0, 0.3)))
    # centre the cluster on its mean position
    mx, my = np.mean([p[0] for p in parts]), np.mean([p[1] for p in parts])
    parts = [(cx - mx, cy - my, a, b, t) for cx, cy, a, b, t in parts]
    extent = max(np.hypot(cx, cy) + max(a, b) for cx, cy, a, b, _ in parts)

    def inside(x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
        out = np.zeros(np.broadcast(x, y).shape, bool)
        for cx, cy, a, b, t in parts:
            u, v = _rotate(x - cx * s, y - cy * s, t)
            out |= (u / (a * s)) ** 2 + (v / (b * s)) ** 2 <= 1
        return out

    return inside, extent


def _hip_stem(rng: np.random.Generator) -> tuple[Template, float]:
    a, b = rng.uniform(1.6, 2.4), rng.uniform(0.9, 1.3)
    taper, power = rng.uniform(0.0, 0.35), rng.uniform(3.0, 5.0)
    theta = rng.uniform(0, np.pi)

    def inside(x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
        u, v = _rotate(x, y, theta)
        un = u / (a * s)
        half_w = b * s * (1 + taper * np.clip(un, -1, 1))
        return np.abs(un) ** power + np.abs(v / half_w) ** power <= 1

    return inside, a * 1.0 + b * (1 + taper)


_TEMPLATES: dict[str, Callable[[np.random.Generator], tuple[Template, float]]] = {
    "disc": _disc,
    "ellipse": _ellipse,
    "rod": _rod,
    "screw": _screw,
    "dental": _dental,
    "hip_stem": _hip_stem,
}


# --- rasterise at a target size ----------------------------------------------------------------
def _raster(inside: Template, extent: float, s: float, offset: np.ndarray) -> np.ndarray:
    half = int(np.ceil(extent * s)) + 2
    r = np.arange(-half, half + 1, dtype=np.float64)
    y = -(r[:, None] + offset[0])
    x = r[None, :] + offset[1]
    img = inside(x, y, s)
    rows, cols = np.nonzero(img)
    if rows.size == 0:
        return np.zeros((1, 1), bool)
    return img[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _fit_size(inside: Template, extent: float, target: int, offset: np.ndarray) -> np.ndarray:
    """Footprint whose pixel count is closest to ``target`` (bisection on the scale s)."""
    tol = max(1.0, SIZE_TOLERANCE * target)
    area1 = max(int(_raster(inside, extent, 4.0, offset).sum()), 1) / 16.0
    lo, hi = 0.0, 2 * np.sqrt(target / area1) + 1
    best, best_err = None, np.inf
    for _ in range(40):
        s = 0.5 * (lo + hi)
        fp = _raster(inside, extent, s, offset)
        n = int(fp.sum())
        if abs(n - target) < best_err:
            best, best_err = fp, abs(n - target)
        if best_err <= tol:
            break
        lo, hi = (s, hi) if n < target else (lo, s)
    assert best is not None
    return best


# --- placement -----------------------------------------------------------------------------------
def _default_body(shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return ((yy - (h - 1) / 2) / (0.45 * h)) ** 2 + ((xx - (w - 1) / 2) / (0.45 * w)) ** 2 <= 1


def _place(
    footprint: np.ndarray, allowed: np.ndarray, rng: np.random.Generator
) -> tuple[int, int] | None:
    """Top-left (row, col) where ``footprint`` lies wholly in ``allowed``, drawn uniformly."""
    fh, fw = footprint.shape
    if fh > allowed.shape[0] or fw > allowed.shape[1]:
        return None
    conflicts = fftconvolve(
        (~allowed).astype(np.float64), footprint[::-1, ::-1].astype(float), "valid"
    )
    rows, cols = np.nonzero(conflicts < 0.5)
    if rows.size == 0:
        return None
    i = int(rng.integers(rows.size))
    return int(rows[i]), int(cols[i])


def _draw_one(
    kind: str, target: int, allowed: np.ndarray, rng: np.random.Generator, attempts: int = 6
) -> np.ndarray | None:
    for _ in range(attempts):
        inside, extent = _TEMPLATES[kind](rng)
        fp = _fit_size(inside, extent, target, rng.uniform(-0.5, 0.5, size=2))
        pos = _place(fp, allowed, rng)
        if pos is not None:
            out = np.zeros(allowed.shape, bool)
            out[pos[0] : pos[0] + fp.shape[0], pos[1] : pos[1] + fp.shape[1]] = fp
            return out
    return None


def _split(total: int, rng: np.random.Generator) -> list[int]:
    n_max = int(min(4, total // 15))
    n = int(rng.integers(2, n_max + 1)) if n_max >= 2 else 1
    weights = rng.dirichlet(np.full(n, 2.0))
    parts = np.maximum(np.floor(weights * total).astype(int), 1)
    parts[0] += total - parts.sum()
    return sorted((int(p) for p in parts), reverse=True)


# --- public ---------------------------------------------------------------------------------------
def body_outline(image_mu: Any, threshold_hu: float = -500.0) -> np.ndarray:
    """Body outline of a CT slice: μ above ``threshold_hu``, holes filled, opened by a 2-px disc
    (drops the table), largest component kept. ``image_mu`` (H, W) → bool numpy (H, W)."""
    x = image_mu.detach().cpu().numpy() if hasattr(image_mu, "detach") else np.asarray(image_mu)
    if x.ndim != 2:
        raise ValueError(f"image_mu must be 2-D (H, W), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("image_mu contains NaN or inf")
    body = ndi.binary_fill_holes(x > hu_to_mu(threshold_hu))
    disc = ndi.generate_binary_structure(2, 1)
    body = ndi.binary_opening(body, structure=disc, iterations=2)
    labels, n = ndi.label(body)
    if n == 0:
        return np.zeros(x.shape, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndi.binary_fill_holes(labels == int(np.argmax(sizes)))


def size_limits(shape: tuple[int, int]) -> tuple[int, int]:
    """Allowed (min, max) metal pixel counts for an image of ``shape`` (area-scaled)."""
    scale = shape[0] * shape[1] / (REFERENCE_SHAPE[0] * REFERENCE_SHAPE[1])
    return max(1, round(SIZE_RANGE_PX[0] * scale)), max(1, round(SIZE_RANGE_PX[1] * scale))


def suitable_kinds(size_px: int, shape: tuple[int, int] = REFERENCE_SHAPE) -> tuple[str, ...]:
    """The kinds drawn for ``size_px`` when ``kind`` is None (each has a plausible size range)."""
    scaled = size_px * (REFERENCE_SHAPE[0] * REFERENCE_SHAPE[1]) / (shape[0] * shape[1])
    fits = tuple(k for k, (a, b) in _KIND_SIZES.items() if a <= scaled <= b)
    return fits or ("disc", "ellipse")


def generate_metal_mask(
    shape: tuple[int, int] = REFERENCE_SHAPE,
    *,
    seed: int | np.random.SeedSequence,
    body_mask: np.ndarray | None = None,
    size_px: int | None = None,
    kind: str | None = None,
    margin_px: int = 3,
) -> np.ndarray:
    """A seeded procedural metal mask, bool numpy ``shape``, lying inside ``body_mask``.

    ``size_px``: metal pixel count (default log-uniform in :func:`size_limits`); ``kind``: one
    of :data:`KINDS` (default: drawn among the kinds suited to the size). Metal stays
    ``margin_px`` inside the body outline (default: an ellipse over 90 % of the field), and so
    off the image edge. ValueError when the size is out of range, the kind unknown, or the
    shape does not fit inside the body.
    """
    rng = np.random.default_rng(seed)
    shape = (int(shape[0]), int(shape[1]))
    lo, hi = size_limits(shape)
    if size_px is None:
        size_px = int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    elif not lo <= size_px <= hi:
        raise ValueError(f"size_px {size_px} outside the allowed {lo}–{hi} px for shape {shape}")
    if kind is None:
        fits = suitable_kinds(size_px, shape)
        kind = fits[int(rng.integers(len(fits)))]
    elif kind not in KINDS:
        raise ValueError(f"kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    body = _default_body(shape) if body_mask is None else np.asarray(body_mask, bool)
    if body.shape != shape:
        raise ValueError(f"body_mask has shape {body.shape}, expected {shape}")
    allowed = ndi.binary_erosion(body, iterations=margin_px, border_value=0)
    if not allowed.any():
        raise ValueError(f"body_mask leaves no room {margin_px} px inside its outline")

    if kind != "multi":
        out = _draw_one(kind, size_px, allowed, rng)
        if out is None:
            raise ValueError(f"a {kind} of {size_px} px does not fit inside the body outline")
        return out
    out = np.zeros(shape, bool)
    for part in _split(size_px, rng):
        sub = [k for k in _MULTI_PARTS if k != "hip_stem" or part >= 300]
        piece = _draw_one(str(rng.choice(sub)), part, allowed & ~out, rng)
        if piece is None:
            raise ValueError(f"{size_px} px of implants do not fit inside the body outline")
        out |= piece
        allowed &= ~ndi.binary_dilation(piece, iterations=4)
    return out
