"""IR-SDE (Luo et al. 2023) schedule, sampler coefficients, sampler loop and training loss.

DESIGN.md §7.3, as the reference code (Algolzw/image-restoration-sde ``IRSDE``,
DA-CLIP ``reverse_posterior``) implements it.  Everything here is a pure function; the
schedule and coefficients are float64 numpy, the loop runs on whatever tensors it is given.

Notation (name in code → DESIGN symbol):

    T                 T          number of training steps; states t = 0..T, t = 0 is the clean image
    lam               λ          stationary std: max_sigma / 255, or max_sigma itself below 1
    thetas[t]         θ_t        mean-reversion speed of step t, t = 0..T (θ_0 is never used)
    thetas_cumsum[t]  θ̄_t        Σ_{i=1..t} θ_i, so θ̄_0 = 0 (the reference subtracts θ_0)
    dt                Δ          −ln(eps) / θ̄_T, so that e^{−θ̄_T Δ} = eps
    sigmas[t]         σ_t        √(2 λ² θ_t)
    sigma_bars[t]     σ̄_t        λ √(1 − e^{−2 θ̄_t Δ}), std of the forward marginal
    mu                μ          the degraded image the SDE reverts to
    eps_hat           ε̂          the network's noise prediction
    A, B, C                      e^{−θ_t Δ}, e^{−θ̄_t Δ}, e^{−θ̄_{t−1} Δ}

Forward SDE:   dx = θ_t (μ − x) dt + σ_t dw
Marginal:      x_t = μ + (x_0 − μ) B + σ̄_t z
x̂₀ from ε̂:     x̂₀ = μ + (x_t − μ − σ̄_t ε̂) / B
Posterior:     q(x_{t−1} | x_t, x_0) = N(mean, std²) with
               mean = μ + A(1−C²)/(1−B²) (x_t − μ) + C(1−A²)/(1−B²) (x_0 − μ)
               std  = λ √((1−A²)(1−C²)/(1−B²))
Affine form:   x_{t−1} = μ + a_t (x_t − μ) − b_t ε̂ + c_t z        (posterior, x_0 ← x̂₀)
               a_t = A(1−C²)/(1−B²) + C(1−A²)/((1−B²) B)   (= 1/A in exact arithmetic)
               b_t = C(1−A²) σ̄_t / ((1−B²) B)
               c_t = std
               At t = 1, C = 1 and B = A, so the step returns x̂₀ exactly: a_1 = e^{θ̄_1Δ},
               b_1 = σ̄_1 e^{θ̄_1Δ}, c_1 = 0.  These values are set explicitly (no 0/0 rounding).

Sampling with S < T steps rebuilds the schedule with T = S (same eps and λ, so the same end
points) and feeds the network the time t·T_train/S, as DESIGN §7.3 prescribes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

ScheduleKind = Literal["cosine", "linear", "constant"]
_SCHEDULES = ("cosine", "linear", "constant")

__all__ = [
    "SDEConfig",
    "Schedule",
    "StepCoefficients",
    "make_schedule",
    "posterior_coefficients",
    "euler_maruyama_coefficients",
    "sample_posterior",
    "start_state",
    "forward_marginal",
    "true_noise",
    "ml_loss",
    "posterior_loss",
]


@dataclass(frozen=True, kw_only=True)
class SDEConfig:
    """IR-SDE hyper-parameters (saved in ``bundle.json`` under ``sde``).

    ``max_sigma`` as the reference's ``IRSDE`` reads it (images in [0, 1]): a value ≥ 1 is on
    the 0–255 scale (λ = max_sigma / 255), a value below 1 is λ itself.
    """

    T: int = 100
    max_sigma: float = 50.0
    schedule: ScheduleKind = "cosine"
    eps: float = 0.005

    def __post_init__(self) -> None:
        if not isinstance(self.T, (int, np.integer)) or self.T < 1:
            raise ValueError(f"SDEConfig: T must be a positive integer, got {self.T!r}")
        if not (math.isfinite(self.max_sigma) and self.max_sigma > 0):
            raise ValueError(f"SDEConfig: max_sigma must be > 0, got {self.max_sigma!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(
                f"SDEConfig: schedule must be one of {_SCHEDULES}, got {self.schedule!r}"
            )
        if not (0.0 < self.eps < 1.0):
            raise ValueError(f"SDEConfig: eps must be in (0, 1), got {self.eps!r}")

    @property
    def lam(self) -> float:
        """λ, the stationary standard deviation: max_sigma / 255 when max_sigma ≥ 1, else
        max_sigma (the reference ``IRSDE.__init__`` rule)."""
        return self.max_sigma / 255.0 if self.max_sigma >= 1 else float(self.max_sigma)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SDEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"SDEConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_reference_options(cls, path: str | os.PathLike[str]) -> SDEConfig:
        """The ``sde:`` block of a reference option YAML (DA-CLIP / IR-SDE ``options/*.yml``):
        max_sigma, T, schedule, eps, with the reference's defaults (T 100, cosine, eps 0.01)
        for absent keys.  An unreadable file or a bad value raises ``BadInputError`` naming
        the file."""
        from mar_rt.errors import BadInputError
        from mar_rt.models.reference import read_reference_options, sde_fields_from_options

        fields = sde_fields_from_options(read_reference_options(path), where=str(path))
        try:
            return cls(**fields)
        except ValueError as exc:
            raise BadInputError(f"{path}: {exc}") from exc


@dataclass(frozen=True, eq=False)
class Schedule:
    """The discretised IR-SDE; every array has T+1 entries indexed by t = 0..T (float64)."""

    config: SDEConfig
    thetas: np.ndarray
    thetas_cumsum: np.ndarray
    dt: float
    sigmas: np.ndarray
    sigma_bars: np.ndarray

    @property
    def T(self) -> int:
        return self.config.T

    @property
    def lam(self) -> float:
        return self.config.lam

    def decay(self, t: int | np.ndarray) -> np.ndarray:
        """e^{−θ̄_t Δ}, the factor on (x_0 − μ) in the forward marginal."""
        return np.exp(-self.thetas_cumsum[t] * self.dt)


@dataclass(frozen=True, eq=False)
class StepCoefficients:
    """Per-step scalars of ``x_{t−1} = μ + a (x_t − μ) − b ε̂ + c z`` (float64, length S).

    Entry k is the k-th network call of the sampler (t runs from S down to 1); ``t_in[k]`` is
    the time the network is fed (t · T_train / S).
    """

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    t_in: np.ndarray

    def __len__(self) -> int:
        return len(self.a)


# --------------------------------------------------------------------------- schedules


def _theta_values(kind: str, T: int) -> np.ndarray:
    """θ_0..θ_T (T+1 values) as the reference code builds them."""
    if kind == "cosine":
        n = T + 2
        x = np.arange(n + 1, dtype=np.float64)
        alpha_bar = np.cos(((x / n) + 0.008) / 1.008 * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        return 1.0 - alpha_bar[1:-1]
    if kind == "linear":
        scale = 1000.0 / (T + 1)
        return np.linspace(scale * 1e-4, scale * 0.02, T + 1, dtype=np.float64)
    if kind == "constant":
        return np.ones(T + 1, dtype=np.float64)
    raise ValueError(f"make_schedule: unknown schedule {kind!r}; expected one of {_SCHEDULES}")


def make_schedule(cfg: SDEConfig) -> Schedule:
    """Build θ_t, θ̄_t, Δ, σ_t and σ̄_t for ``cfg`` (DESIGN §7.3), all float64.

    1. θ_t from the named schedule (cosine: n = T+2, θ = 1 − ᾱ[1:−1]).
    2. θ̄_t = cumsum(θ)_t − θ_0, so that θ̄_0 = 0 and θ̄_t = Σ_{i=1..t} θ_i.
    3. Δ = −ln(eps)/θ̄_T.
    4. σ_t = λ√(2θ_t), σ̄_t = λ√(1 − e^{−2θ̄_tΔ}).
    """
    thetas = _theta_values(cfg.schedule, cfg.T)
    thetas_cumsum = np.cumsum(thetas) - thetas[0]
    thetas_cumsum[0] = 0.0
    dt = float(-math.log(cfg.eps) / thetas_cumsum[-1])
    lam = cfg.lam
    sigmas = np.sqrt(2.0 * lam**2 * thetas)
    sigma_bars = lam * np.sqrt(-np.expm1(-2.0 * thetas_cumsum * dt))
    for arr in (thetas, thetas_cumsum, sigmas, sigma_bars):
        arr.setflags(write=False)
    return Schedule(cfg, thetas, thetas_cumsum, dt, sigmas, sigma_bars)


def _sampling_schedule(schedule: Schedule, steps: int | None) -> Schedule:
    if steps is None or steps == schedule.T:
        return schedule
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return make_schedule(dataclasses.replace(schedule.config, T=int(steps)))


def posterior_coefficients(schedule: Schedule, steps: int | None = None) -> StepCoefficients:
    """Coefficients of the posterior sampler (DESIGN §7.3, DA-CLIP ``reverse_posterior``).

    Args:
        schedule: the training schedule (its T is the network's time scale).
        steps: S sampling steps; ``None`` means S = T.  S ≠ T rebuilds the schedule with S
            steps and feeds the network t · T / S.

    Returns:
        ``StepCoefficients`` of length S, for t = S, S−1, ..., 1.  The last entry (t = 1) has
        c = 0 and returns x̂₀.
    """
    s = _sampling_schedule(schedule, steps)
    t = np.arange(s.T, 0, -1)
    A, B, C = _step_decays(s, t)
    term_x, term_0 = (w[t] for w in _posterior_mean_terms(s))
    # posterior mean with x̂₀ = μ + (x_t − μ − σ̄_t ε̂)/B substituted for x₀
    a = term_x + term_0 / B
    b = term_0 * s.sigma_bars[t] / B
    c = s.lam * np.sqrt(np.clip((1.0 - A**2) * (1.0 - C**2) / (1.0 - B**2), 0.0, None))
    # t = 1: the posterior mean is x̂₀ itself.
    a[-1] = 1.0 / B[-1]
    b[-1] = s.sigma_bars[1] / B[-1]
    c[-1] = 0.0
    t_in = t.astype(np.float64) * (schedule.T / s.T)
    return StepCoefficients(a=a, b=b, c=c, t_in=t_in)


def euler_maruyama_coefficients(
    schedule: Schedule, steps: int | None = None, *, final_x0: bool = False
) -> StepCoefficients:
    """Coefficients of the Euler–Maruyama reverse-SDE sampler (reference ``reverse_sde``).

    x_{t−1} = x_t − [θ_t(μ − x_t) − σ_t² s]Δ + σ_t√Δ z with score s = −ε̂/σ̄_t, i.e.
    a = 1 + θ_tΔ, b = σ_t²Δ/σ̄_t, c = σ_t√Δ.  With ``final_x0`` the last step returns x̂₀
    (as the posterior sampler does) instead of taking one more noisy Euler step.
    """
    s = _sampling_schedule(schedule, steps)
    t = np.arange(s.T, 0, -1)
    a = 1.0 + s.thetas[t] * s.dt
    b = s.sigmas[t] ** 2 * s.dt / s.sigma_bars[t]
    c = s.sigmas[t] * math.sqrt(s.dt)
    if final_x0:
        B1 = math.exp(-s.thetas_cumsum[1] * s.dt)
        a[-1] = 1.0 / B1
        b[-1] = s.sigma_bars[1] / B1
        c[-1] = 0.0
    t_in = t.astype(np.float64) * (schedule.T / s.T)
    return StepCoefficients(a=a, b=b, c=c, t_in=t_in)


# --------------------------------------------------------------------------- sampling


def start_state(mu: torch.Tensor, lam: float, z: torch.Tensor) -> torch.Tensor:
    """x_T = μ + λ z (DESIGN §7.3)."""
    return mu + lam * z


def _affine_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    mu: torch.Tensor,
    a: float,
    b: float,
    c: float,
    z: torch.Tensor | None,
) -> torch.Tensor:
    out = mu + a * (x - mu) - b * eps
    if z is not None:
        out = out + c * z
    return out


StepFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, float, float, float, "torch.Tensor | None"],
    torch.Tensor,
]


def sample_posterior(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    mu: torch.Tensor,
    coeffs: StepCoefficients,
    *,
    noise: Callable[[int], torch.Tensor],
    step: StepFn | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """Run the reverse IR-SDE from x_T to x_0 with precomputed affine coefficients.

    Posterior sampling of IR-SDE (Luo et al. 2023, Sec. 3.2; DA-CLIP ``reverse_posterior``),
    or Euler–Maruyama when given ``euler_maruyama_coefficients``.  Per call k:

    1. ε̂ = denoise(x, t_in[k])                  (one network call; t_in a 0-d fp32 tensor)
    2. z = noise(k)                              (only when c[k] > 0)
    3. x = μ + a[k](x − μ) − b[k] ε̂ + c[k] z     (``step``, default torch arithmetic)

    The coefficients are Python floats and the times are one tensor built before the loop, so
    the loop itself never synchronises with the device.

    Args:
        denoise: ``(x_t, t) -> eps_hat``, same shape as ``x_t``; conditioning lives inside it.
        x_T: start state (B, 1, H, W) (any shape broadcastable with ``mu``).
        mu: the image the SDE reverts to, same shape as ``x_T``.
        coeffs: from ``posterior_coefficients`` or ``euler_maruyama_coefficients``.
        noise: ``k -> z``, standard normal of x's shape; the caller seeds it.
        step: optional fused update ``(x, eps, mu, a, b, c, z) -> x_next`` (z is None when
            c = 0); it may write in place into ``x`` and return it.
        callback: called after each step with ``{"i": k, "t": t_in[k], "x": x, "eps": ε̂}``.

    Returns:
        x_0, shape of ``x_T``.
    """
    step_fn = _affine_step if step is None else step
    a_list = [float(v) for v in coeffs.a]
    b_list = [float(v) for v in coeffs.b]
    c_list = [float(v) for v in coeffs.c]
    t_list = [float(v) for v in coeffs.t_in]
    t_all = torch.tensor(t_list, dtype=torch.float32, device=x_T.device)
    x = x_T
    for k in range(len(a_list)):
        eps = denoise(x, t_all[k])
        z = noise(k) if c_list[k] > 0.0 else None
        x = step_fn(x, eps, mu, a_list[k], b_list[k], c_list[k], z)
        if callback is not None:
            callback({"i": k, "t": t_list[k], "x": x, "eps": eps})
    return x


# --------------------------------------------------------------------------- training


def _per_sample(
    values: np.ndarray, t: int | torch.Tensor, like: torch.Tensor
) -> torch.Tensor | float:
    """values[t] as a float (int t) or as a (B, 1, ..., 1) tensor (tensor t of shape (B,))."""
    if isinstance(t, torch.Tensor):
        table = torch.tensor(values, dtype=like.dtype, device=like.device)
        idx = t.to(device=like.device, dtype=torch.long).reshape(-1)
        return table[idx].reshape(-1, *([1] * (like.ndim - 1)))
    return float(values[int(t)])


def forward_marginal(
    x0: torch.Tensor,
    mu: torch.Tensor,
    t: int | torch.Tensor,
    schedule: Schedule,
    z: torch.Tensor,
) -> torch.Tensor:
    """Sample x_t = μ + (x_0 − μ) e^{−θ̄_tΔ} + σ̄_t z.

    ``t`` is an int in 0..T or an integer tensor of shape (B,) (one t per sample).
    """
    decay = _per_sample(schedule.decay(np.arange(schedule.T + 1)), t, x0)
    sigma_bar = _per_sample(schedule.sigma_bars, t, x0)
    return mu + (x0 - mu) * decay + sigma_bar * z


def true_noise(
    x_t: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor, t: int | torch.Tensor, schedule: Schedule
) -> torch.Tensor:
    """The ε with x_t = forward_marginal(x0, mu, t, schedule, ε) (needs t ≥ 1)."""
    decay = _per_sample(schedule.decay(np.arange(schedule.T + 1)), t, x0)
    sigma_bar = _per_sample(schedule.sigma_bars, t, x0)
    return (x_t - mu - (x0 - mu) * decay) / sigma_bar


def _check_loss_t(name: str, t: int | torch.Tensor, T: int) -> None:
    """ValueError unless every t lies in 1..T (a loss needs a previous state t − 1)."""
    if isinstance(t, torch.Tensor):
        if bool(((t < 1) | (t > T)).any()):  # one host sync
            raise ValueError(f"{name}: t must lie in 1..{T}")
    elif not 1 <= int(t) <= T:
        raise ValueError(f"{name}: t must lie in 1..{T}, got {t!r}")


def _step_decays(schedule: Schedule, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, C) = (e^{−θ_tΔ}, e^{−θ̄_tΔ}, e^{−θ̄_{t−1}Δ}) for integer t ≥ 1."""
    return np.exp(-schedule.thetas[t] * schedule.dt), schedule.decay(t), schedule.decay(t - 1)


def _posterior_mean_terms(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """A(1−C²)/(1−B²) and C(1−A²)/(1−B²) for t = 0..T (0 at t = 0): the weights of x_t − μ and
    x₀ − μ in the posterior mean of x_{t−1}."""
    A, B, C = _step_decays(schedule, np.arange(1, schedule.T + 1))
    pad = np.zeros(1)
    return (
        np.concatenate([pad, A * (1 - C**2) / (1 - B**2)]),
        np.concatenate([pad, C * (1 - A**2) / (1 - B**2)]),
    )


def ml_loss(
    eps_hat: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    mu: torch.Tensor,
    t: int | torch.Tensor,
    schedule: Schedule,
    *,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """The maximum-likelihood L1 loss of IR-SDE (DESIGN §7.3).

    prediction = x_t − [θ_t(μ − x_t) + σ_t² ε̂/σ̄_t]Δ          (one reverse Euler step, no noise)
    target     = μ + A(1−C²)/(1−B²)(x_t−μ) + C(1−A²)/(1−B²)(x₀−μ)   (optimal x_{t−1})
    loss       = |prediction − target|, averaged (``reduction="mean"``) or per element.

    ``t`` is an int in 1..T or an integer tensor (B,).
    """
    idx = np.arange(1, schedule.T + 1)
    term_x, term_0 = _posterior_mean_terms(schedule)
    drift = schedule.thetas * schedule.dt
    score_w = np.concatenate(
        [np.zeros(1), schedule.sigmas[idx] ** 2 * schedule.dt / schedule.sigma_bars[idx]]
    )

    _check_loss_t("ml_loss", t, schedule.T)

    prediction = (
        x_t - _per_sample(drift, t, x_t) * (mu - x_t) - _per_sample(score_w, t, x_t) * eps_hat
    )
    target = mu + _per_sample(term_x, t, x_t) * (x_t - mu) + _per_sample(term_0, t, x_t) * (x0 - mu)
    loss = (prediction - target).abs()
    return loss.mean() if reduction == "mean" else loss


def posterior_loss(
    eps_hat: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    mu: torch.Tensor,
    t: int | torch.Tensor,
    schedule: Schedule,
    *,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """The L1 distance between the posterior sampler's step and the optimal x_{t−1}.

    prediction = μ + A(1−C²)/(1−B²)(x_t−μ) + C(1−A²)/(1−B²)(x̂₀−μ),  x̂₀ from ε̂ as above
    target     = the same with x₀                                    (as in ``ml_loss``)
    loss       = |prediction − target| = C(1−A²)/(1−B²) · |x̂₀ − x₀|

    ``ml_loss`` forms its prediction with one reverse Euler step, which matches the posterior
    step only when θ_tΔ is small (T ≈ 100). With a short schedule (T = the sampling steps)
    the two differ by O(θ_tΔ), and a network trained on the Euler form misleads the posterior
    sampler; this loss trains exactly the update the sampler applies. At t = 1 it is the L1
    error of x̂₀. ``t`` is an int in 1..T or an integer tensor (B,).
    """
    _check_loss_t("posterior_loss", t, schedule.T)
    _, term_0 = _posterior_mean_terms(schedule)
    decay = _per_sample(schedule.decay(np.arange(schedule.T + 1)), t, x_t)
    sigma_bar = _per_sample(schedule.sigma_bars, t, x_t)
    x0_hat = mu + (x_t - mu - sigma_bar * eps_hat) / decay
    loss = _per_sample(term_0, t, x_t) * (x0_hat - x0).abs()
    return loss.mean() if reduction == "mean" else loss
