"""Flat-detector fan-beam filtered back-projection (DESIGN.md §4).

Notation (lengths in cm, Kak & Slaney ch. 3.4.2 for the equispaced fan):

    R, D    source → isocentre, isocentre → detector;  V views β_k;  n bins u_j (physical)
    p → q   cosine pre-weighting and windowed Ram-Lak filter (notation in ramp.py)
    t       R + x·θ                  distance source → pixel along the central ray
                                     θ = (cos β, sin β), e_u = (sin β, −cos β)
    u(x)    (R + D)(x·e_u)/t         where the ray through pixel x meets the detector
    f(x)    (2π/V)/2 · Σ_k R²/t² · q(β_k, u(x))     q linearly interpolated, 0 off the detector

The back-projection is pixel-driven, a different operator from the adjoint of the Joseph
projector.  ``fbp`` runs it through a cached :class:`mar_rt.ct.projector.Projector`; the
filter (p → q) is in ``ramp``, the back-projection's matrix entries in ``_pixel_driven``.
"""

from __future__ import annotations

import torch

from mar_rt.ct._checks import check_operand
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.projector import get_projector
from mar_rt.ct.ramp import check_filter


def fbp(
    sinogram: torch.Tensor, geometry: FanBeamGeometry, *, filter: str = "ram-lak"
) -> torch.Tensor:
    """Fan-beam FBP: sinogram of line integrals (…, V, n) → μ image (…, H, W) in cm⁻¹.

    Filters: ``ram-lak``, ``shepp-logan``, ``cosine``, ``hamming``, ``hann``.
    Uses (and caches) a Projector for the sinogram's device and dtype.
    """
    check_operand(sinogram, geometry, "sinogram", "sinogram")
    check_filter(filter)
    return get_projector(geometry, sinogram.device, sinogram.dtype).fbp(sinogram, filter=filter)
