"""Input validation shared by the ct operators: plain ValueError naming the array."""

from __future__ import annotations

from typing import Literal

import torch

from mar_rt.ct.geometry import FanBeamGeometry

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_operand(
    x: object, geometry: FanBeamGeometry, kind: Literal["image", "sinogram"], name: str
) -> torch.Tensor:
    """Refuse anything but a finite float32/float64 tensor of shape (H, W)/(B, H, W) (images)
    or (V, D)/(B, V, D) (sinograms) matching ``geometry``; return it unchanged."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.ndim not in (2, 3):
        dims = "(H, W) or (B, H, W)" if kind == "image" else "(V, D) or (B, V, D)"
        raise ValueError(f"{name} must have shape {dims}, got {tuple(x.shape)} ({x.ndim} dims)")
    if kind == "image":
        geometry.check_image(tuple(x.shape), name)
    else:
        geometry.check_sinogram(tuple(x.shape), name)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return x
