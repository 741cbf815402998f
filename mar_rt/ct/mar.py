"""Classical metal artifact reduction: segmentation, metal trace, LI and NMAR (DESIGN.md §6).

Notation:

    X      image, μ in cm⁻¹, [row, col]                 (``image_mu``)
    M      metal mask, bool [row, col]                   (``mask``)
    P      measured sinogram, line integrals [view, det]  (``sinogram``)
    Tr     metal trace, FP(M) > 0                         (``trace``)
    LI(·)  per view, linear interpolation along the detector across Tr
    μw     water, 0.192 cm⁻¹

Inputs may be numpy arrays or torch tensors (any device); results are torch tensors on the
input's device. Leading batch dimensions are allowed where a docstring says ``(..., V, D)``.

Bad input policy:

- shape mismatches, NaN/inf → ValueError naming the array;
- an empty mask → ``li_correct``/``nmar_correct`` pass the input through unchanged and set
  ``metal_found=False`` in the result (and log it);
- metal touching the image edge → ValueError naming the mask and the edge, unless
  ``allow_edge=True`` (metal cut by the field of view has an incomplete trace).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import torch

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.projector import get_projector as shared_projector
from mar_rt.ct.units import MU_WATER

log = logging.getLogger(__name__)

METAL_THRESHOLD_MU = 0.672
"""μ (cm⁻¹) above which a pixel counts as metal: 2500 HU."""

MIN_METAL_PIXELS = 5
"""Connected metal components smaller than this are dropped as noise."""


# --- validation helpers -------------------------------------------------------------------
NMAR_EPS = 1e-6
"""Added to the prior's projection before NMAR divides by it (DESIGN §6 step 5)."""


def as_tensor(x: Any, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` as a torch tensor (numpy is converted; tensors keep their device)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    return t if dtype is None else t.to(dtype)


def check_finite(x: torch.Tensor, name: str) -> None:
    """ValueError if ``x`` holds NaN or inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN or inf value(s)")


def check_mask_edge(mask: torch.Tensor, name: str = "mask") -> None:
    """ValueError if any metal pixel lies on the first/last row or column of ``mask``."""
    edges = {
        "top row": mask[..., 0, :],
        "bottom row": mask[..., -1, :],
        "left column": mask[..., :, 0],
        "right column": mask[..., :, -1],
    }
    touching = [where for where, pixels in edges.items() if bool(pixels.any())]
    if touching:
        raise ValueError(
            f"{name}: metal touches the image edge ({', '.join(touching)}); the metal may extend "
            "beyond the field of view, so its trace is incomplete. Pass allow_edge=True to proceed."
        )


def _mask_tensor(mask: Any, image_shape: tuple[int, ...], name: str = "mask") -> torch.Tensor:
    m = as_tensor(mask, name)
    if tuple(m.shape) != tuple(image_shape):
        raise ValueError(f"{name} has shape {tuple(m.shape)}, expected {tuple(image_shape)}")
    if m.dtype != torch.bool:
        check_finite(m, name)
        m = m > 0.5
    return m


def forward_with(proj: Any, x: torch.Tensor) -> torch.Tensor:
    """FP(x) with ``proj``, cast to the projector's dtype and device."""
    return proj.forward(x.to(device=proj.device, dtype=proj.dtype))


def fbp_with(proj: Any, p: torch.Tensor, filter: str) -> torch.Tensor:
    """FBP(p) with ``proj``, cast to the projector's dtype and device."""
    return proj.fbp(p.to(device=proj.device, dtype=proj.dtype), filter=filter)


def resolve_projector(
    geometry: FanBeamGeometry,
    projector: Any | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """``projector`` if given (its geometry must equal ``geometry``), else the shared one for
    (geometry, device, dtype) from :func:`mar_rt.ct.projector.get_projector`."""
    if projector is not None:
        if projector.geometry != geometry:
            raise ValueError("projector was built for another geometry than the one passed")
        return projector
    return shared_projector(geometry, device=device, dtype=dtype)


# --- segmentation and trace -----------------------------------------------------------------
def segment_metal(
    image_mu: Any, threshold: float = METAL_THRESHOLD_MU, min_pixels: int = MIN_METAL_PIXELS
) -> torch.Tensor:
    """Metal mask of an image: μ > ``threshold`` (cm⁻¹), 8-connected components ≥ ``min_pixels``.

    ``image_mu`` (..., H, W) → bool tensor of the same shape on the same device.
    """
    x = as_tensor(image_mu, "image_mu")
    check_finite(x, "image_mu")
    if x.ndim < 2:
        raise ValueError(f"image_mu must be at least 2-D (H, W), got shape {tuple(x.shape)}")
    raw = (x > threshold).cpu().numpy().reshape(-1, *x.shape[-2:])
    out = np.zeros_like(raw)
    for i, plane in enumerate(raw):
        labels, n = ndi.label(plane, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_pixels
        keep[0] = False
        out[i] = keep[labels]
    return torch.from_numpy(out.reshape(x.shape)).to(x.device)


def metal_trace(
    mask: Any, geometry: FanBeamGeometry, *, projector: Any | None = None
) -> torch.Tensor:
    """Tr = FP(M) > 0: bool (..., V, D) sinogram of the bins whose ray crosses metal."""
    m = as_tensor(mask, "mask")
    geometry.check_image(tuple(m.shape), "mask")
    proj = resolve_projector(geometry, projector, m.device)
    return forward_with(proj, m) > 0


# --- linear interpolation -------------------------------------------------------------------
def li_inpaint(sinogram: Any, trace: Any) -> torch.Tensor:
    """LI(P): per view, linear interpolation along the detector across the trace bins.

    Each trace bin j takes P[l] + (P[r] − P[l])·(j − l)/(r − l), where l and r are the nearest
    non-trace bins to its left and right in the same view. A run that reaches the detector end
    takes the nearest outside value; a view that lies wholly in the trace is left unchanged.
    ``sinogram`` (..., V, D) float, ``trace`` bool of the same shape → tensor like ``sinogram``.
    Computed in float64, returned in the sinogram's dtype.
    """
    p = as_tensor(sinogram, "sinogram")
    tr = as_tensor(trace, "trace").to(p.device)
    if tuple(tr.shape) != tuple(p.shape):
        raise ValueError(
            f"trace has shape {tuple(tr.shape)} but sinogram has shape {tuple(p.shape)}"
        )
    if p.ndim < 2:
        raise ValueError(f"sinogram must be at least 2-D (views, bins), got {tuple(p.shape)}")
    check_finite(p, "sinogram")
    tr = tr if tr.dtype == torch.bool else tr > 0.5
    out_dtype = p.dtype if p.is_floating_point() else torch.float32
    n_det = p.shape[-1]
    j = torch.arange(n_det, device=p.device).expand(p.shape)
    outside = ~tr
    left = torch.cummax(torch.where(outside, j, torch.full_like(j, -1)), dim=-1).values
    right_src = torch.where(outside, j, torch.full_like(j, n_det)).flip(-1)
    right = torch.cummin(right_src, dim=-1).values.flip(-1)
    has_l, has_r = left >= 0, right < n_det
    p64 = p.to(torch.float64)
    pl = torch.gather(p64, -1, left.clamp(min=0))
    pr = torch.gather(p64, -1, right.clamp(max=n_det - 1))
    w = (j - left).to(torch.float64) / (right - left).clamp(min=1).to(torch.float64)
    interp = torch.where(has_l & has_r, pl + (pr - pl) * w, torch.where(has_l, pl, pr))
    interp = torch.where(has_l | has_r, interp, p64)
    return torch.where(tr, interp, p64).to(out_dtype)


def _prepare(
    image_mu: Any, mask: Any, geometry: FanBeamGeometry, sinogram: Any | None, allow_edge: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = as_tensor(image_mu, "image_mu")
    geometry.check_image(tuple(x.shape), "image_mu")
    check_finite(x, "image_mu")
    x = x if x.is_floating_point() else x.to(torch.float32)
    m = _mask_tensor(mask, tuple(x.shape)).to(x.device)
    if not allow_edge:
        check_mask_edge(m)
    p = None
    if sinogram is not None:
        p = as_tensor(sinogram, "sinogram").to(x.device)
        geometry.check_sinogram(tuple(p.shape), "sinogram")
        if p.shape[:-2] != x.shape[:-2]:
            raise ValueError(
                f"sinogram batch shape {tuple(p.shape[:-2])} differs from image_mu's "
                f"{tuple(x.shape[:-2])}"
            )
        check_finite(p, "sinogram")
        p = p if p.is_floating_point() else p.to(torch.float32)
    return x, m, p


def _li(
    x: torch.Tensor, m: torch.Tensor, p: torch.Tensor | None, proj: Any, filter: str
) -> dict[str, Any]:
    synthetic = p is None
    if p is None:
        p = forward_with(proj, x)
    if not bool(m.any()):
        log.info("no metal found (empty mask); passing the input through unchanged")
        return {
            "li_sinogram": p,
            "li_image": x,
            "trace": torch.zeros(p.shape, dtype=torch.bool, device=p.device),
            "metal_found": False,
            "synthetic_sinogram": synthetic,
            "sinogram": p,
        }
    trace = forward_with(proj, m) > 0
    li_sino = li_inpaint(p, trace)
    return {
        "li_sinogram": li_sino,
        "li_image": fbp_with(proj, li_sino, filter),
        "trace": trace,
        "metal_found": True,
        "synthetic_sinogram": synthetic,
        "sinogram": p,
    }


def li_correct(
    image_mu: Any,
    mask: Any,
    geometry: FanBeamGeometry,
    sinogram: Any | None = None,
    *,
    projector: Any | None = None,
    filter: str = "ram-lak",
    allow_edge: bool = False,
) -> dict[str, Any]:
    """Linear-interpolation MAR: LI across Tr = FP(M) > 0, then FBP.

    ``image_mu`` (..., H, W) is the metal-affected image (μ, cm⁻¹); ``sinogram`` (..., V, D) the
    measured one. Without ``sinogram`` the image is forward projected (``synthetic_sinogram``
    True). Returns dict ``li_sinogram``, ``li_image``, ``trace``, ``metal_found``,
    ``synthetic_sinogram`` and ``sinogram`` (the one used). An empty mask passes the input
    through: ``li_image`` is ``image_mu`` itself and ``metal_found`` is False.
    """
    x, m, p = _prepare(image_mu, mask, geometry, sinogram, allow_edge)
    proj = resolve_projector(geometry, projector, x.device)
    return _li(x, m, p, proj, filter)


# --- NMAR -------------------------------------------------------------------------------------
def kmeans_1d(values: torch.Tensor, centres: tuple[float, ...], iters: int = 200) -> list[int]:
    """Lloyd's k-means on 1-D ``values`` from sorted initial ``centres``.

    In 1-D each class is a run of the sorted values, cut at the midpoints between centres
    (a value on a midpoint goes to the lower class, as argmin does). Returns the start index
    of every class in ``torch.sort(values)`` plus ``len(values)``; an empty class keeps its
    centre.  Runs on the CPU whatever the device of ``values`` (one copy; the iterations
    then need no device synchronisation).
    """
    v = torch.sort(values.detach().reshape(-1).to("cpu", torch.float64)).values
    cs = torch.cat([v.new_zeros(1), torch.cumsum(v, 0)])
    c = list(centres)
    cuts: list[int] = []
    for _ in range(iters):
        mids = torch.tensor([(c[i] + c[i + 1]) / 2 for i in range(len(c) - 1)], dtype=v.dtype)
        new = [0, *torch.searchsorted(v, mids, right=True).tolist(), v.numel()]
        if new == cuts:
            break
        cuts = new
        for k in range(len(c)):
            n = cuts[k + 1] - cuts[k]
            if n:
                c[k] = float(cs[cuts[k + 1]] - cs[cuts[k]]) / n
    return cuts


def _gaussian_5x5(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    g = torch.exp(-(r**2) / (2 * sigma**2))
    k2 = torch.outer(g, g)
    k2 = (k2 / k2.sum())[None, None]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    padded = torch.nn.functional.pad(flat, (2, 2, 2, 2), mode="replicate")
    return torch.nn.functional.conv2d(padded, k2).reshape(x.shape)


def normalised_inpaint(sinogram: Any, prior_sinogram: Any, trace: Any) -> torch.Tensor:
    """NMAR steps 5–6: P_prior = max(``prior_sinogram``, 0) + ``NMAR_EPS``, then
    LI(P / P_prior) · P_prior. Shapes as :func:`li_inpaint` (``prior_sinogram`` like P)."""
    p_prior = torch.clamp(prior_sinogram, min=0) + NMAR_EPS
    return li_inpaint(sinogram / p_prior, trace) * p_prior


def nmar_prior(li_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NMAR prior image (DESIGN §6 steps 1–4) from a 2-D LI image and its metal mask.

    1. metal pixels of X_LI → μw; 2. 3-class k-means from (0, μw, 2μw):
    thresh_bone = max(min(class 3), 1.2μw), thresh_water = min(class 2); 3. 5×5 Gaussian σ=1
    (replicate border); 4. prior = 0 below thresh_water, μw between, smoothed value above
    thresh_bone.
    """
    x = torch.where(mask, torch.full_like(li_image, MU_WATER), li_image).to(torch.float64)
    v = torch.sort(x.reshape(-1).cpu()).values
    cuts = kmeans_1d(v, (0.0, MU_WATER, 2 * MU_WATER))
    bone_min = float(v[cuts[2]]) if cuts[3] > cuts[2] else float("inf")
    thresh_bone = max(bone_min, 1.2 * MU_WATER)
    thresh_water = float(v[cuts[1]]) if cuts[2] > cuts[1] else MU_WATER
    smooth = _gaussian_5x5(x)
    prior = torch.where(smooth > thresh_bone, smooth, torch.full_like(smooth, MU_WATER))
    prior = torch.where(smooth < thresh_water, torch.zeros_like(smooth), prior)
    return prior.to(li_image.dtype)


def nmar_correct(
    image_mu: Any,
    mask: Any,
    geometry: FanBeamGeometry,
    sinogram: Any | None = None,
    *,
    projector: Any | None = None,
    filter: str = "ram-lak",
    allow_edge: bool = False,
) -> dict[str, Any]:
    """Normalised MAR (Meyer et al. 2010) as DESIGN §6: LI → prior → normalise → LI → FBP.

    Arguments as :func:`li_correct`. Steps 5–7: P_prior = max(FP(prior), 0) + 1e−6;
    P_nmar = LI(P / P_prior) · P_prior; X_nmar = FBP(P_nmar). Returns the LI dict plus
    ``nmar_sinogram``, ``nmar_image`` and ``prior``. An empty mask passes the input through.
    """
    x, m, p = _prepare(image_mu, mask, geometry, sinogram, allow_edge)
    proj = resolve_projector(geometry, projector, x.device)
    li = _li(x, m, p, proj, filter)
    if not li["metal_found"]:
        return li | {"nmar_sinogram": li["li_sinogram"], "nmar_image": x, "prior": None}
    p_nmar, x_nmar, prior = nmar_from_li(
        li["sinogram"], li["li_image"], m, li["trace"], proj, filter
    )
    return li | {"nmar_sinogram": p_nmar, "nmar_image": x_nmar, "prior": prior}


def nmar_from_li(
    sinogram: torch.Tensor,
    li_image: torch.Tensor,
    mask: torch.Tensor,
    trace: torch.Tensor,
    projector: Any,
    filter: str = "ram-lak",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NMAR steps 1–7 from an LI result already at hand: (P_nmar, X_nmar, prior).

    ``sinogram`` P (..., V, D) and ``trace`` (bool, same shape), ``li_image`` X_LI and ``mask``
    (bool) (..., H, W); ``projector`` has ``forward``/``fbp`` (and ``device``/``dtype``). Every
    slice must contain metal (callers pass the others through).
    """
    prior = torch.stack(
        [
            nmar_prior(a, b)
            for a, b in zip(
                li_image.reshape(-1, *li_image.shape[-2:]),
                mask.reshape(-1, *mask.shape[-2:]),
                strict=True,
            )
        ]
    ).reshape(li_image.shape)
    p_nmar = normalised_inpaint(sinogram, forward_with(projector, prior), trace)
    return p_nmar, fbp_with(projector, p_nmar, filter), prior
