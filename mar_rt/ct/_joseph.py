"""Joseph interpolation weights of fan-beam rays, as sparse-matrix entries (internal to ``ct``).

Notation (lengths in cm; the definition is in projector.py):

    ray       (view k, bin j), numbered k·n_det + j over the tabulated views
    branch    column (|d_x| ≥ |d_y|) or row; its *primary* axis is stepped pixel by pixel
              (columns c or rows ρ), its *secondary* axis is interpolated
    step κ    primary index: c in the column branch, ρ in the row branch
    pos(κ)    fractional secondary index, affine in κ:  pos = α + β·κ
                column branch  r(c) = (H−1)/2 − y(c)/Δ,  β = −d_y/d_x
                row branch     q(ρ) = x(ρ)/Δ + (W−1)/2,  β = −d_x/d_y
    scale     Δ·L/|d_primary|
    layout    the matrix columns index [vec(I); vec(Iᵀ)]: a row-branch sample (ρ, q0) is
              ρ·W + q0 and a column-branch sample (r0, c) is H·W + c·H + r0, so that both
              interpolation neighbours are adjacent

Each sample (ray, κ) gives exactly two entries, (e, a) and (e + 1, b) with e = layout index of
(κ, i_c), i_c = clamp(⌊pos⌋, 0, n_sec − 2): the neighbours that fall off the image get weight 0
(so only ≤ 2 zero entries per ray, at the clipped ends).  Steps outside the ray's clip range
[κ_lo, κ_hi) are never generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mar_rt.ct.geometry import FanBeamGeometry


@dataclass(frozen=True)
class Rays:
    """Per-ray parameters (float64/int64 on one device) for the first ``n_views`` views."""

    column: torch.Tensor  # bool, column branch
    alpha: torch.Tensor
    beta: torch.Tensor
    scale: torch.Tensor
    k_lo: torch.Tensor  # int64, first step that may be nonzero
    k_hi: torch.Tensor  # int64, one past the last such step
    n_views: int


def ray_parameters(geometry: FanBeamGeometry, n_views: int, device: torch.device) -> Rays:
    """Branch, affine secondary index, scale and clip range of every ray of views 0..n_views-1."""
    f64 = {"dtype": torch.float64, "device": device}
    h, w, px = geometry.n_rows, geometry.n_cols, geometry.pixel_size
    src = torch.as_tensor(geometry.source_positions()[:n_views], **f64)
    det = torch.as_tensor(geometry.detector_points()[:n_views], **f64)
    n_det = det.shape[1]
    d = (det - src[:, None, :]).reshape(-1, 2)
    sx, sy = (src[:, i].repeat_interleave(n_det) for i in (0, 1))
    dx, dy = d[:, 0], d[:, 1]
    column = dx.abs() >= dy.abs()
    d_p = torch.where(column, dx, dy)
    slope = torch.where(column, dy, dx) / d_p
    alpha = torch.where(
        column,
        (h - 1) / 2 - sy / px + (sx / px + (w - 1) / 2) * slope,
        sx / px + (w - 1) / 2 + ((h - 1) / 2 - sy / px) * slope,
    )
    beta = -slope
    scale = px * torch.hypot(dx, dy) / d_p.abs()

    # Steps κ with −1 < pos(κ) < n_sec; floor() keeps at least one step of margin each side.
    n_prim = torch.where(column, w, h).to(torch.float64)
    n_sec = torch.where(column, h, w).to(torch.float64)
    flat = beta == 0
    safe = torch.where(flat, 1.0, beta)
    a, b = (-1 - alpha) / safe, (n_sec - alpha) / safe
    lo = torch.minimum(torch.where(beta > 0, a, b).clamp(min=-1), n_prim)
    hi = torch.minimum(torch.where(beta > 0, b, a).clamp(min=-1), n_prim)
    inside = (alpha > -1) & (alpha < n_sec)
    k_lo = torch.where(flat, torch.where(inside, 0.0, n_prim), torch.floor(lo).clamp(min=0))
    k_hi = torch.where(flat, torch.where(inside, n_prim, 0.0), torch.floor(hi) + 1).clamp(
        max=n_prim
    )
    k_lo, k_hi = k_lo.to(torch.int64), k_hi.to(torch.int64)
    return Rays(column, alpha, beta, scale, k_lo, torch.maximum(k_hi, k_lo), n_views)


def branch_samples(
    rays: Rays,
    geometry: FanBeamGeometry,
    ray_ids: torch.Tensor,
    column: bool,
    steps: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples of the rays ``ray_ids`` (all of one branch), in (ray, step) order.

    ``steps`` = (κ0, κ1) keeps only those steps.  Returns, per sample, the position of its ray
    in ``ray_ids`` (int64), the layout index e of its first entry (int64) and the weights a, b
    (float64) — the sample adds a·z[e] + b·z[e + 1] — and the number of samples per ray.
    """
    h, w = geometry.n_rows, geometry.n_cols
    n_sec, offset = (h, h * w) if column else (w, 0)
    k_lo, k_hi = rays.k_lo.index_select(0, ray_ids), rays.k_hi.index_select(0, ray_ids)
    if steps is not None:
        k_lo, k_hi = k_lo.clamp(min=steps[0]), k_hi.clamp(max=steps[1])
    counts = (k_hi - k_lo).clamp(min=0)
    device = counts.device
    local = torch.repeat_interleave(torch.arange(ray_ids.numel(), device=device), counts)

    def per_sample(values: torch.Tensor) -> torch.Tensor:
        return values.index_select(0, ray_ids).index_select(0, local)

    k = torch.arange(local.numel(), device=device)
    k -= (torch.cumsum(counts, 0) - counts - k_lo).index_select(0, local)
    pos = per_sample(rays.beta) * k
    pos += per_sample(rays.alpha)
    i0 = torch.floor(pos)
    frac = pos.sub_(i0)
    i0 = i0.to(torch.int64)
    b = per_sample(rays.scale)
    a = b.clone()
    b *= frac
    a -= b
    e = k.mul_(n_sec).add_(i0 + offset)  # k is not needed beyond this point

    # Clipped ends: a neighbour off the image gets weight 0 and e is kept inside the step.
    edge = torch.nonzero((i0 < 0) | (i0 > n_sec - 2)).squeeze(1)
    if edge.numel():
        i0e, ae, be = i0[edge], a[edge], b[edge]
        zero = torch.zeros_like(ae)
        low = i0e == -1  # only the upper neighbour (secondary index 0) is on the image
        high = i0e == n_sec - 1  # only the lower neighbour is
        a[edge] = torch.where(low, be, zero)
        b[edge] = torch.where(high, ae, zero)
        shift = torch.where(low, 1, torch.where(high, -1, 0))
        # a step wholly off the image (the clip margin) keeps weights 0 and e inside the step
        step_start = e[edge] - i0e  # k·n_sec + offset
        e[edge] = torch.where(low | high, e[edge] + shift, step_start)
    return local, e, a, b, counts


def check_grid(geometry: FanBeamGeometry) -> None:
    """The two-entry layouts need at least two rows, columns and detector bins."""
    if geometry.n_rows < 2 or geometry.n_cols < 2 or geometry.n_det < 2:
        raise ValueError(
            "geometry: the projector needs at least 2 image rows, 2 columns and 2 detector "
            f"bins, got {geometry.n_rows} × {geometry.n_cols} and {geometry.n_det} bins"
        )
