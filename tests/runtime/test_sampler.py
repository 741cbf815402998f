"""The runtime's reverse-SDE wrapper: oracle exactness, seeding, times fed, progress."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mar_rt.export.graphs import cond_graph, graph_specs, step_graph
from mar_rt.models.sde import SDEConfig, make_schedule, posterior_coefficients
from mar_rt.runtime.backends.base import Backend
from mar_rt.runtime.config import PipelineConfig
from mar_rt.runtime.sampler import (
    DOMAIN_SEED_OFFSETS,
    DomainSampler,
    affine_step_,
    loop_generator,
)

H = W = 24
C = 6
D = 4


def _specs():
    return graph_specs(
        image_shape=(H, W),
        sino_shape=(10, 11),
        embed_dims={"image": D, "sinogram": D},
        cond_dims={"image": C, "sinogram": C, "residual": C},
    )


class ZeroCond(Backend):
    """cond = [content, artifact, 0...] (a stand-in for the conditioning graph)."""

    def _activate_impl(self):
        pass

    def _deactivate_impl(self):
        pass

    def _infer_impl(self, inputs, outputs):
        outputs["cond"].zero_()


class OracleStep(Backend):
    """ε̂ = the true noise of x_t given the known clean image x0 (closed form).

    The network time t_in = t·T/S maps to state t of the S-step schedule, where
    x_t = μ + (x0 − μ)·e^{−θ̄_tΔ} + σ̄_t ε, so ε = (x_t − μ − (x0 − μ)·e^{−θ̄_tΔ}) / σ̄_t.
    """

    def __init__(self, spec, x0, cfg, steps):
        super().__init__(spec)
        self.x0 = x0
        self.sched = make_schedule(dataclasses.replace(cfg, T=steps))
        self.scale = steps / cfg.T
        self.times: list[torch.Tensor] = []

    def _activate_impl(self):
        pass

    def _deactivate_impl(self):
        pass

    def _infer_impl(self, inputs, outputs):
        t_in = inputs["t"].clone()
        self.times.append(t_in)
        t = int(round(float(t_in[0]) * self.scale))  # test-side only: the oracle needs an index
        decay = float(np.exp(-self.sched.thetas_cumsum[t] * self.sched.dt))
        sigma_bar = float(self.sched.sigma_bars[t])
        x, mu = inputs["x_t"].double(), inputs["mu"].double()
        eps = (x - mu - (self.x0.double() - mu) * decay) / sigma_bar
        outputs["eps"].copy_(eps.float())


def _graphs(domain, x0, cfg, steps):
    specs = _specs()
    step = OracleStep(specs[step_graph(domain)], x0, cfg, steps)
    cond = ZeroCond(specs[cond_graph(domain)])
    return {cond_graph(domain): cond.activate(), step_graph(domain): step.activate()}, step


def _images(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 1, H, W, generator=gen)
    mu = (x0 + 0.2 * torch.randn(batch, 1, H, W, generator=gen)).clamp(0, 1)
    return x0, mu


@pytest.mark.parametrize("steps", [1, 5, 100])
@pytest.mark.parametrize("max_sigma", [10.0, 50.0])
def test_oracle_noise_returns_the_target(steps, max_sigma):
    cfg = SDEConfig(T=100, max_sigma=max_sigma)
    x0, mu = _images()
    graphs, _ = _graphs("image", x0, cfg, steps)
    sampler = DomainSampler(graphs, "image", cfg, steps=steps)
    cond = sampler.condition(torch.zeros(2, D), torch.zeros(2, D))
    out = sampler.sample(mu, cond, generator=loop_generator(3, "image", "cpu"))
    assert out.shape == x0.shape
    assert float((out - x0).abs().max()) <= 1e-5


class SmoothStep(Backend):
    """ε̂ = 0.3·tanh(x_t − μ) + 0.002·t: a smooth, time-dependent stand-in for a network."""

    def _activate_impl(self):
        pass

    def _deactivate_impl(self):
        pass

    def _infer_impl(self, inputs, outputs):
        t = inputs["t"].reshape(-1, 1, 1, 1)
        outputs["eps"].copy_(0.3 * torch.tanh(inputs["x_t"] - inputs["mu"]) + 0.002 * t)


def _design_schedule(T: int, max_sigma: float, eps: float = 0.005):
    """DESIGN §7.3 in float64, written out here: cosine θ_0..θ_T, θ̄_t, Δ, σ_t, σ̄_t, λ."""
    n = T + 2
    x = np.arange(n + 1, dtype=np.float64)
    alpha_bar = np.cos(((x / n) + 0.008) / 1.008 * np.pi / 2) ** 2
    theta = 1.0 - (alpha_bar / alpha_bar[0])[1:-1]
    theta_bar = np.concatenate([[0.0], np.cumsum(theta[1:])])  # Σ_{i=1..t} θ_i
    delta = -np.log(eps) / theta_bar[T]
    lam = max_sigma / 255.0
    sigma = np.sqrt(2.0 * lam**2 * theta)
    sigma_bar = lam * np.sqrt(1.0 - np.exp(-2.0 * theta_bar * delta))
    return theta, theta_bar, delta, sigma, sigma_bar, lam


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_euler_sampler_matches_a_float64_reference_loop(steps):
    """``sampler="euler"``: x_T = μ + λz, then for t = S..1
    x_{t−1} = x_t − [θ_t(μ − x_t) − σ_t² s]Δ + σ_t√Δ z with s = −ε̂/σ̄_t (Euler–Maruyama on the
    reverse SDE of DESIGN §7.3, S steps: the schedule rebuilt with T = S, the network fed
    t·T/S), in float64 with the same ε̂ function and the same seeded draws."""
    cfg = SDEConfig(T=100, max_sigma=30.0)
    _, mu = _images(seed=4)
    specs = _specs()
    graphs = {
        cond_graph("image"): ZeroCond(specs[cond_graph("image")]).activate(),
        step_graph("image"): SmoothStep(specs[step_graph("image")]).activate(),
    }
    sampler = DomainSampler(graphs, "image", cfg, steps=steps, sampler="euler")
    out = sampler.sample(mu, torch.zeros(2, C), generator=loop_generator(9, "image", "cpu"))

    theta, theta_bar, delta, sigma, sigma_bar, lam = _design_schedule(steps, cfg.max_sigma)
    gen = loop_generator(9, "image", "cpu")
    m = mu.double()
    x = m + lam * torch.randn(mu.shape, generator=gen).double()
    for t in range(steps, 0, -1):
        eps_hat = 0.3 * torch.tanh(x - m) + 0.002 * (t * cfg.T / steps)
        score = -eps_hat / sigma_bar[t]
        z = torch.randn(mu.shape, generator=gen).double()
        x = x - (theta[t] * (m - x) - sigma[t] ** 2 * score) * delta + sigma[t] * delta**0.5 * z
    # float32 against float64: the loop multiplies x − μ by up to 1/eps = 200 over its steps
    err = float((out.double() - x).abs().max())
    assert err <= 1e-6 * float(x.abs().max()), (err, float(x.abs().max()))
    posterior = DomainSampler(graphs, "image", cfg, steps=steps)
    other = posterior.sample(mu, torch.zeros(2, C), generator=loop_generator(9, "image", "cpu"))
    assert float((other - out).abs().max()) > 1e-3  # the choice does change the loop


def test_sampler_names_are_validated():
    assert PipelineConfig().sampler == "posterior"
    assert PipelineConfig(sampler="euler").to_dict()["sampler"] == "euler"
    with pytest.raises(ValueError, match="sampler must be one of"):
        PipelineConfig(sampler="ddim")
    graphs, _ = _graphs("image", _images()[0], SDEConfig(T=10), 2)
    with pytest.raises(ValueError, match="sampler must be one of"):
        DomainSampler(graphs, "image", SDEConfig(T=10), steps=2, sampler="heun")


def test_times_fed_per_step_match_the_schedule():
    cfg = SDEConfig(T=100)
    x0, mu = _images(batch=3)
    graphs, oracle = _graphs("residual", x0, cfg, 7)
    sampler = DomainSampler(graphs, "residual", cfg, steps=7)
    ticks = []
    sampler.sample(
        mu,
        torch.zeros(3, C),
        generator=loop_generator(0, "residual", "cpu"),
        progress=lambda *a: ticks.append(a),
    )
    want = posterior_coefficients(make_schedule(cfg), 7).t_in
    assert [tuple(t.shape) for t in oracle.times] == [(3,)] * 7
    got = np.array([t[0].item() for t in oracle.times])
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=0, atol=0)
    assert ticks == [("residual", k, 7) for k in range(7)]


def test_seeded_noise_is_deterministic_and_per_domain():
    cfg = SDEConfig(T=100)
    x0, mu = _images()
    # a constant (wrong) noise prediction, so the output depends on the injected noise
    graphs, oracle = _graphs("image", x0, cfg, 4)
    oracle._infer_impl = lambda inputs, outputs: outputs["eps"].fill_(0.1)
    sampler = DomainSampler(graphs, "image", cfg, steps=4)
    cond = torch.zeros(2, C)

    def run(seed, domain="image"):
        return sampler.sample(mu, cond, generator=loop_generator(seed, domain, "cpu"))

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, run(5, "residual"))
    assert len(set(DOMAIN_SEED_OFFSETS.values())) == len(DOMAIN_SEED_OFFSETS)
    a.add_(1.0)  # the result is the caller's: the next run is unaffected
    assert torch.equal(run(5), b)


def test_affine_step_in_place_matches_the_formula():
    gen = torch.Generator().manual_seed(1)
    x, eps, mu, z = (torch.randn(2, 1, 5, 5, generator=gen, dtype=torch.float64) for _ in range(4))
    a, b, c = 1.3, 0.2, 0.05
    want = mu + a * (x - mu) - b * eps + c * z
    out = affine_step_(x, eps, mu, a, b, c, z)
    assert out is x
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    y = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(
        affine_step_(
            y,
            torch.zeros(3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.float64),
            2.0,
            0.0,
            9.0,
            None,
        ),
        torch.full((3,), 2.0, dtype=torch.float64),
    )


@pytest.mark.gpu
def test_loop_does_not_sync_with_the_host_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = SDEConfig(T=100)
    x0, mu = (t.cuda() for t in _images())
    specs = _specs()

    class ConstStep(Backend):
        def _activate_impl(self):
            pass

        def _deactivate_impl(self):
            pass

        def _infer_impl(self, inputs, outputs):
            # the loop has begun (sample_posterior's one-off setup is done): from here on
            # any synchronising CUDA call raises
            torch.cuda.set_sync_debug_mode("error")
            torch.mul(inputs["x_t"], 0.01, out=outputs["eps"])

    graphs = {
        cond_graph("image"): ZeroCond(specs[cond_graph("image")], device="cuda").activate(),
        step_graph("image"): ConstStep(specs[step_graph("image")], device="cuda").activate(),
    }
    sampler = DomainSampler(graphs, "image", cfg, steps=10)
    cond = torch.zeros(2, C, device="cuda")
    try:
        sampler.sample(mu, cond, generator=loop_generator(0, "image", "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
