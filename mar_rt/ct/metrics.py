"""Image quality metrics in the SynDeepLesion convention (DESIGN.md §3).

Notation:

    X, Y     prediction and target, μ in cm⁻¹, [row, col]
    M        metal mask (bool); metal pixels are set to 0 in both images
    x, y     clip(μ, 0, 0.5) / 0.5 with x[M] = y[M] = 0, so L (data range) = 1
    PSNR     10·log10(1 / MSE(x, y)) over the whole image
    SSIM     Wang et al. 2004: Gaussian window 11×11, σ = 1.5, K1 = 0.01, K2 = 0.03, computed
             after an f×f box downsample, f = max(1, round(max(H, W) / 256)); the mean is taken
             over the 'valid' window positions (no padding)
    size     metal pixel count at 416²; ``SIZE_GROUPS`` (from ``masks``) bins it for reporting

Inputs may be numpy arrays or torch tensors, (H, W) or (B, H, W); the mask broadcasts. A 2-D
input gives a Python float, a batch gives a float64 numpy array (B,).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from mar_rt.ct.masks import SIZE_GROUPS, SizeGroup, size_group
from mar_rt.ct.units import IMAGE_NET_MAX_MU

__all__ = [
    "SIZE_GROUPS",
    "SizeGroup",
    "aggregate_by_size",
    "box_downsample",
    "metric_images",
    "psnr",
    "size_group",
    "ssim",
]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)


def _tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be (H, W) or (B, H, W), got shape {tuple(x.shape)}")
    return x


def metric_images(
    pred_mu: Any, target_mu: Any, mask: Any | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): both images clipped to [0, 0.5] cm⁻¹, divided by 0.5, metal set to 0; float64."""
    x = _tensor(pred_mu, "pred_mu")
    y = _tensor(target_mu, "target_mu").to(x.device)
    if x.shape != y.shape:
        raise ValueError(f"pred_mu has shape {tuple(x.shape)} but target_mu {tuple(y.shape)}")
    for t, name in ((x, "pred_mu"), (y, "target_mu")):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")
    x = torch.clamp(x.to(torch.float64), 0.0, IMAGE_NET_MAX_MU) / IMAGE_NET_MAX_MU
    y = torch.clamp(y.to(torch.float64), 0.0, IMAGE_NET_MAX_MU) / IMAGE_NET_MAX_MU
    if mask is not None:
        m = _tensor(mask, "mask").to(x.device)
        if m.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"mask has shape {tuple(m.shape)}, images {tuple(x.shape)}")
        m = m if m.dtype == torch.bool else m > 0.5
        x = x.masked_fill(m, 0.0)
        y = y.masked_fill(m, 0.0)
    return x, y


def _result(values: torch.Tensor, batched: bool) -> float | np.ndarray:
    return values.cpu().numpy() if batched else float(values.reshape(()))


def psnr(pred_mu: Any, target_mu: Any, mask: Any | None = None) -> float | np.ndarray:
    """PSNR in dB = 10·log10(1 / MSE) on the metric images (inf if they are identical)."""
    x, y = metric_images(pred_mu, target_mu, mask)
    mse = ((x - y) ** 2).mean(dim=(-2, -1))
    return _result(10.0 * torch.log10(1.0 / mse), x.ndim == 3)


def box_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean over non-overlapping ``factor``×``factor`` blocks (trailing rows/cols dropped)."""
    if factor <= 1:
        return x
    h, w = (x.shape[-2] // factor) * factor, (x.shape[-1] // factor) * factor
    flat = x[..., :h, :w].reshape(-1, 1, h, w)
    return torch.nn.functional.avg_pool2d(flat, factor).reshape(*x.shape[:-2], h // factor, -1)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    r = torch.arange(SSIM_WINDOW, dtype=dtype, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(r**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g)[None, None]


def ssim(pred_mu: Any, target_mu: Any, mask: Any | None = None) -> float | np.ndarray:
    """SSIM (Wang 2004) on the metric images after the box downsample; see module notation."""
    x, y = metric_images(pred_mu, target_mu, mask)
    factor = max(1, round(max(x.shape[-2:]) / 256))
    x, y = box_downsample(x, factor), box_downsample(y, factor)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"images too small for SSIM: {tuple(x.shape[-2:])} after downsampling by {factor}, "
            f"need at least {SSIM_WINDOW}×{SSIM_WINDOW}"
        )
    win = _gaussian_window(x.dtype, x.device)
    xs, ys = x.reshape(-1, 1, *x.shape[-2:]), y.reshape(-1, 1, *y.shape[-2:])

    def filt(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, win)

    mu_x, mu_y = filt(xs), filt(ys)
    var_x = filt(xs * xs) - mu_x**2
    var_y = filt(ys * ys) - mu_y**2
    cov = filt(xs * ys) - mu_x * mu_y
    c1, c2 = SSIM_K[0] ** 2, SSIM_K[1] ** 2
    s_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return _result(s_map.mean(dim=(-3, -2, -1)), x.ndim == 3)


def aggregate_by_size(
    records: Iterable[Mapping[str, Any]],
    *,
    size_key: str = "metal_px",
    metrics: tuple[str, ...] = ("psnr", "ssim"),
) -> dict[str, dict[str, float]]:
    """Mean of each metric per size group, large to small, plus ``"mean"`` over all records.

    Each record maps ``size_key`` to a metal pixel count and each name in ``metrics`` to a
    value. Returns ``{group_label: {metric: mean, "n": count}}``; groups without records are
    omitted. Records missing a key raise ValueError naming it.
    """
    rows = list(records)
    sums: dict[str, dict[str, float]] = {}
    for i, rec in enumerate(rows):
        for key in (size_key, *metrics):
            if key not in rec:
                raise ValueError(f"record {i} has no {key!r}")
        for label in (size_group(float(rec[size_key])), "mean"):
            acc = sums.setdefault(label, {m: 0.0 for m in metrics} | {"n": 0.0})
            for m in metrics:
                acc[m] += float(rec[m])
            acc["n"] += 1
    order = [g.label for g in SIZE_GROUPS] + ["mean"]
    out: dict[str, dict[str, float]] = {}
    for label in order:
        if label in sums:
            acc = sums[label]
            out[label] = {m: acc[m] / acc["n"] for m in metrics} | {"n": acc["n"]}
    return out
