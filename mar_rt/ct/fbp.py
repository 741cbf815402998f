"""Flat-detector fan-beam filtered back-projection (DESIGN.md §4).

Notation (lengths in cm, Kak & Slaney ch. 3.4.2 for the equispaced fan):

    R, D    source → isocentre, isocentre → detector;  V views β_k;  n bins u_j (physical)
    a_j     u_j · R/(R + D)          bin centre scaled to the isocentre
    τ       du · R/(R + D)           bin spacing at the isocentre
    p'      p · R/√(R² + a²)         cosine pre-weighted sinogram
    h       Ram-Lak kernel: h[0] = 1/(4τ²), h[odd n] = −1/(π n τ)², h[even n ≠ 0] = 0
    q       τ · (p' ⊛ h) · window    filtered sinogram, applied by FFT with zero padding to
                                     P = 2^k ≥ 2n
    t       R + x·θ                  distance source → pixel along the central ray
                                     θ = (cos β, sin β), e_u = (sin β, −cos β)
    u(x)    (R + D)(x·e_u)/t         where the ray through pixel x meets the detector
    f(x)    (2π/V)/2 · Σ_k R²/t² · q(β_k, u(x))     q linearly interpolated, 0 off the detector

The back-projection is pixel-driven, a different operator from the adjoint of the Joseph
projector.  ``fbp`` runs it through a cached :class:`mar_rt.ct.projector.Projector`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mar_rt.ct._checks import check_operand
from mar_rt.ct.geometry import FanBeamGeometry

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")


def check_filter(filter: str) -> str:
    """Return ``filter`` if it names a known window, else raise ValueError."""
    if filter not in FILTERS:
        raise ValueError(f"filter must be one of {', '.join(FILTERS)}; got {filter!r}")
    return filter


def padded_length(n_det: int) -> int:
    """P: the power of two ≥ 2·n_det (at least 64) used for the FFT."""
    return max(64, 1 << (2 * n_det - 1).bit_length())


def ramp_response(n_det: int, spacing: float, filter: str = "ram-lak") -> np.ndarray:
    """Real frequency response τ·FFT(h)·window on ``rfftfreq(P)``, float64 (P//2 + 1,), in cm⁻¹.

    ``spacing`` is τ, the bin spacing at the isocentre in cm.  The spatial Ram-Lak kernel
    (rather than a sampled |ω|) keeps the DC term right under zero padding.
    """
    check_filter(filter)
    size = padded_length(n_det)
    n = np.fft.fftfreq(size, d=1.0 / size)  # circular offsets 0, 1, …, −1
    h = np.zeros(size)
    h[0] = 1.0 / (4.0 * spacing**2)
    odd = n % 2 == 1
    h[odd] = -1.0 / (np.pi * n[odd] * spacing) ** 2
    response = spacing * np.fft.rfft(h).real
    freq = np.fft.rfftfreq(size)  # cycles per sample, 0 … 0.5
    if filter == "shepp-logan":
        response *= np.sinc(freq)
    elif filter == "cosine":
        response *= np.cos(np.pi * freq)
    elif filter == "hamming":
        response *= 0.54 + 0.46 * np.cos(2 * np.pi * freq)
    elif filter == "hann":
        response *= 0.5 + 0.5 * np.cos(2 * np.pi * freq)
    return response


def filter_sinogram(
    sinogram: torch.Tensor, geometry: FanBeamGeometry, filter: str = "ram-lak"
) -> torch.Tensor:
    """Cosine pre-weighting and ramp filtering along the detector: p (..., V, n) → q, cm⁻¹."""
    check_filter(filter)
    mag = geometry.source_distance / (geometry.source_distance + geometry.detector_distance)
    a = geometry.det_positions() * mag
    r = geometry.source_distance
    weight = torch.as_tensor(r / np.sqrt(r * r + a * a), dtype=sinogram.dtype)
    response = ramp_response(geometry.n_det, geometry.det_spacing * mag, filter)
    size = padded_length(geometry.n_det)
    spectrum = torch.fft.rfft(sinogram * weight.to(sinogram.device), n=size, dim=-1)
    spectrum *= torch.as_tensor(response, dtype=sinogram.dtype, device=sinogram.device)
    return torch.fft.irfft(spectrum, n=size, dim=-1)[..., : geometry.n_det]


def backprojection_entries(
    geometry: FanBeamGeometry,
    pixels: tuple[int, int],
    views: tuple[int, int],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of the pixel-driven back-projection matrix: row-major pixels [p0, p1) × views
    [k0, k1).

    Columns index (view k, bin j) as k·n + j.  Each pixel holds exactly two entries per view,
    (k·n + j_c, a) and (k·n + j_c + 1, b) with j_c = clamp(⌊pos⌋, 0, n − 2); interpolation
    neighbours off the detector get weight 0.  Returns column indices (int64) and weights
    (float64, the factor π/V included), both (p1 − p0, 2·(k1 − k0)), ascending along a row.
    """
    f64 = {"dtype": torch.float64, "device": device}
    p0, p1 = pixels
    w_cols, n_det = geometry.n_cols, geometry.n_det
    r, d = geometry.source_distance, geometry.detector_distance
    xs, ys = (torch.as_tensor(v, **f64) for v in geometry.pixel_centres())
    pix = torch.arange(p0, p1, device=device)
    xy = torch.stack([xs[pix % w_cols], ys[pix // w_cols]], dim=1)  # (P, 2)
    k0, k1 = views
    n_views = k1 - k0
    beta = torch.as_tensor(geometry.angles()[k0:k1], **f64)
    cos, sin = torch.cos(beta), torch.sin(beta)
    proj = xy @ torch.stack([torch.cat([cos, sin]), torch.cat([sin, -cos])])  # (P, 2K)
    t = proj[:, :n_views] + r  # x·θ + R
    pos = proj[:, n_views:] * (r + d) / t
    pos = (pos - geometry.det_offset) / geometry.det_spacing + (n_det - 1) / 2
    j0 = torch.floor(pos)
    frac = pos - j0
    j0 = j0.to(torch.int64)
    weight = (r * r * math.pi / geometry.n_views) / (t * t)
    col = torch.empty(p1 - p0, n_views, 2, dtype=torch.int64, device=device)
    val = torch.empty(p1 - p0, n_views, 2, **f64)
    torch.mul(frac, weight, out=val[..., 1])
    torch.sub(weight, val[..., 1], out=val[..., 0])
    torch.add(j0, torch.arange(k0, k1, device=device) * n_det, out=col[..., 0])

    # Off-detector neighbours get weight 0, and the pair stays on the detector.
    edge = torch.nonzero(((j0 < 0) | (j0 > n_det - 2)).reshape(-1)).squeeze(1)
    if edge.numel():
        flat_col, flat_val = col.view(-1, 2), val.view(-1, 2)
        j0e, ae, be = j0.reshape(-1)[edge], flat_val[edge, 0], flat_val[edge, 1]
        low, high = j0e == -1, j0e == n_det - 1
        zero = torch.zeros_like(ae)
        flat_val[edge, 0] = torch.where(low, be, zero)
        flat_val[edge, 1] = torch.where(high, ae, zero)
        first = flat_col[edge, 0] - j0e  # k·n: bin 0 of this view
        flat_col[edge, 0] = first + j0e.clamp(0, n_det - 2)
    col[..., 1] = col[..., 0] + 1
    return col.reshape(p1 - p0, -1), val.reshape(p1 - p0, -1)


def fbp(
    sinogram: torch.Tensor, geometry: FanBeamGeometry, *, filter: str = "ram-lak"
) -> torch.Tensor:
    """Fan-beam FBP: sinogram of line integrals (…, V, n) → μ image (…, H, W) in cm⁻¹.

    Filters: ``ram-lak``, ``shepp-logan``, ``cosine``, ``hamming``, ``hann``.
    Uses (and caches) a Projector for the sinogram's device and dtype.
    """
    check_operand(sinogram, geometry, "sinogram", "sinogram")
    check_filter(filter)
    # imported here: projector builds on this module's filter and entry functions
    from mar_rt.ct.projector import get_projector

    return get_projector(geometry, sinogram.device, sinogram.dtype).fbp(sinogram, filter=filter)
