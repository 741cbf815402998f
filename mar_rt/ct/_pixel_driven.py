"""Pixel-driven fan-beam back-projection weights, as sparse-matrix entries (internal to ``ct``).

Notation: fbp.py (t, u(x) and f(x), the back-projection these entries implement).
"""

from __future__ import annotations

import math

import torch

from mar_rt.ct.geometry import FanBeamGeometry


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
