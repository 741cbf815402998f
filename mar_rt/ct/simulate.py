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

Settings (``mar_rt.ct.sim_settings.SimulationSettings``; the defaults are the steps above):

    f          ``upsample``: X is bilinearly upsampled f×, M repeated f×f, and steps 1–2 run on
               that grid (same field of view and detector), so the projector that makes the
               data is not the one that reconstructs them
    K_u, K_v   ``detector_aperture`` (bins) and ``view_aperture`` (views): blurs applied to
               FP(X_w) and FP(X_b) (and to L with ``aperture_on_metal``) along the detector and
               along the rotation, before step 3
    S_f(E)     S(E)·exp(−μ_f(E)·t_f), the pre-filtered spectrum; BHC is fitted to it
    BHC_b      ``bhc="water+bone"``: after the water BHC, p += (P̂_w + P̂_b) − BHC(poly(P̂_w, P̂_b)),
               P̂ = FP of the water/bone split of FBP(p) (metal pixels zeroed)
    N_s(k)     N_s + ``scatter_fraction``·mean_j round(e^{−p_kj}·N0), per view k
"""

from __future__ import annotations

import dataclasses
import math
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
from mar_rt.ct.projector import get_projector as shared_projector
from mar_rt.ct.sim_settings import SimulationSettings
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
    fp_water: torch.Tensor,
    fp_bone: torch.Tensor,
    metal_path_cm: torch.Tensor,
    material: str,
    *,
    spectrum_kev: tuple[np.ndarray, np.ndarray] | None = None,
    metal_density: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: (p without metal, p with metal), p = −ln(Σ_E S(E)·e^{−p_w−p_b−p_m} / Σ_E S(E)).

    float64. Bins with zero metal path share the metal-free value exactly. A bin whose
    intensity underflows to 0 gets +inf (the noise step turns it into scatter counts).
    ``spectrum_kev`` (energies, counts) defaults to ``physics.spectrum()``; ``metal_density``
    (g/cm³) to the table density of ``material``.
    """
    energies, counts = physics.spectrum() if spectrum_kev is None else spectrum_kev
    weights = counts / counts.sum()
    ref = physics.REFERENCE_KEV
    r_w = physics.linear_attenuation("water", energies) / physics.linear_attenuation("water", ref)
    r_b = physics.linear_attenuation("bone", energies) / physics.linear_attenuation("bone", ref)
    mu_m = physics.linear_attenuation(material, energies, metal_density)
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


def water_bhc(
    p: torch.Tensor, coefficients: tuple[float, float, float] | None = None
) -> torch.Tensor:
    """Step 5: a1·p + a2·p² + a3·p³ with ``coefficients`` (default
    :func:`physics.water_bhc_coefficients` of the unfiltered spectrum)."""
    a1, a2, a3 = physics.water_bhc_coefficients() if coefficients is None else coefficients
    return p * (a1 + p * (a2 + p * a3))


def aperture_kernel(width: float, shape: str = "box") -> np.ndarray:
    """Taps (odd length, sum 1, float64) of an aperture blur on a unit-spaced sampled signal.

    ``box``: the mean of the linearly interpolated signal over a window ``width`` samples wide,
    k[n] = (1/w)∫_{−w/2}^{w/2} Λ(n − s) ds, Λ the unit hat (exact, in closed form); width 0
    gives [1]. ``gaussian``: exp(−n²/2σ²) normalised, FWHM = ``width`` samples.
    """
    if not (math.isfinite(width) and width >= 0):
        raise ValueError(f"aperture width must be ≥ 0 samples, got {width}")
    if width == 0:
        return np.ones(1)
    if shape == "gaussian":
        sigma = width / (2 * math.sqrt(2 * math.log(2)))
        n = np.arange(-math.ceil(4 * sigma), math.ceil(4 * sigma) + 1, dtype=np.float64)
        k = np.exp(-0.5 * (n / sigma) ** 2)
        return k / k.sum()
    if shape != "box":
        raise ValueError(f"aperture shape must be 'box' or 'gaussian', got {shape!r}")
    half = width / 2
    reach = math.ceil(half + 1) - 1  # Λ(n − s) > 0 somewhere on |s| ≤ w/2 only for |n| ≤ reach
    n = np.arange(-reach, reach + 1, dtype=np.float64)

    def hat_integral(t: np.ndarray) -> np.ndarray:
        """∫_{−∞}^{t} Λ(s) ds."""
        t = np.clip(t, -1.0, 1.0)
        return np.where(t < 0, 0.5 * (1 + t) ** 2, 1 - 0.5 * (1 - t) ** 2)

    k = (hat_integral(half - n) - hat_integral(-half - n)) / width
    return k / k.sum()


def blur_sinograms(
    sino: torch.Tensor, detector_taps: np.ndarray, view_taps: np.ndarray
) -> torch.Tensor:
    """Convolve (…, V, D) sinograms with ``detector_taps`` along D (zero outside the detector)
    and ``view_taps`` along V (circular: the views cover a full turn)."""
    out = sino
    if detector_taps.size > 1:
        k = torch.as_tensor(detector_taps, dtype=sino.dtype, device=sino.device)
        x = out.reshape(-1, 1, out.shape[-1])
        x = torch.nn.functional.conv1d(x, k.flip(0)[None, None], padding=k.numel() // 2)
        out = x.reshape(sino.shape)
    if view_taps.size > 1:
        half = view_taps.size // 2
        out = sum(
            float(w) * torch.roll(out, shifts=half - i, dims=-2) for i, w in enumerate(view_taps)
        )
    return out


def upsample_image(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(…, H, W) → (…, f·H, f·W) by bilinear interpolation over the same field (pixel areas
    aligned: ``align_corners=False``)."""
    flat = x.reshape(-1, 1, *x.shape[-2:])
    up = torch.nn.functional.interpolate(
        flat, scale_factor=factor, mode="bilinear", align_corners=False
    )
    return up.reshape(*x.shape[:-2], *up.shape[-2:])


def upsample_mask(m: torch.Tensor, factor: int) -> torch.Tensor:
    """(…, H, W) bool → (…, f·H, f·W), each pixel repeated f×f (the metal area is kept)."""
    return m.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def bone_bhc(
    p_water_corrected: torch.Tensor,
    mask: torch.Tensor,
    proj: Any,
    filter: str,
    spectrum_kev: tuple[np.ndarray, np.ndarray],
    coefficients: tuple[float, float, float],
) -> torch.Tensor:
    """The water + bone correction (Joseph & Spital 1978) of water-corrected line integrals.

    1. X̂ = FBP(p), split into water and bone maps (step 1, metal pixels zeroed);
    2. P̂_w, P̂_b = FP of each (line integrals at 70 keV);
    3. p + (P̂_w + P̂_b) − BHC(poly(P̂_w, P̂_b)): the polychromatic error the water-only
       correction leaves, estimated from the image. float64 in, float64 out.
    """
    sino_shape = proj.geometry.sino_shape
    flat = p_water_corrected.reshape(-1, *sino_shape)
    first = fbp_with(proj, flat, filter).to(torch.float64)
    water, bone = split_materials(first, mask.reshape(-1, *mask.shape[-2:]))
    both = forward_with(proj, torch.cat([water, bone])).to(torch.float64)
    est_w, est_b = both.chunk(2)
    poly, _ = polychromatic(est_w, est_b, torch.zeros_like(est_w), "Ti", spectrum_kev=spectrum_kev)
    delta = est_w + est_b - water_bhc(poly, coefficients)
    return p_water_corrected + delta.reshape(p_water_corrected.shape)


def scatter_counts(
    p: torch.Tensor, photons: float, scatter: float, fraction: float
) -> float | torch.Tensor:
    """N_s per bin: ``scatter`` photons, plus ``fraction`` of each view's mean primary counts
    round(e^{−p}·N0) (float64 (…, V, 1)) when ``fraction`` > 0."""
    if fraction == 0:
        return scatter
    primary = torch.round(torch.exp(-p) * photons).mean(dim=-1, keepdim=True)
    return scatter + fraction * primary


def simulate_metal_artifact(
    image_mu: Any,
    mask: Any,
    *,
    geometry: FanBeamGeometry = _SDL,
    material: str | None = None,
    seed: int | np.random.SeedSequence = 0,
    photons: float | None = None,
    scatter: float | None = None,
    noise: bool = True,
    filter: str | None = None,
    projector: Any | None = None,
    allow_edge: bool = False,
    settings: SimulationSettings | None = None,
) -> dict[str, torch.Tensor]:
    """Simulate a metal-affected scan of ``image_mu`` with implant ``mask`` (DESIGN §5 steps 1–6).

    ``image_mu`` (H, W) or (B, H, W), μ in cm⁻¹ at 70 keV (numpy or torch); ``mask`` bool of the
    same shape. ``settings`` (default ``SimulationSettings()``, the protocol) holds the physics
    (spectrum filtration, resolution, BHC, photons and scatter, partial volume, FBP kernel, metal
    and density); ``material`` (one of ``physics.METALS``), ``photons``, ``scatter`` and
    ``filter``, when given, override the fields of the same name. ``noise=False`` uses the
    expected counts instead of Poisson draws. ``projector`` (a
    ``mar_rt.ct.projector.Projector`` for ``geometry``) is reused when given; otherwise the shared
    one on the image's device. With ``settings.upsample`` f > 1 the data are projected by the
    shared projector of the f× finer grid (same detector, same dtype and device).

    Returns float32 tensors on the projector's device, with the official names ``image``,
    ``poly_sinogram``, ``poly_CT``, ``ma_sinogram``, ``ma_CT``, ``LI_sinogram``, ``LI_CT``,
    plus bool ``metal_trace`` and ``mask`` (on the reconstruction grid). Deterministic for a given
    seed.

    ValueError: shapes that do not match the geometry or each other, NaN/inf, an empty mask,
    metal on the image edge (unless ``allow_edge``), an unknown or non-metal material, invalid
    settings.
    """
    given = {"material": material, "photons": photons, "scatter": scatter, "filter": filter}
    overrides = {k: v for k, v in given.items() if v is not None}
    cfg = SimulationSettings() if settings is None else settings
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
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
    proj = resolve_projector(geometry, projector, x.device)
    rng = np.random.default_rng(seed)
    spectrum_kev = physics.filtered_spectrum(cfg.prefilter_material, cfg.prefilter_cm)
    bhc_coefficients = physics.water_bhc_coefficients(spectrum_kev=spectrum_kev)

    # 1. materials; 2. one projection each of water, bone and metal (one batched call), on the
    # f× grid when upsampling, then the detector and view apertures
    x = x.to(device=proj.device, dtype=torch.float64)
    m = m.to(proj.device)
    xs, ms, data_proj = x, m, proj
    if cfg.upsample > 1:
        f = cfg.upsample
        fine = geometry.with_image_size(geometry.n_rows * f, geometry.n_cols * f)
        data_proj = shared_projector(fine, device=proj.device, dtype=proj.dtype)
        xs, ms = upsample_image(x, f), upsample_mask(m, f)
    water, bone = split_materials(xs, ms)
    hw = xs.shape[-2:]
    stacked = torch.stack([water, bone, ms.to(torch.float64)]).reshape(-1, *hw)
    fp = forward_with(data_proj, stacked)
    fp_w, fp_b, path = fp.reshape(3, *x.shape[:-2], *geometry.sino_shape).unbind(0)
    if not cfg.is_protocol_resolution:
        taps = (
            aperture_kernel(cfg.detector_aperture, cfg.aperture_shape),
            aperture_kernel(cfg.view_aperture),
        )
        fp_w, fp_b = blur_sinograms(torch.stack([fp_w, fp_b]), *taps).unbind(0)
        if cfg.aperture_on_metal:
            path = blur_sinograms(path, *taps)
    trace = path > 0
    # 3. partial volume on the trace edge
    if cfg.partial_volume:
        path = torch.where(trace_edge(trace), path / PARTIAL_VOLUME_DIVISOR, path)
    path = torch.where(trace, path, torch.zeros_like(path))
    p_poly, p_ma = polychromatic(
        fp_w, fp_b, path, cfg.material, spectrum_kev=spectrum_kev, metal_density=cfg.metal_density
    )
    # 4. noise (scatter photons included); 5. beam-hardening correction
    n0 = cfg.photons
    scat = [scatter_counts(p, n0, cfg.scatter, cfg.scatter_fraction) for p in (p_poly, p_ma)]
    if noise:
        p_poly, p_ma = (
            add_noise(p, rng, n0, s if isinstance(s, float) else s.cpu().numpy())
            for p, s in zip((p_poly, p_ma), scat, strict=True)
        )
    else:
        p_poly, p_ma = (
            expected_counts(p, n0, s) for p, s in zip((p_poly, p_ma), scat, strict=True)
        )
    if cfg.bhc == "none":
        poly_sino, ma_sino = p_poly.to(proj.dtype), p_ma.to(proj.dtype)
    else:
        p_poly, p_ma = water_bhc(p_poly, bhc_coefficients), water_bhc(p_ma, bhc_coefficients)
        if cfg.bhc == "water+bone":
            p_poly, p_ma = (
                bone_bhc(p, m, proj, cfg.filter, spectrum_kev, bhc_coefficients)
                for p in (p_poly, p_ma)
            )
        poly_sino, ma_sino = p_poly.to(proj.dtype), p_ma.to(proj.dtype)
    # 6. outputs (one batched FBP)
    li_sino = li_inpaint(ma_sino, trace)
    recon = fbp_with(
        proj,
        torch.stack([poly_sino, ma_sino, li_sino]).reshape(-1, *geometry.sino_shape),
        cfg.filter,
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


def metal_free_scan(
    image_mu: Any,
    mask: Any,
    *,
    settings: SimulationSettings,
    geometry: FanBeamGeometry = _SDL,
    projector: Any | None = None,
    filter: str = "ram-lak",
) -> dict[str, torch.Tensor]:
    """The metal-free image a scanner with ``settings`` would make of ``image_mu``, without noise.

    Runs :func:`simulate_metal_artifact` with expected counts (``noise=False``) and keeps its
    metal-free scan: ``poly_sinogram`` (E[Y], the scanner's calibration, i.e. its
    beam-hardening correction and scatter, and its resolution, i.e. grid, apertures and
    partial volume), ``poly_CT`` = FBP(E[Y]) with the settings' own kernel, and ``image`` =
    FBP(E[Y]) with ``filter`` (a pipeline that reconstructs the scanner's sinogram with its own
    kernel sees this one). The implant's pixels are empty in all three, as in
    ``simulate_metal_artifact``'s metal-free scan. Shapes and units as there.
    """
    proj = resolve_projector(geometry, projector, as_tensor(image_mu, "image_mu").device)
    sim = simulate_metal_artifact(
        image_mu, mask, geometry=geometry, settings=settings, noise=False, projector=proj,
        allow_edge=True,
    )  # fmt: skip
    own = sim["poly_CT"]
    image = own if filter == settings.filter else fbp_with(proj, sim["poly_sinogram"], filter)
    return {"poly_sinogram": sim["poly_sinogram"], "poly_CT": own, "image": image.to(own.dtype)}
