"""Metal artifact simulation, the SynDeepLesion protocol (Zhang & Yu 2018; DESIGN.md §5).

Notation (DESIGN §5):

    X          clean image, μ at 70 keV in cm⁻¹                      (``image_mu``)
    M          metal mask, bool                                       (``mask``)
    t_w, t_b   μ(100 HU), μ(1500 HU): the water/bone split thresholds
    X_w, X_b   water and bone maps; f = (X − t_w)/(t_b − t_w) clipped to [0, 1],
               X_b = f·X, X_w = (1 − f)·X, both zero under M
    S(E)       GE 120 kVp spectrum, 1-keV bins, E = 20..120 keV
    p_w(E)     FP(X_w)·μ_water(E)/μ_water(70)
    p_b(E)     FP(X_b)·μ_bone(E)/μ_bone(70)
    p_m(E)     L·μ_metal(E), L = FP(M) path length in cm (÷4 on the trace edge)
    p          −ln(Σ_E S(E)·e^{−p_w−p_b−p_m} / Σ_E S(E))
    N0, N_s    photons (2e7) and scatter photons (20) per bin
    BHC        p ↦ a1·p + a2·p² + a3·p³, the water beam-hardening correction

Steps:

1. material split; 2. polychromatic projection (FP of X_w, X_b and M once each);
3. partial volume: metal path length ÷ 4 on the trace edge (a trace bin whose detector
   neighbour on either side is outside the trace; bins at the detector ends count their
   missing neighbour as inside); 4. noise N = Poisson(round(e^{−p}·N0) + N_s), 0 → 1,
   p = −ln(N/N0), independently for the metal-free and the metal sinogram; 5. BHC on both;
6. outputs: ma_CT = FBP(ma_sinogram), metal_trace = FP(M) > 0, LI_sinogram = LI(ma_sinogram),
   LI_CT, poly_sinogram and poly_CT, and the target ``image``.

Noise comes from ``numpy.random.default_rng(seed)`` (drawn on the host), so a seed gives the same
noise on every device; the metal-free sinogram's noise is drawn first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mar_rt.ct import physics
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.mar import (
    as_tensor,
    check_finite,
    check_mask_edge,
    fbp_with,
    forward_with,
    li_inpaint,
    resolve_projector,
)
from mar_rt.ct.units import hu_to_mu

_SDL = FanBeamGeometry.syndeeplesion()

WATER_HU, BONE_HU = 100.0, 1500.0
"""HU of the water/bone split thresholds t_w and t_b."""

PARTIAL_VOLUME_DIVISOR = 4.0
"""The metal path length on the trace edge is divided by this."""


def split_materials(
    image_mu: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: (X_w, X_b) from X: ≤ t_w water, ≥ t_b bone, linear blend between; 0 under M."""
    t_w, t_b = hu_to_mu(WATER_HU), hu_to_mu(BONE_HU)
    f = torch.clamp((image_mu - t_w) / (t_b - t_w), 0.0, 1.0)
    bone = torch.where(mask, torch.zeros_like(image_mu), f * image_mu)
    water = torch.where(mask, torch.zeros_like(image_mu), image_mu - f * image_mu)
    return water, bone


def trace_edge(trace: torch.Tensor) -> torch.Tensor:
    """Step 3: trace bins removed by a 3-bin erosion along the detector (bool, like ``trace``)."""
    left = torch.nn.functional.pad(trace[..., :-1], (1, 0), value=True)
    right = torch.nn.functional.pad(trace[..., 1:], (0, 1), value=True)
    return trace & ~(left & right)


def polychromatic(
    fp_water: torch.Tensor, fp_bone: torch.Tensor, metal_path_cm: torch.Tensor, material: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: (p without metal, p with metal), p = −ln(Σ_E S(E)·e^{−p_w−p_b−p_m} / Σ_E S(E)).

    float64. Bins with zero metal path share the metal-free value exactly. A bin whose
    intensity underflows to 0 gets +inf (the noise step turns it into scatter counts).
    """
    energies, counts = physics.spectrum()
    weights = counts / counts.sum()
    ref = physics.REFERENCE_KEV
    r_w = physics.linear_attenuation("water", energies) / physics.linear_attenuation("water", ref)
    r_b = physics.linear_attenuation("bone", energies) / physics.linear_attenuation("bone", ref)
    mu_m = physics.linear_attenuation(material, energies)
    fw, fb = fp_water.to(torch.float64), fp_bone.to(torch.float64)
    metal = metal_path_cm > 0
    lm = metal_path_cm.to(torch.float64)[metal]

    def spectral_sum(terms: list[tuple[torch.Tensor, np.ndarray]]) -> torch.Tensor:
        """Σ_E S(E)·exp(−Σ_t x_t·c_t(E)) over the flattened bins, a few energies per call."""
        n = terms[0][0].numel()
        step = max(1, 2**22 // max(n, 1))
        total = torch.zeros(n, dtype=torch.float64, device=fw.device)
        for e0 in range(0, energies.size, step):
            sl = slice(e0, e0 + step)
            q = sum(x.reshape(-1, 1) * torch.from_numpy(c[sl]).to(x.device)[None] for x, c in terms)
            total += torch.exp(-q) @ torch.from_numpy(weights[sl]).to(fw.device)
        return total

    i_free = spectral_sum([(fw, r_w), (fb, r_b)]).reshape(fw.shape)
    i_metal = spectral_sum([(fw[metal], r_w), (fb[metal], r_b), (lm, mu_m)])
    p_free = -torch.log(i_free)
    p_metal = p_free.clone()
    p_metal[metal] = -torch.log(i_metal)
    return p_free, p_metal


def add_noise(
    p: torch.Tensor, rng: np.random.Generator, photons: float, scatter: float
) -> torch.Tensor:
    """Step 4: N = Poisson(round(e^{−p}·N0) + N_s), zeros → 1, p = −ln(N/N0) (float64)."""
    expected = np.round(np.exp(-p.detach().cpu().numpy()) * photons) + scatter
    counts = rng.poisson(expected).astype(np.float64)
    counts[counts == 0] = 1.0
    return torch.from_numpy(-np.log(counts / photons)).to(p.device)


def expected_counts(p: torch.Tensor, photons: float, scatter: float) -> torch.Tensor:
    """Step 4 without noise: p = −ln((round(e^{−p}·N0) + N_s)/N0), the log of the mean counts."""
    return -torch.log((torch.round(torch.exp(-p) * photons) + scatter) / photons)


def water_bhc(p: torch.Tensor) -> torch.Tensor:
    """Step 5: a1·p + a2·p² + a3·p³ with :func:`physics.water_bhc_coefficients`."""
    a1, a2, a3 = physics.water_bhc_coefficients()
    return p * (a1 + p * (a2 + p * a3))


def simulate_metal_artifact(
    image_mu: Any,
    mask: Any,
    *,
    geometry: FanBeamGeometry = _SDL,
    material: str = "Ti",
    seed: int | np.random.SeedSequence = 0,
    photons: float = 2e7,
    scatter: float = 20.0,
    noise: bool = True,
    filter: str = "ram-lak",
    projector: Any | None = None,
    allow_edge: bool = False,
) -> dict[str, torch.Tensor]:
    """Simulate a metal-affected scan of ``image_mu`` with implant ``mask`` (DESIGN §5 steps 1–6).

    ``image_mu`` (H, W) or (B, H, W), μ in cm⁻¹ at 70 keV (numpy or torch); ``mask`` bool of the
    same shape; ``material`` one of ``physics.METALS``. ``noise=False`` uses the expected
    counts instead of Poisson draws. ``projector`` (a ``mar_rt.ct.projector.Projector`` for
    ``geometry``) is reused when given; otherwise the shared one on the image's device.

    Returns float32 tensors on the projector's device, with the official names ``image``,
    ``poly_sinogram``, ``poly_CT``, ``ma_sinogram``, ``ma_CT``, ``LI_sinogram``, ``LI_CT``,
    plus bool ``metal_trace`` and ``mask``. Deterministic for a given seed.

    ValueError: shapes that do not match the geometry or each other, NaN/inf, an empty mask,
    metal on the image edge (unless ``allow_edge``), an unknown or non-metal material.
    """
    metal = physics.material_name(material)
    if metal not in physics.METALS:
        raise ValueError(
            f"material {material!r} is not an implant metal; choose one of "
            f"{', '.join(physics.METALS)}"
        )
    x = as_tensor(image_mu, "image_mu")
    geometry.check_image(tuple(x.shape), "image_mu")
    check_finite(x, "image_mu")
    m = as_tensor(mask, "mask")
    if tuple(m.shape) != tuple(x.shape):
        raise ValueError(f"mask has shape {tuple(m.shape)}, image_mu {tuple(x.shape)}")
    m = (m if m.dtype == torch.bool else m > 0.5).to(x.device)
    per_item = m.reshape(-1, *m.shape[-2:]).flatten(1).any(1)
    if not bool(per_item.all()):
        raise ValueError("mask has no metal pixels (in at least one slice); nothing to simulate")
    if not allow_edge:
        check_mask_edge(m)
    if not (photons > 0 and scatter >= 0):
        raise ValueError(f"photons must be > 0 and scatter ≥ 0, got {photons}, {scatter}")
    proj = resolve_projector(geometry, projector, x.device)
    rng = np.random.default_rng(seed)

    # 1. materials; 2. one projection each of water, bone and metal (one batched call)
    x = x.to(device=proj.device, dtype=torch.float64)
    m = m.to(proj.device)
    water, bone = split_materials(x, m)
    hw = x.shape[-2:]
    stacked = torch.stack([water, bone, m.to(torch.float64)]).reshape(-1, *hw)
    fp_w, fp_b, path = (
        forward_with(proj, stacked).reshape(3, *x.shape[:-2], *geometry.sino_shape).unbind(0)
    )
    trace = path > 0
    # 3. partial volume on the trace edge
    path = torch.where(trace_edge(trace), path / PARTIAL_VOLUME_DIVISOR, path)
    path = torch.where(trace, path, torch.zeros_like(path))
    p_poly, p_ma = polychromatic(fp_w, fp_b, path, metal)
    # 4. noise; 5. water beam-hardening correction
    if noise:
        p_poly, p_ma = (add_noise(p, rng, photons, scatter) for p in (p_poly, p_ma))
    else:
        p_poly, p_ma = (expected_counts(p, photons, scatter) for p in (p_poly, p_ma))
    poly_sino, ma_sino = water_bhc(p_poly).to(proj.dtype), water_bhc(p_ma).to(proj.dtype)
    # 6. outputs (one batched FBP)
    li_sino = li_inpaint(ma_sino, trace)
    recon = fbp_with(
        proj, torch.stack([poly_sino, ma_sino, li_sino]).reshape(-1, *geometry.sino_shape), filter
    )
    poly_ct, ma_ct, li_ct = recon.reshape(3, *x.shape).unbind(0)
    f32 = torch.float32
    return {
        "image": x.to(f32),
        "poly_sinogram": poly_sino.to(f32),
        "poly_CT": poly_ct.to(f32),
        "ma_sinogram": ma_sino.to(f32),
        "ma_CT": ma_ct.to(f32),
        "LI_sinogram": li_sino.to(f32),
        "LI_CT": li_ct.to(f32),
        "metal_trace": trace,
        "mask": m,
    }
