"""The one image resampler of mar-rt: a stack of slices onto another pixel grid over the same
field of view.

Every part that changes a slice's size (the runtime's study grid, training sources, the
simulator's inputs) calls :func:`resample_images`, so a slice read for training and a slice
read for correction land on the bundle grid the same way.

Convention: pixel edges are aligned (the outer edges of both grids coincide, as
``align_corners=False`` does), bilinear interpolation, with an antialiasing (triangle) filter
when shrinking.  The pixel size changes by the ratio of the shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def resample_images(images: Any, shape: tuple[int, int]) -> Any:
    """Resample ``images`` (H, W) or (N, H, W) to ``shape`` = (h, w), same field of view.

    numpy in → float32 numpy out; a torch tensor in → float32 tensor on its device.  A stack
    already at ``shape`` comes back as a float32 copy.  Resampling is computed in float32.
    """
    shape = (int(shape[0]), int(shape[1]))
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"resample_images: target shape must be positive, got {shape}")
    is_numpy = not isinstance(images, torch.Tensor)
    x = torch.from_numpy(np.ascontiguousarray(images)) if is_numpy else images
    if x.ndim not in (2, 3):
        raise ValueError(f"resample_images: expected (H, W) or (N, H, W), got {tuple(x.shape)}")
    squeeze = x.ndim == 2
    x = x.to(torch.float32)
    if squeeze:
        x = x[None]
    if tuple(x.shape[-2:]) == shape:
        y = x.clone()
    else:
        y = F.interpolate(
            x[:, None], size=shape, mode="bilinear", align_corners=False, antialias=True
        )[:, 0]
    if squeeze:
        y = y[0]
    return y.numpy() if is_numpy else y


def resample_masks(masks: Any, shape: tuple[int, int]) -> Any:
    """Bool masks (H, W) or (N, H, W) on ``shape``: :func:`resample_images` of the 0/1 mask,
    kept where ≥ 0.5.  numpy in → numpy out, tensor in → tensor out."""
    if isinstance(masks, torch.Tensor):
        return resample_images(masks.to(torch.float32), shape) >= 0.5
    return resample_images(np.asarray(masks, dtype=np.float32), shape) >= 0.5
