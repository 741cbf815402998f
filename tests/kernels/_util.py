"""Helpers of the kernel tests: test images and error measures."""

from __future__ import annotations

import numpy as np
import torch


def phantom(h: int, w: int, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    """Smooth ellipses plus noise, float32 (H, W) or (B, H, W), μ-like values in [0, 0.6]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for _ in range(batch or 1):
        img = np.zeros((h, w))
        for _ in range(4):
            cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
            ry, rx = rng.uniform(0.1, 0.35) * h, rng.uniform(0.1, 0.35) * w
            img += rng.uniform(0.05, 0.2) * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
        img += 0.02 * rng.standard_normal((h, w))
        out.append(img)
    arr = np.stack(out).astype(np.float32)
    return torch.from_numpy(arr if batch else arr[0])


def rel_error(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
