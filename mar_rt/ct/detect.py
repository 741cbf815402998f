"""Metal detection for clinical images: "do no harm" (DESIGN §8).

A plain threshold (2500 HU, ``METAL_THRESHOLD_MU``) also fires on dense iodinated contrast and on
small dense calcifications: in the real chest series ``ct-volumes/lidc_chest`` it marks a
contrast bolus in the superior vena cava (34 px above 2500 HU, only 2–3 px at the 3071 HU
ceiling) and a small calcification in the liver (25 px at the ceiling, 12 mm²).  Correcting
such a slice changes a clean image.  A component therefore counts as metal only on more than
one threshold:

    candidate   8-connected pixels with HU ≥ ``threshold_hu`` (2500), at least ``min_pixels``
    metal if    (a) its peak HU ≥ ``extended_hu`` (4000: beyond iodine in vivo and any
                    tissue; scanners with an extended CT scale show metal there), with at
                    least ``min_core_mm2`` of pixels at ≥ ``extended_hu``;
             or (b) at least ``plateau_mm2`` (20 mm²) of pixels at ≥ ``plateau_hu`` (3000):
                    a saturated plateau, which is how metal looks on a 12-bit scanner whose
                    ceiling is 3071 HU; a contrast bolus or a calcification reaches the
                    ceiling only in a few pixels.

Areas are in mm² so the rule means the same at every pixel size.  The mask of a metal
component is all of its candidate pixels (hysteresis: the core decides, the 2500 HU
threshold draws the outline).  Everything here is numpy; ``ct`` imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from mar_rt.ct.mar import METAL_THRESHOLD_MU, MIN_METAL_PIXELS
from mar_rt.ct.units import mu_to_hu

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True, kw_only=True)
class MetalCriteria:
    """Thresholds of :func:`detect_metal` (HU, mm²; see the module docstring)."""

    threshold_hu: float = float(mu_to_hu(METAL_THRESHOLD_MU))
    min_pixels: int = MIN_METAL_PIXELS
    extended_hu: float = 4000.0
    min_core_mm2: float = 1.0
    plateau_hu: float = 3000.0
    plateau_mm2: float = 20.0

    def __post_init__(self) -> None:
        if not (self.threshold_hu <= self.plateau_hu <= self.extended_hu):
            raise ValueError(
                "MetalCriteria: need threshold_hu ≤ plateau_hu ≤ extended_hu, got "
                f"{self.threshold_hu}, {self.plateau_hu}, {self.extended_hu}"
            )
        if self.min_pixels < 1 or self.min_core_mm2 < 0 or self.plateau_mm2 < 0:
            raise ValueError("MetalCriteria: sizes must be non-negative (min_pixels ≥ 1)")


@dataclass(frozen=True)
class MetalComponent:
    """One candidate component of a slice and the verdict on it."""

    pixels: int  # candidate pixels (≥ threshold_hu)
    area_mm2: float
    peak_hu: float
    core_mm2: float  # area at ≥ extended_hu
    plateau_mm2: float  # area at ≥ plateau_hu
    centroid_rc: tuple[float, float]  # (row, col), pixels
    is_metal: bool
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            "pixels": self.pixels,
            "area_mm2": round(self.area_mm2, 2),
            "peak_hu": round(self.peak_hu, 1),
            "core_mm2": round(self.core_mm2, 2),
            "plateau_mm2": round(self.plateau_mm2, 2),
            "centroid_rc": [round(v, 1) for v in self.centroid_rc],
            "is_metal": self.is_metal,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class SliceDetection:
    """The metal mask of one slice and every candidate component behind it."""

    mask: np.ndarray  # bool (H, W)
    components: tuple[MetalComponent, ...]

    @property
    def has_metal(self) -> bool:
        return bool(self.mask.any())

    @property
    def rejected(self) -> tuple[MetalComponent, ...]:
        """Candidates that were not counted as metal (dense contrast, bone, calcification)."""
        return tuple(c for c in self.components if not c.is_metal)


def detect_metal(
    hu: np.ndarray,
    pixel_area_mm2: float,
    criteria: MetalCriteria | None = None,
) -> SliceDetection:
    """Metal mask of one slice ``hu`` (H, W), Hounsfield units, pixels of ``pixel_area_mm2``.

    Returns the mask (bool (H, W)) and the verdict on each candidate component.
    Raises ValueError on a non-2-D or non-finite slice or a non-positive pixel area.
    """
    c = criteria or MetalCriteria()
    hu = np.asarray(hu, dtype=np.float64)
    if hu.ndim != 2:
        raise ValueError(f"detect_metal: expected one (H, W) slice, got shape {hu.shape}")
    if not np.isfinite(hu).all():
        raise ValueError("detect_metal: the slice holds NaN or inf")
    if not (np.isfinite(pixel_area_mm2) and pixel_area_mm2 > 0):
        raise ValueError(f"detect_metal: pixel area must be > 0 mm², got {pixel_area_mm2}")
    labels, n = ndi.label(hu >= c.threshold_hu, structure=_EIGHT)
    mask = np.zeros(hu.shape, dtype=bool)
    if n == 0:
        return SliceDetection(mask=mask, components=())
    index = np.arange(1, n + 1)
    sizes = ndi.sum_labels(np.ones_like(hu), labels, index)
    peaks = ndi.maximum(hu, labels, index)
    cores = ndi.sum_labels(hu >= c.extended_hu, labels, index)
    plateaus = ndi.sum_labels(hu >= c.plateau_hu, labels, index)
    centroids = ndi.center_of_mass(np.ones_like(hu), labels, index)
    components = []
    for k in range(n):
        pixels = int(sizes[k])
        if pixels < c.min_pixels:
            continue
        core_mm2 = float(cores[k]) * pixel_area_mm2
        plateau_mm2 = float(plateaus[k]) * pixel_area_mm2
        if peaks[k] >= c.extended_hu and core_mm2 >= c.min_core_mm2:
            is_metal, reason = True, f"peak {peaks[k]:.0f} HU ≥ {c.extended_hu:.0f} HU"
        elif plateau_mm2 >= c.plateau_mm2:
            is_metal = True
            reason = f"{plateau_mm2:.1f} mm² at ≥ {c.plateau_hu:.0f} HU (saturated plateau)"
        else:
            is_metal = False
            reason = (
                f"peak {peaks[k]:.0f} HU and {plateau_mm2:.1f} mm² at ≥ {c.plateau_hu:.0f} HU: "
                "dense tissue or contrast, not metal"
            )
        if is_metal:
            mask |= labels == k + 1
        components.append(
            MetalComponent(
                pixels=pixels,
                area_mm2=pixels * pixel_area_mm2,
                peak_hu=float(peaks[k]),
                core_mm2=core_mm2,
                plateau_mm2=plateau_mm2,
                centroid_rc=(float(centroids[k][0]), float(centroids[k][1])),
                is_metal=is_metal,
                reason=reason,
            )
        )
    return SliceDetection(mask=mask, components=tuple(components))
