"""OSRO, the one-step residual optimisation of DuDoCROP (DESIGN.md §8), as pure tensor functions.

Notation (DESIGN §8; our reading of the paper, arXiv 2408.14342):

    Y_ma, Y_p      measured sinogram and the sinogram-domain prior   (B, V, D)
    Tr             metal trace, bool                                 (B, V, D)
    Y_f            (1 − Tr)⊙Y_ma + Tr⊙Y_p                (Eq. 13)   ``fidelity_sinogram``
                   or, with ``fidelity_prior="image"``, LI(Y_ma / P)·P, P = FP(X_p) + 1e−6
                   (NMAR's normalisation, X_p as the prior)  ``prior_normalised_sinogram``
    X_p, X'_p      image-domain prior and FBP(Y_f)                   (B, H, W), μ in cm⁻¹
    M              metal mask; statistics use the non-metal pixels ¬M
    Norm(a → b)    a rescaled to b's mean and std over ¬M            ``match_stats``
    X̃_p            Norm¹(X_p → X'_p)
    R, R̂           X̃_p − X'_p and its IR-SDE refinement              ``residual_to_net`` / back
    X̂_p            X'_p + R̂                              (Eq. 16)
    X_out          α·Norm²(X̂_p → X_p) + (1 − α)·X_p                  ``fuse``
"""

from __future__ import annotations

import torch

from mar_rt.ct.mar import normalised_inpaint
from mar_rt.ct.units import MU_WATER

_STD_FLOOR = 1e-12


def fidelity_sinogram(y_ma: torch.Tensor, y_p: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    """Y_f = (1 − Tr)⊙Y_ma + Tr⊙Y_p: measured data outside the trace, the prior inside (Eq. 13)."""
    return torch.where(trace, y_p, y_ma)


def image_prior(x_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """X_p as a prior image: metal pixels set to water and negatives to 0 (B, H, W), cm⁻¹."""
    water = torch.full_like(x_p, MU_WATER)
    return torch.where(mask, water, x_p).clamp(min=0.0)


def prior_normalised_sinogram(
    y_ma: torch.Tensor, y_prior: torch.Tensor, trace: torch.Tensor
) -> torch.Tensor:
    """Y_ma outside the trace, and inside it NMAR's normalised interpolation of Y_ma with
    ``y_prior`` (FP of the prior image) as the shape (``mar_rt.ct.mar.normalised_inpaint``;
    Meyer et al. 2010, steps 5–6; DESIGN §6). (B, V, D)."""
    return torch.where(trace, normalised_inpaint(y_ma, y_prior, trace), y_ma)


def masked_mean_std(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice mean and population std of ``x`` (B, H, W) over ``valid`` → (B, 1, 1) each."""
    w = valid.to(x.dtype)
    n = w.sum(dim=(-2, -1), keepdim=True).clamp(min=1.0)
    mean = (x * w).sum(dim=(-2, -1), keepdim=True) / n
    var = (((x - mean) * w) ** 2).sum(dim=(-2, -1), keepdim=True) / n
    return mean, var.sqrt()


def match_stats(src: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Norm(src → ref): (src − m_src)/s_src · s_ref + m_ref, statistics over ``valid`` per slice.

    A constant ``src`` (s_src = 0) is shifted to m_ref only.
    """
    m_s, s_s = masked_mean_std(src, valid)
    m_r, s_r = masked_mean_std(ref, valid)
    gain = torch.where(s_s > _STD_FLOOR, s_r / s_s.clamp(min=_STD_FLOOR), torch.ones_like(s_s))
    return (src - m_s) * gain + m_r


def residual_to_net(residual: torch.Tensor, scale: float) -> torch.Tensor:
    """R (cm⁻¹) → the residual network's scale, clip(R / scale, −1, 1)."""
    return torch.clamp(residual / scale, -1.0, 1.0)


def net_to_residual(r_net: torch.Tensor, scale: float) -> torch.Tensor:
    """The residual network's output → R̂ in cm⁻¹ (clip to [−1, 1], times ``scale``)."""
    return torch.clamp(r_net, -1.0, 1.0) * scale


def fuse(x_hat_norm: torch.Tensor, x_p: torch.Tensor, alpha: float) -> torch.Tensor:
    """X_out = α·Norm²(X̂_p) + (1 − α)·X_p (step 6)."""
    return alpha * x_hat_norm + (1.0 - alpha) * x_p
