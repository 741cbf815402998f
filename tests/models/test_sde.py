"""IR-SDE schedule and sampler against closed forms (DESIGN §7.3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mar_rt.models.sde import (
    SDEConfig,
    euler_maruyama_coefficients,
    forward_marginal,
    make_schedule,
    ml_loss,
    posterior_coefficients,
    posterior_loss,
    sample_posterior,
    start_state,
    true_noise,
)


def _oracle(x0, mu, schedule, steps):
    """Noise predictor that returns the true ε of the forward marginal of the S-step schedule.

    The network time t_in = t·T/S is mapped back to the index t of the rebuilt schedule.
    """
    s = make_schedule(SDEConfig(**{**schedule.config.to_dict(), "T": steps}))
    scale = steps / schedule.T

    def denoise(x_t, t_in):
        t = int(round(float(t_in) * scale))
        return true_noise(x_t, x0, mu, t, s)

    return denoise, s


def _gauss_posterior(x_t, x0, mu, s, t):
    """Mean and std of q(x_{t−1} | x_t, x_0) by Gaussian conjugacy of the two OU transitions.

    prior   x_{t−1} | x_0 ~ N(μ + (x_0−μ)C, λ²(1−C²))
    lik     x_t | x_{t−1} ~ N(μ + (x_{t−1}−μ)A, λ²(1−A²))
    """
    lam = s.lam
    A = math.exp(-s.thetas[t] * s.dt)
    C = math.exp(-s.thetas_cumsum[t - 1] * s.dt)
    v_prior = lam**2 * (1 - C**2)
    if v_prior == 0.0:  # t = 1: x_0 is known exactly
        return x0, 0.0
    v_lik = lam**2 * (1 - A**2)
    prec = 1 / v_prior + A**2 / v_lik
    mean_c = ((x0 - mu) * C / v_prior + A * (x_t - mu) / v_lik) / prec
    return mu + mean_c, math.sqrt(1 / prec)


def test_cosine_schedule_constants():
    s = make_schedule(SDEConfig(T=100, max_sigma=50, schedule="cosine", eps=0.005))
    assert s.dt == pytest.approx(0.10409381, rel=1e-6)
    assert s.thetas_cumsum[-1] == pytest.approx(50.899448, rel=1e-6)
    assert s.thetas.shape == (101,) and s.thetas_cumsum[0] == 0.0
    # θ̄_t excludes θ_0: θ̄_1 = θ_1.
    assert s.thetas_cumsum[1] == pytest.approx(s.thetas[1], rel=1e-12)
    assert np.exp(-s.thetas_cumsum[-1] * s.dt) == pytest.approx(0.005, rel=1e-12)
    assert s.sigma_bars[-1] == pytest.approx(50 / 255 * math.sqrt(1 - 0.005**2), rel=1e-12)
    assert np.allclose(s.sigmas**2, 2 * (50 / 255) ** 2 * s.thetas)


def test_linear_and_constant_schedules():
    c = make_schedule(SDEConfig(T=50, schedule="constant", eps=0.01))
    assert np.array_equal(c.thetas_cumsum, np.arange(51, dtype=float))
    assert c.dt == pytest.approx(-math.log(0.01) / 50)
    lin = make_schedule(SDEConfig(T=100, schedule="linear"))
    scale = 1000 / 101
    expect = np.linspace(scale * 1e-4, scale * 0.02, 101)
    assert np.allclose(lin.thetas, expect, rtol=1e-12)
    # closed-form partial sums of an arithmetic sequence
    step = expect[1] - expect[0]
    t = np.arange(101)
    closed = t * expect[0] + step * t * (t + 1) / 2
    assert np.allclose(lin.thetas_cumsum, closed, rtol=1e-10, atol=1e-12)
    for s in (c, lin):
        assert np.all(np.diff(s.thetas_cumsum) > 0) and np.all(np.diff(s.sigma_bars) > 0)
        assert math.exp(-s.thetas_cumsum[-1] * s.dt) == pytest.approx(s.config.eps, rel=1e-12)


def test_config_validation_and_dict_round_trip():
    cfg = SDEConfig(T=20, max_sigma=30, schedule="linear", eps=0.01)
    assert SDEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="schedule"):
        SDEConfig(schedule="quadratic")
    with pytest.raises(ValueError, match="eps"):
        SDEConfig(eps=1.5)
    with pytest.raises(ValueError, match="unknown keys"):
        SDEConfig.from_dict({"T": 10, "beta": 1})


@pytest.mark.parametrize("steps", [None, 25])
def test_affine_step_equals_mean_std_form(steps):
    """a, b, c reproduce the reference mean/std with x̂₀ = μ + (x_t − μ − σ̄ε̂)e^{θ̄Δ}."""
    sched = make_schedule(SDEConfig())
    co = posterior_coefficients(sched, steps)
    s = make_schedule(SDEConfig(T=steps)) if steps else sched
    rng = np.random.default_rng(0)
    x_t, mu, eps = rng.normal(size=(3, 50))
    for k, t in enumerate(range(s.T, 0, -1)):
        A = math.exp(-s.thetas[t] * s.dt)
        B = math.exp(-s.thetas_cumsum[t] * s.dt)
        C = math.exp(-s.thetas_cumsum[t - 1] * s.dt)
        x0_hat = mu + (x_t - mu - s.sigma_bars[t] * eps) / B
        mean = (
            A * (1 - C**2) / (1 - B**2) * (x_t - mu)
            + C * (1 - A**2) / (1 - B**2) * (x0_hat - mu)
            + mu
        )
        std = s.lam * math.sqrt((1 - A**2) * (1 - C**2) / (1 - B**2))
        affine = mu + co.a[k] * (x_t - mu) - co.b[k] * eps
        np.testing.assert_allclose(affine, mean, rtol=1e-9, atol=1e-9)
        assert co.c[k] == pytest.approx(std, rel=1e-9, abs=1e-15)
        # the simplification a_t = e^{θ_tΔ} holds
        assert co.a[k] == pytest.approx(1 / A, rel=1e-9)
    assert co.c[-1] == 0.0
    if steps:
        np.testing.assert_allclose(co.t_in, np.arange(steps, 0, -1) * 100 / steps)
    else:
        np.testing.assert_array_equal(co.t_in, np.arange(100, 0, -1))


@pytest.mark.parametrize("steps", [100, 20, 7])
def test_oracle_step_is_analytic_posterior_mean(steps):
    sched = make_schedule(SDEConfig())
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    mu = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    denoise, s = _oracle(x0, mu, sched, steps)
    co = posterior_coefficients(sched, None if steps == 100 else steps)
    for k, t in enumerate(range(steps, 0, -1)):
        z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x_t = forward_marginal(x0, mu, t, s, z)
        eps = denoise(x_t, torch.tensor(co.t_in[k], dtype=torch.float32))
        mean = mu + co.a[k] * (x_t - mu) - co.b[k] * eps
        ref_mean, ref_std = _gauss_posterior(x_t, x0, mu, s, t)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
        assert co.c[k] == pytest.approx(ref_std, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("steps", [None, 10])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_oracle_loop_returns_x0(steps, dtype):
    sched = make_schedule(SDEConfig())
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 1, 16, 12, generator=g).to(dtype)
    mu = (x0 + 0.2 * torch.randn(x0.shape, generator=g)).to(dtype)
    denoise, _ = _oracle(x0, mu, sched, steps or 100)
    calls = []

    def noise(k):
        calls.append(k)
        return torch.randn(x0.shape, generator=g).to(dtype)

    x_T = start_state(mu, sched.lam, noise(-1))
    co = posterior_coefficients(sched, steps)
    out = sample_posterior(denoise, x_T, mu, co, noise=noise)
    assert out.dtype == dtype and out.shape == x0.shape
    assert (out - x0).abs().max().item() <= 1e-5
    # no noise is drawn for the last (x̂₀) step
    assert calls == [-1, *range(len(co) - 1)]


def test_oracle_loop_follows_forward_marginal():
    """Posterior steps from x_T ~ q(x_T|x_0) keep x_t ~ N(μ + (x0−μ)e^{−θ̄Δ}, σ̄_t²)."""
    sched = make_schedule(SDEConfig())
    g = torch.Generator().manual_seed(3)
    n = 40000
    x0 = torch.full((n,), 0.8, dtype=torch.float64)
    mu = torch.full((n,), 0.2, dtype=torch.float64)
    denoise, s = _oracle(x0, mu, sched, 100)
    x_T = forward_marginal(x0, mu, 100, s, torch.randn(n, generator=g, dtype=torch.float64))
    stats = {}

    def cb(info):
        t = 100 - info["i"] - 1
        if t in (80, 50, 10):
            stats[t] = (info["x"].mean().item(), info["x"].std().item())

    sample_posterior(
        denoise,
        x_T,
        mu,
        posterior_coefficients(sched),
        noise=lambda k: torch.randn(n, generator=g, dtype=torch.float64),
        callback=cb,
    )
    for t, (m, sd) in stats.items():
        exp_m = 0.2 + 0.6 * math.exp(-s.thetas_cumsum[t] * s.dt)
        assert m == pytest.approx(exp_m, abs=4 * s.sigma_bars[t] / math.sqrt(n))
        assert sd == pytest.approx(s.sigma_bars[t], rel=0.02)


def test_fused_step_hook_is_used():
    sched = make_schedule(SDEConfig(T=10))
    co = posterior_coefficients(sched)
    seen = []

    def step(x, eps, mu, a, b, c, z):
        seen.append((a, b, c, z is None))
        return mu + a * (x - mu) - b * eps + (0 if z is None else c * z)

    x = torch.zeros(4)
    sample_posterior(
        lambda x, t: torch.ones_like(x), x, x, co, noise=lambda k: torch.zeros(4), step=step
    )
    assert [s[:3] for s in seen] == list(zip(co.a, co.b, co.c, strict=True))
    assert [s[3] for s in seen] == [False] * 9 + [True]


def test_euler_maruyama_matches_reference_step():
    sched = make_schedule(SDEConfig())
    co = euler_maruyama_coefficients(sched)
    rng = np.random.default_rng(4)
    x, mu, eps, z = rng.normal(size=(4, 10))
    for k, t in enumerate(range(100, 0, -1)):
        score = -eps / sched.sigma_bars[t]
        ref = (
            x
            - (sched.thetas[t] * (mu - x) - sched.sigmas[t] ** 2 * score) * sched.dt
            + sched.sigmas[t] * math.sqrt(sched.dt) * z
        )
        np.testing.assert_allclose(mu + co.a[k] * (x - mu) - co.b[k] * eps + co.c[k] * z, ref)
    last = euler_maruyama_coefficients(sched, final_x0=True)
    post = posterior_coefficients(sched)
    assert (last.a[-1], last.b[-1], last.c[-1]) == (post.a[-1], post.b[-1], post.c[-1])


def test_forward_marginal_per_sample_t():
    sched = make_schedule(SDEConfig())
    x0 = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    mu = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 50, 100])
    batch = forward_marginal(x0, mu, t, sched, z)
    for i, ti in enumerate(t.tolist()):
        one = forward_marginal(x0[i], mu[i], ti, sched, z[i])
        torch.testing.assert_close(batch[i], one)
    torch.testing.assert_close(true_noise(batch, x0, mu, t, sched), z)
    # t = 0 is the clean image
    torch.testing.assert_close(forward_marginal(x0, mu, 0, sched, z), x0)


def _loss_batch(sched, t, *, seed, size, mu_spread, eps_err):
    """(x0, μ, z, x_t, ε̂) in float64: μ = x0 + mu_spread·noise, x_t on the forward marginal,
    ε̂ = z + eps_err·noise (one sample per entry of t)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(len(t), 1, size, size, generator=g, dtype=torch.float64)
    mu = x0 + mu_spread * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = forward_marginal(x0, mu, t, sched, z)
    eps_hat = z + eps_err * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, mu, z, x_t, eps_hat


def test_ml_loss_matches_formula_and_is_consistent():
    sched = make_schedule(SDEConfig())
    t = torch.tensor([1, 10, 60, 100])
    x0, mu, z, x_t, eps_hat = _loss_batch(sched, t, seed=5, size=8, mu_spread=0.3, eps_err=0.1)
    loss = ml_loss(eps_hat, x_t, x0, mu, t, sched)
    # numpy re-statement of DESIGN §7.3 per sample
    ref = []
    for i, ti in enumerate(t.tolist()):
        xt, m, e, x0i = (v[i].numpy() for v in (x_t, mu, eps_hat, x0))
        A = math.exp(-sched.thetas[ti] * sched.dt)
        B = math.exp(-sched.thetas_cumsum[ti] * sched.dt)
        C = math.exp(-sched.thetas_cumsum[ti - 1] * sched.dt)
        pred = (
            xt
            - (sched.thetas[ti] * (m - xt) + sched.sigmas[ti] ** 2 * e / sched.sigma_bars[ti])
            * sched.dt
        )
        tgt = A * (1 - C**2) / (1 - B**2) * (xt - m) + C * (1 - A**2) / (1 - B**2) * (x0i - m) + m
        ref.append(np.abs(pred - tgt))
    assert loss.item() == pytest.approx(float(np.mean(ref)), rel=1e-12)
    # the true noise is (much) closer to the ML optimum than a perturbed one
    assert ml_loss(z, x_t, x0, mu, t, sched) < 0.5 * loss
    with pytest.raises(ValueError, match="1..100"):
        ml_loss(z, x_t, x0, mu, 0, sched)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_posterior_loss_is_the_gap_between_conjugate_posterior_means(schedule):
    # short schedule (T = 4): here the Euler-form ml_loss and the posterior step disagree
    sched = make_schedule(SDEConfig(T=4, max_sigma=10, schedule=schedule))
    t = torch.tensor([1, 2, 3, 4])
    x0, mu, z, x_t, eps_hat = _loss_batch(sched, t, seed=6, size=6, mu_spread=0.05, eps_err=0.2)
    per = posterior_loss(eps_hat, x_t, x0, mu, t, sched, reduction="none")
    for i, ti in enumerate(t.tolist()):
        B = math.exp(-sched.thetas_cumsum[ti] * sched.dt)
        x0_hat = mu[i] + (x_t[i] - mu[i] - sched.sigma_bars[ti] * eps_hat[i]) / B
        m_hat, _ = _gauss_posterior(x_t[i], x0_hat, mu[i], sched, ti)
        m_true, _ = _gauss_posterior(x_t[i], x0[i], mu[i], sched, ti)
        torch.testing.assert_close(per[i], (m_hat - m_true).abs(), rtol=1e-9, atol=1e-12)
    # t = 1 is the L1 error of x̂₀; the true noise has zero loss
    B1 = math.exp(-sched.thetas_cumsum[1] * sched.dt)
    x0_hat1 = mu[0] + (x_t[0] - mu[0] - sched.sigma_bars[1] * eps_hat[0]) / B1
    torch.testing.assert_close(per[0], (x0_hat1 - x0[0]).abs())
    assert posterior_loss(z, x_t, x0, mu, t, sched).item() < 1e-12
    with pytest.raises(ValueError, match="1..4"):
        posterior_loss(z, x_t, x0, mu, 5, sched)


# ---- the reference's option files ------------------------------------------------------------


def test_max_sigma_below_one_is_lambda_itself():
    """The reference IRSDE: max_sigma / 255 if max_sigma >= 1 else max_sigma."""
    assert SDEConfig(max_sigma=50).lam == pytest.approx(50 / 255)
    assert SDEConfig(max_sigma=1.0).lam == pytest.approx(1 / 255)
    assert SDEConfig(max_sigma=0.2).lam == 0.2
    s = make_schedule(SDEConfig(T=10, max_sigma=0.2))
    # σ̄_T = λ√(1 − e^{−2θ̄_TΔ}) = λ√(1 − eps²) since e^{−θ̄_TΔ} = eps
    assert s.sigma_bars[-1] == pytest.approx(0.2 * math.sqrt(1 - 0.005**2), rel=1e-9)


DACLIP_TRAIN_YML = """\
name: universal-ir
model: denoising
sde:
  max_sigma: 50
  T: 100
  schedule: cosine # linear, cosine
  eps: 0.005
network_G:
  which_model_G: ConditionalUNet
  setting:
    in_nc: 3
    nf: 64
"""


def test_from_reference_options(tmp_path):
    from mar_rt.errors import BadInputError

    path = tmp_path / "train.yml"
    path.write_text(DACLIP_TRAIN_YML)
    assert SDEConfig.from_reference_options(path) == SDEConfig(
        T=100, max_sigma=50.0, schedule="cosine", eps=0.005
    )
    path.write_text("sde:\n  max_sigma: 0.1\n")  # the reference's defaults for the rest
    cfg = SDEConfig.from_reference_options(path)
    assert cfg == SDEConfig(T=100, max_sigma=0.1, schedule="cosine", eps=0.01)
    assert cfg.lam == 0.1
    for bad, named in (
        ("sde:\n  max_sigma: 10\n  schedule: sigmoid\n", "schedule"),
        ("sde:\n  max_sigma: 10\n  T: 1.5\n", "sde.T"),
        ("sde:\n  max_sigma: fifty\n", "max_sigma"),
        ("network_G: {}\n", "no 'sde:' block"),
        ("sde: [1, 2\n", "cannot read"),
    ):
        path.write_text(bad)
        with pytest.raises(BadInputError, match=named):
            SDEConfig.from_reference_options(path)
