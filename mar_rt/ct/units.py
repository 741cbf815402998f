"""Unit conversions between HU, linear attenuation and network scales (DESIGN.md §3).

Notation:

    μ     linear attenuation at 70 keV, cm⁻¹          (``mu``)
    μw    water, MU_WATER = 0.192 cm⁻¹
    HU    (μ / μw − 1) · 1000                         (``hu``)
    x     image network scale, clip(μ, 0, 0.5) / 0.5   (``image_to_net``)
    p     sinogram line integral (dimensionless)
    y     sinogram network scale, clip(p, 0, 4) / 4    (``sino_to_net``)

Every function accepts a torch tensor, a numpy array or a Python number and returns the same
kind (numpy results are floating point; integer input is promoted to float32).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

MU_WATER = 0.192
"""μ of water at 70 keV in cm⁻¹ (the SynDeepLesion convention)."""

HU_MIN = -1000.0
"""HU is clipped here before conversion to μ (air)."""

IMAGE_NET_MAX_MU = 0.5
"""μ (cm⁻¹) that maps to 1 on the image network scale (+1604 HU)."""

SINO_NET_MAX = 4.0
"""Line integral that maps to 1 on the sinogram network scale."""

DEEPLESION_PNG_OFFSET = 32768
"""DeepLesion 16-bit PNG: HU = value − 32768."""

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray, float)


def _float(x: ArrayT) -> ArrayT:
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.to(torch.float32)
    if isinstance(x, np.ndarray):
        return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
    return float(x)


def _clip(x: ArrayT, lo: float | None, hi: float | None) -> ArrayT:
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, lo, hi)
    if isinstance(x, np.ndarray):
        return np.clip(x, lo, hi)
    value = float(x)
    if lo is not None:
        value = max(value, lo)
    if hi is not None:
        value = min(value, hi)
    return value


def hu_to_mu(hu: ArrayT, *, clip: bool = True) -> ArrayT:
    """HU → μ in cm⁻¹; HU is clipped at −1000 first, so μ ≥ 0 (``clip=False``: the exact
    inverse of :func:`mu_to_hu`, for values that must round-trip)."""
    value = _clip(_float(hu), HU_MIN, None) if clip else _float(hu)
    return (value / 1000.0 + 1.0) * MU_WATER


def mu_to_hu(mu: ArrayT) -> ArrayT:
    """μ in cm⁻¹ → HU (no clipping: negative μ from a reconstruction gives HU < −1000)."""
    return (_float(mu) / MU_WATER - 1.0) * 1000.0


def image_to_net(mu: ArrayT) -> ArrayT:
    """μ (cm⁻¹) → image network scale x = clip(μ, 0, 0.5) / 0.5 in [0, 1]."""
    return _clip(_float(mu), 0.0, IMAGE_NET_MAX_MU) / IMAGE_NET_MAX_MU


def net_to_image(x: ArrayT) -> ArrayT:
    """Image network scale → μ (cm⁻¹); x is clipped to [0, 1] first."""
    return _clip(_float(x), 0.0, 1.0) * IMAGE_NET_MAX_MU


def sino_to_net(p: ArrayT) -> ArrayT:
    """Line integral p → sinogram network scale y = clip(p, 0, 4) / 4 in [0, 1]."""
    return _clip(_float(p), 0.0, SINO_NET_MAX) / SINO_NET_MAX


def net_to_sino(y: ArrayT) -> ArrayT:
    """Sinogram network scale → line integral p; y is clipped to [0, 1] first."""
    return _clip(_float(y), 0.0, 1.0) * SINO_NET_MAX


def deeplesion_png_to_hu(value: ArrayT) -> ArrayT:
    """DeepLesion 16-bit PNG value → HU (value − 32768), as float32 for arrays."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float32) - DEEPLESION_PNG_OFFSET
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) - np.float32(DEEPLESION_PNG_OFFSET)
    return float(value) - DEEPLESION_PNG_OFFSET
