"""Which CT operators the pipeline uses on a device: FP / FBP, the metal trace, LI, OSRO's
statistics matching and fusion, and the SDE step.

- ``kernels-gpu``: ``mar_rt.kernels.gpu`` (CuPy RawModule kernels on the current torch CUDA
  stream) with its fused ``sde_step``, when CuPy and the NVRTC build work;
- ``kernels-host``: ``mar_rt.kernels.host`` (the same kernels compiled for the CPU), when its
  library builds;
- ``ct``: ``mar_rt.ct`` and ``mar_rt.runtime.osro`` (torch, any device), the reference, always
  available.

Each projector offers ``forward(image)`` and ``fbp(sinogram, filter=...)`` on torch tensors.
:class:`Operators` adds the pipeline's other stages, each the kernel of the chosen build or,
for ``ct``, the torch reference it is tested against (DESIGN §8 notation):

    trace(M)                 Tr = FP(M) > 0                       (B, H, W) → bool (B, V, D)
    li(Y, Tr)                LI along the detector across Tr      (B, V, D) → (B, V, D)
    match_stats(a, b, ¬M)    Norm(a → b) over the non-metal pixels  (B, H, W) → (B, H, W)
    fuse(a, b, α)            α·a + (1 − α)·b                      same shape → same shape
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.errors import BackendUnavailableError

log = logging.getLogger(__name__)

OPERATOR_CHOICES = ("auto", "kernels", "ct")


@dataclass(frozen=True, eq=False)
class Operators:
    """The operators of one device: the projector (``forward``, ``fbp`` on tensors on
    ``device``), the optional fused SDE step, and the trace / LI / statistics / fusion stages.

    ``kernels`` is the kernel module (``mar_rt.kernels.gpu`` or ``.host``) whose ``metal_trace``,
    ``li_inpaint``, ``match_stats`` and ``fuse`` the stage methods call; None means the torch
    reference (``ct``).  Every method takes and returns torch tensors on ``device``.
    """

    name: str
    projector: Any
    device: torch.device
    step_fn: Callable[..., torch.Tensor] | None = None
    kernels: Any = None

    def trace(self, mask: torch.Tensor) -> torch.Tensor:
        """Tr = FP(M) > 0: bool (B, V, D) for a metal mask (B, H, W), bool or 0/1."""
        if self.kernels is not None:
            return self.kernels.metal_trace(mask, self.projector.geometry)
        return self.projector.forward(mask.to(torch.float32)) > 0

    def li(self, sinogram: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
        """LI(Y): per view, linear interpolation along the detector across the ``trace`` bins
        of ``sinogram`` (B, V, D) float32 line integrals; the other bins are returned as is."""
        if self.kernels is not None:
            return self.kernels.li_inpaint(sinogram, trace)
        from mar_rt.ct.mar import li_inpaint

        return li_inpaint(sinogram, trace)

    def match_stats(
        self, src: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Norm(src → ref): ``src`` (B, H, W) rescaled to ``ref``'s mean and std over the
        ``valid`` (non-metal) pixels, per slice (OSRO steps 2 and 5)."""
        if self.kernels is not None:
            return self.kernels.match_stats(src, ref, valid)
        from mar_rt.runtime import osro

        return osro.match_stats(src, ref, valid)

    def fuse(self, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
        """α·a + (1 − α)·b, elementwise (OSRO step 6: a = Norm²(X̂_p), b = X_p)."""
        if self.kernels is not None:
            return self.kernels.fuse(a, b, alpha)
        from mar_rt.runtime import osro

        return osro.fuse(a, b, alpha)

    def ct_view(self) -> _CtView:
        """The projector with the attributes ``mar_rt.ct`` functions read (``geometry``,
        ``device``, ``dtype``), so ``simulate_metal_artifact`` and ``nmar_correct`` can take it
        as their ``projector=``."""
        return _CtView(self.projector, self.device)


class _CtView:
    """``forward`` / ``fbp`` of a kernel projector, float32 on one device, ct-style."""

    dtype = torch.float32

    def __init__(self, projector: Any, device: torch.device) -> None:
        self._projector = projector
        self.device = device
        self.geometry = projector.geometry

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self._projector.forward(image)

    def fbp(self, sinogram: torch.Tensor, filter: str = "ram-lak") -> torch.Tensor:
        return self._projector.fbp(sinogram, filter=filter)


def _gpu_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    mu: torch.Tensor,
    a: float,
    b: float,
    c: float,
    z: torch.Tensor | None,
) -> torch.Tensor:
    from mar_rt.kernels import gpu

    return gpu.sde_step(x, eps, mu, a, b, c, z, out=x)


def _kernels(geometry: FanBeamGeometry, device: torch.device) -> Operators | str:
    """The kernel operators for ``device``, or why they are not available."""
    try:
        if device.type == "cuda":
            from mar_rt.kernels import gpu

            ok, why = gpu.gpu_available()
            if ok:
                projector = gpu.get_gpu_projector(geometry)
                return Operators("kernels-gpu", projector, device, _gpu_step, kernels=gpu)
            return why
        from mar_rt.kernels import host

        if host.cpu_fast_path_available():
            return Operators(
                "kernels-host", host.get_host_projector(geometry), device, kernels=host
            )
        return "the host build of the kernels is not available"
    except (ImportError, BackendUnavailableError, OSError) as exc:
        return str(exc)


def select_operators(
    geometry: FanBeamGeometry, device: str | torch.device, *, prefer: str = "auto"
) -> Operators:
    """Operators for ``geometry`` on ``device``.

    ``prefer``: ``auto`` (kernels when they work, else ct), ``kernels`` (refuse without them:
    BackendUnavailableError) or ``ct`` (the torch reference).
    """
    if prefer not in OPERATOR_CHOICES:
        raise BackendUnavailableError(
            f"operators must be one of {OPERATOR_CHOICES}, got {prefer!r}"
        )
    device = torch.device(device)
    if prefer != "ct":
        found = _kernels(geometry, device)
        if isinstance(found, Operators):
            return found
        if prefer == "kernels":
            raise BackendUnavailableError(f"kernels requested on {device}, but {found}")
        log.debug("kernels not used on %s: %s", device, found)
    from mar_rt.ct.projector import get_projector

    return Operators("ct", get_projector(geometry, device, torch.float32), device)
