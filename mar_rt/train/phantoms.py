"""Procedural body phantoms: ellipses of fat, soft tissue, organs, lung and bone (for variety).

Notation:

    HU        Hounsfield units of each tissue (drawn per phantom from the ranges below)
    μ         returned image, (HU/1000 + 1)·μw in cm⁻¹, float32 (H, W), air = 0
    region    "head", "chest", "abdomen" or "pelvis": which structures are drawn

Tissues (HU ranges): fat −120…−80, soft tissue 20…60, organs −20…80, lung −900…−750,
trabecular bone 150…400, cortical bone 900…1800, brain 25…45, skull 1200…1800. A smooth
texture (Gaussian-filtered noise, ~8 HU) and fine noise (~6 HU) are added inside the body;
the result is clipped to [−1000, 2000] HU. Everything random comes from
``numpy.random.default_rng(seed)``: same seed, same phantom.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

from mar_rt.ct.units import hu_to_mu

REGIONS = ("head", "chest", "abdomen", "pelvis")


def _ellipse(
    shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, theta: float = 0.0
) -> np.ndarray:
    """Bool (H, W): inside the ellipse centred (cy, cx) px with radii (ry, rx), rotated θ."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _bone(hu: np.ndarray, inside: np.ndarray, shell_px: float, rng: np.random.Generator) -> None:
    """Cortical shell of ``shell_px`` around a trabecular core, written into ``hu``."""
    core = ndi.binary_erosion(inside, iterations=max(1, int(round(shell_px))))
    hu[inside] = rng.uniform(900, 1800)
    hu[core] = rng.uniform(150, 400)


def ellipse_phantom(
    seed: int, shape: tuple[int, int] = (416, 416), *, region: str | None = None
) -> np.ndarray:
    """A seeded body phantom → μ float32 ``shape`` (cm⁻¹). ``region`` is drawn when None."""
    rng = np.random.default_rng(seed)
    region = REGIONS[int(rng.integers(len(REGIONS)))] if region is None else region
    if region not in REGIONS:
        raise ValueError(f"region {region!r} is unknown; choose one of {REGIONS}")
    h, w = shape
    cy, cx = h / 2 + rng.normal(0, 0.02 * h), w / 2 + rng.normal(0, 0.02 * w)
    hu = np.full(shape, -1000.0)

    if region == "head":
        r = rng.uniform(0.26, 0.34) * min(h, w)
        ry, rx = r * rng.uniform(1.0, 1.2), r
        body = _ellipse(shape, cy, cx, ry, rx)
        hu[body] = rng.uniform(900, 1800)  # skull (cortical)
        t = rng.uniform(0.05, 0.09) * r
        brain = _ellipse(shape, cy, cx, ry - t, rx - t)
        hu[brain] = rng.uniform(25, 45)
        for _ in range(int(rng.integers(1, 4))):  # ventricles / grey-white contrast
            hu[
                _ellipse(
                    shape,
                    cy + rng.normal(0, 0.15 * r),
                    cx + rng.normal(0, 0.15 * r),
                    rng.uniform(0.05, 0.2) * r,
                    rng.uniform(0.05, 0.2) * r,
                    rng.uniform(0, np.pi),
                )
                & brain
            ] = rng.uniform(0, 20)
    else:
        rx = rng.uniform(0.34, 0.46) * w
        ry = rx * rng.uniform(0.6, 0.85)
        body = _ellipse(shape, cy, cx, ry, rx)
        hu[body] = rng.uniform(-120, -80)  # subcutaneous fat
        fat = rng.uniform(0.04, 0.12)
        inner = _ellipse(shape, cy, cx, ry * (1 - fat), rx * (1 - fat))
        hu[inner] = rng.uniform(20, 60)
        if region == "chest":
            for side in (-1, 1):
                lung = _ellipse(
                    shape,
                    cy - 0.05 * ry,
                    cx + side * 0.45 * rx,
                    0.6 * ry,
                    0.33 * rx,
                    rng.normal(0, 0.15),
                )
                hu[lung & inner] = rng.uniform(-900, -750)
                for _ in range(int(rng.integers(3, 9))):  # vessels
                    vy = cy + rng.uniform(-0.5, 0.4) * ry
                    vx = cx + side * rng.uniform(0.25, 0.65) * rx
                    hu[_ellipse(shape, vy, vx, rng.uniform(1.5, 4), rng.uniform(1.5, 4)) & lung] = (
                        40
                    )
            hu[_ellipse(shape, cy + 0.05 * ry, cx - 0.1 * rx, 0.3 * ry, 0.22 * rx)] = rng.uniform(
                30, 50
            )
            for k in range(int(rng.integers(4, 8))):  # ribs around the periphery
                a = np.pi * (0.15 + 0.7 * k / 7) * (1 if k % 2 else -1)
                rib = _ellipse(
                    shape,
                    cy - 0.85 * ry * np.cos(a),
                    cx + 0.85 * rx * np.sin(a),
                    rng.uniform(3, 6),
                    rng.uniform(5, 9),
                    a,
                )
                _bone(hu, rib & inner, 1.5, rng)
        else:
            for _ in range(int(rng.integers(3, 7))):  # organs
                organ = _ellipse(
                    shape,
                    cy + rng.uniform(-0.4, 0.3) * ry,
                    cx + rng.uniform(-0.5, 0.5) * rx,
                    rng.uniform(0.1, 0.35) * ry,
                    rng.uniform(0.1, 0.3) * rx,
                    rng.uniform(0, np.pi),
                )
                hu[organ & inner] = rng.uniform(-20, 80)
            if region == "pelvis":
                for side in (-1, 1):
                    wing = _ellipse(
                        shape,
                        cy + 0.1 * ry,
                        cx + side * rng.uniform(0.45, 0.6) * rx,
                        rng.uniform(0.18, 0.3) * ry,
                        rng.uniform(0.08, 0.14) * rx,
                        side * rng.uniform(0.2, 0.6),
                    )
                    _bone(hu, wing & inner, rng.uniform(2, 4), rng)
        # spine: vertebral body + posterior arch
        vy, vx = cy + rng.uniform(0.45, 0.6) * ry, cx + rng.normal(0, 0.02 * rx)
        vr = rng.uniform(0.09, 0.13) * rx
        _bone(
            hu,
            _ellipse(shape, vy, vx, vr * rng.uniform(0.8, 1.0), vr) & inner,
            rng.uniform(2, 4),
            rng,
        )
        arch = _ellipse(shape, vy + 1.5 * vr, vx, 0.5 * vr, 0.9 * vr) & ~_ellipse(
            shape, vy + 1.5 * vr, vx, 0.3 * vr, 0.5 * vr
        )
        _bone(hu, arch & inner, 1.5, rng)

    smooth = ndi.gaussian_filter(rng.normal(0, 1, shape), 6.0)
    smooth *= 8.0 / max(float(smooth.std()), 1e-9)
    fine = ndi.gaussian_filter(rng.normal(0, 6.0, shape), 0.7)
    hu = np.where(body, hu + smooth + fine, hu)
    hu = ndi.gaussian_filter(hu, 0.6)  # soften the rasterised edges
    return hu_to_mu(np.clip(hu, -1000.0, 2000.0)).astype(np.float32)
