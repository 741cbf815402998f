"""Which FP / FBP implementation and SDE step the pipeline uses on a device.

- ``kernels-gpu``: ``mar_rt.kernels.gpu`` (CuPy RawModule kernels on the current torch CUDA
  stream) with its fused ``sde_step``, when CuPy and the NVRTC build work;
- ``kernels-host``: ``mar_rt.kernels.host`` (the same kernels compiled for the CPU), when its
  library builds;
- ``ct``: ``mar_rt.ct.projector`` (torch, any device), the reference, always available.

Each projector offers ``forward(image)`` and ``fbp(sinogram, filter=...)`` on torch tensors.
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
    """The projector (``forward``, ``fbp`` on tensors on ``device``) and the optional fused
    SDE step of one device."""

    name: str
    projector: Any
    device: torch.device
    step_fn: Callable[..., torch.Tensor] | None = None

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
                return Operators("kernels-gpu", gpu.get_gpu_projector(geometry), device, _gpu_step)
            return why
        from mar_rt.kernels import host

        if host.cpu_fast_path_available():
            return Operators("kernels-host", host.get_host_projector(geometry), device)
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
