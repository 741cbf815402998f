"""The runtime side of the reverse IR-SDE: backend graphs → ``denoise(x_t, t)`` → the loop.

``mar_rt.models.sde.sample_posterior`` is a plain loop over precomputed coefficients and knows
nothing about backends (STYLE points 1–2). This module wraps a domain's two graphs:

    cond = unet_<domain>_cond(content_emb, artifact_emb)        once per image
    ε̂    = unet_<domain>_step(x_t, μ, t, cond)                  once per step (``GraphDenoiser``)

and drives the loop with preallocated buffers, an in-place affine update and noise from one
seeded ``torch.Generator`` per loop on the loop's device. Nothing inside the loop reads a
value back to the host, so on CUDA the loop is a stream of kernel launches.

Samplers (``PipelineConfig.sampler``, DESIGN §7.3): both are the same affine loop
(``sample_posterior``) over different precomputed coefficients (``step_coefficients``):

    posterior   a, b, c of the posterior q(x_{t−1} | x_t, x̂₀); the last step returns x̂₀
    euler       Euler–Maruyama on the reverse SDE dx = [θ_t(μ − x) − σ_t² score]dt + σ_t dw̄,
                score = −ε̂/σ̄_t:  a = 1 + θ_tΔ, b = σ_t²Δ/σ̄_t, c = σ_t√Δ (every step noisy)

Notation (DESIGN.md §7.3; ``mar_rt.models.sde``):

    μ            ``mu``    the image the SDE reverts to (network scale)
    x_T          μ + λ z   start state, λ = max_sigma / 255
    a_k, b_k, c_k          step k's scalars: x ← μ + a_k (x − μ) − b_k ε̂ + c_k z
    t_in[k]                network time of step k (t · T / S)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from mar_rt.export.graphs import cond_graph, step_graph
from mar_rt.models.sde import (
    SDEConfig,
    StepCoefficients,
    euler_maruyama_coefficients,
    make_schedule,
    posterior_coefficients,
    sample_posterior,
)
from mar_rt.runtime.backends.base import Backend
from mar_rt.runtime.config import SAMPLERS

DOMAIN_SEED_OFFSETS = {"image": 1_000_003, "sinogram": 2_000_003, "residual": 3_000_017}
"""Fixed per-domain offsets added to the pipeline seed: one independent generator per loop."""

ProgressFn = Callable[[str, int, int], None]
"""``progress(domain, step_index, n_steps)``, called after each step (host side, no sync)."""


def loop_generator(seed: int, domain: str, device: torch.device | str) -> torch.Generator:
    """The seeded generator of one loop: seed + ``DOMAIN_SEED_OFFSETS[domain]`` on ``device``."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed) + DOMAIN_SEED_OFFSETS[domain])
    return gen


def step_coefficients(sde: SDEConfig, steps: int, sampler: str = "posterior") -> StepCoefficients:
    """The S = ``steps`` per-step scalars (a, b, c, t_in) of ``sampler`` (``SAMPLERS``) for the
    bundle's SDE; S ≠ T rebuilds the schedule with S steps and feeds the network t·T/S."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    schedule = make_schedule(sde)
    if sampler == "euler":
        return euler_maruyama_coefficients(schedule, steps)
    return posterior_coefficients(schedule, steps)


def affine_step_(
    x: torch.Tensor,
    eps: torch.Tensor,
    mu: torch.Tensor,
    a: float,
    b: float,
    c: float,
    z: torch.Tensor | None,
) -> torch.Tensor:
    """x ← μ + a(x − μ) − b ε̂ (+ c z), in place in ``x``; returns ``x``."""
    x.sub_(mu).mul_(a).sub_(eps, alpha=b).add_(mu)
    if z is not None:
        x.add_(z, alpha=c)
    return x


class GraphDenoiser:
    """``denoise(x_t, t) -> ε̂`` over a step graph with μ and cond fixed for one loop.

    ``t`` is the 0-d float32 tensor ``sample_posterior`` passes; it is broadcast into a
    preallocated (B,) buffer on the device (no host sync). The returned ε̂ aliases the
    backend's output buffer and is valid until the next call.
    """

    def __init__(self, step: Backend, mu: torch.Tensor, cond: torch.Tensor) -> None:
        self._step = step
        self._t = torch.empty(mu.shape[0], dtype=torch.float32, device=mu.device)
        self._feed: dict[str, torch.Tensor] = {"x_t": mu, "mu": mu, "t": self._t, "cond": cond}

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._t.copy_(t)
        self._feed["x_t"] = x_t
        return self._step.infer(self._feed)["eps"]


class DomainSampler:
    """One domain's reverse-SDE loop (image, sinogram or residual) over a backend's graphs.

    Args:
        graphs: graph name → active ``Backend``; needs ``unet_<domain>_cond`` and ``_step``.
        domain: ``"image"``, ``"sinogram"`` or ``"residual"``.
        sde: the bundle's SDE config (training T, λ, schedule).
        steps: S sampling steps (DESIGN §7.3).
        step_fn: optional fused update with ``affine_step_``'s signature (e.g. a CUDA kernel).
        sampler: ``"posterior"`` (default) or ``"euler"`` (``step_coefficients``).
    """

    def __init__(
        self,
        graphs: Mapping[str, Backend],
        domain: str,
        sde: SDEConfig,
        *,
        steps: int,
        step_fn: Callable[..., torch.Tensor] | None = None,
        sampler: str = "posterior",
    ) -> None:
        self.domain = domain
        self.cond_backend = graphs[cond_graph(domain)]
        self.step_backend = graphs[step_graph(domain)]
        self.sde = sde
        self.steps = int(steps)
        self.sampler = sampler
        self.coeffs: StepCoefficients = step_coefficients(sde, self.steps, sampler)
        self.lam = sde.lam
        self._step_fn = affine_step_ if step_fn is None else step_fn
        self._buffers: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def condition(self, content_emb: torch.Tensor, artifact_emb: torch.Tensor) -> torch.Tensor:
        """cond (B, C) for the embeddings (B, D); a copy, safe to keep across loops."""
        out = self.cond_backend.infer(
            {"content_emb": content_emb, "artifact_emb": artifact_emb}, copy_outputs=True
        )
        return out["cond"]

    def _loop_buffers(self, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(mu.shape), mu.dtype, mu.device)
        if key not in self._buffers:
            self._buffers.clear()  # one shape at a time: a new shape replaces the old buffers
            self._buffers[key] = (torch.empty_like(mu), torch.empty_like(mu))
        return self._buffers[key]

    def sample(
        self,
        mu: torch.Tensor,
        cond: torch.Tensor,
        *,
        generator: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> torch.Tensor:
        """Run the loop from x_T = μ + λz to x_0 (x̂₀ for the posterior sampler).

        Args:
            mu: (B, 1, H, W) float32, network scale, on the backend's device.
            cond: (B, C) from :meth:`condition`.
            generator: seeded generator on ``mu``'s device (``loop_generator``).
            progress: optional ``progress(domain, k, S)`` after each step.

        Returns:
            x̂₀ (B, 1, H, W), a new tensor.
        """
        x, z = self._loop_buffers(mu)
        torch.randn(mu.shape, generator=generator, out=z)
        torch.add(mu, z, alpha=self.lam, out=x)  # x_T = μ + λ z

        def noise(_k: int) -> torch.Tensor:
            return torch.randn(mu.shape, generator=generator, out=z)

        callback = None
        if progress is not None:
            n = len(self.coeffs)

            def callback(info: dict[str, Any]) -> None:
                progress(self.domain, int(info["i"]), n)

        denoise = GraphDenoiser(self.step_backend, mu, cond)
        out = sample_posterior(
            denoise, x, mu, self.coeffs, noise=noise, step=self._step_fn, callback=callback
        )
        return out.clone()
