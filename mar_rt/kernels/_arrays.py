"""Geometry tables shared by the host and GPU operators, and array checks (internal).

Notation (cm; mar_rt/ct/geometry.py):

    views [V][6] float64   source (x, y), detector centre (x, y), e_u (x, y) of each view
    u     [D]    float64   detector bin centres u_j (det_offset included)
    u_abs_max              bound on |u − g| over the detector grown by one bin (g = 0 here:
                           the source's foot is the detector centre)
    iso                    R/(R + D), detector → isocentre scale (FBP)
    bp_scale               R²·π/V, the back-projection factor (2π/V)/2 · R²
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.errors import BadInputError


@dataclass(frozen=True, eq=False)
class GeometryTables:
    """The small float64 tables every projector kernel reads, from one geometry."""

    geometry: FanBeamGeometry
    views: np.ndarray
    u: np.ndarray
    u_abs_max: float
    iso: float
    bp_scale: float


def geometry_tables(geometry: FanBeamGeometry) -> GeometryTables:
    """Per-view source/detector vectors and bin positions, exactly as ``FanBeamGeometry``
    defines them (``detector_points() = centre + u·e_u``)."""
    if not isinstance(geometry, FanBeamGeometry):
        raise BadInputError(f"geometry must be a FanBeamGeometry, got {type(geometry).__name__}")
    g = geometry
    if g.n_rows < 2 or g.n_cols < 2 or g.n_det < 2:
        raise BadInputError(
            f"geometry: the kernels need at least 2 rows, 2 columns and 2 detector bins, got "
            f"{g.n_rows} × {g.n_cols} and {g.n_det} bins"
        )
    if g.n_rows * g.n_cols >= 2**31:
        raise BadInputError(
            f"geometry: an image plane of {g.n_rows} × {g.n_cols} pixels is too large for the "
            "kernels' 32-bit in-plane index (at most 2^31 − 1 pixels)"
        )
    beta = g.angles()
    cos, sin = np.cos(beta), np.sin(beta)
    src = g.source_positions()
    views = np.stack(
        [src[:, 0], src[:, 1], g.detector_distance * cos, g.detector_distance * sin, sin, -cos],
        axis=1,
    )
    u = g.det_positions()
    u_abs_max = float(np.abs(u).max() + g.det_spacing)
    r = g.source_distance
    return GeometryTables(
        geometry=g,
        views=np.ascontiguousarray(views, dtype=np.float64),
        u=np.ascontiguousarray(u, dtype=np.float64),
        u_abs_max=u_abs_max,
        iso=r / (r + g.detector_distance),
        bp_scale=r * r * math.pi / g.n_views,
    )


def leading_batch(shape: tuple[int, ...], name: str) -> int:
    """Number of slices in a (..., A, B) array (1 for 2-D)."""
    if len(shape) < 2:
        raise BadInputError(f"{name} must be at least 2-D, got shape {shape}")
    return int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1


def check_geometry_shape(
    geometry: FanBeamGeometry, shape: tuple[int, ...], kind: str, name: str
) -> None:
    """BadInputError unless the trailing dims fit ``geometry`` (kind 'image' or 'sinogram')."""
    try:
        if kind == "image":
            geometry.check_image(shape, name)
        else:
            geometry.check_sinogram(shape, name)
    except ValueError as exc:
        raise BadInputError(str(exc)) from exc
