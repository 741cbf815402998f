"""The FBP's ramp filter: windows, FFT length, cosine pre-weighting (DESIGN.md §4).

Notation (lengths in cm; R, D and n as in fbp.py, where the whole FBP is defined):

    a_j     u_j · R/(R + D)          bin centre scaled to the isocentre
    τ       du · R/(R + D)           bin spacing at the isocentre
    p'      p · R/√(R² + a²)         cosine pre-weighted sinogram
    h       Ram-Lak kernel: h[0] = 1/(4τ²), h[odd n] = −1/(π n τ)², h[even n ≠ 0] = 0
    q       τ · (p' ⊛ h) · window    filtered sinogram, applied by FFT with zero padding to
                                     P = 2^k ≥ 2n

The references (``mar_rt.ct.projector``) and the kernels (``mar_rt.kernels``) share these
functions, so every FBP filters the same way.
"""

from __future__ import annotations

import numpy as np
import torch

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
