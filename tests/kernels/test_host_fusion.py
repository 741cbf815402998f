"""Host build of the SDE step and OSRO kernels against mar_rt.models.sde and mar_rt.runtime.osro."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mar_rt.models import sde
from mar_rt.runtime import osro

pytestmark = pytest.mark.nvcc


def _run_sampler(step, steps: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    mu = torch.rand(2, 1, 24, 20)
    x_t = sde.start_state(mu, 0.2, torch.randn_like(mu))
    coeffs = sde.posterior_coefficients(sde.make_schedule(sde.SDEConfig(T=steps)))
    gen = torch.Generator().manual_seed(1)
    noises = [torch.randn(mu.shape, generator=gen) for _ in range(steps)]

    def denoise(x, t):
        return 0.3 * torch.tanh(x - mu) + 0.01 * float(t)

    return sde.sample_posterior(denoise, x_t, mu, coeffs, noise=lambda k: noises[k], step=step)


def test_sde_step_plugs_into_the_sampler(host):
    """The fused kernel as ``sample_posterior``'s step equals the torch arithmetic."""
    expected = _run_sampler(None)
    got = _run_sampler(host.sde_step)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_sde_step_in_place_and_without_noise(host):
    rng = np.random.default_rng(12)
    x, eps, mu = (rng.standard_normal((3, 5, 7)).astype(np.float32) for _ in range(3))
    expected = mu + 0.9 * (x - mu) - 0.05 * eps
    buf = x.copy()
    assert host.sde_step(buf, eps, mu, 0.9, 0.05, 0.7, None, out=buf) is buf
    np.testing.assert_allclose(buf, expected, rtol=1e-6, atol=1e-6)


def test_match_stats_matches_osro(host):
    gen = torch.Generator().manual_seed(3)
    src = torch.rand(3, 30, 26, generator=gen) * 0.4
    ref = torch.rand(3, 30, 26, generator=gen) * 0.2 + 0.1
    valid = torch.rand(3, 30, 26, generator=gen) > 0.1
    src[2] = 0.25  # a constant slice: only shifted
    expected = osro.match_stats(src, ref, valid)
    got = host.match_stats(src, ref, valid)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the statistics really come from the valid pixels only
    v = valid[0]
    assert abs(float(got[0][v].mean()) - float(ref[0][v].mean())) < 1e-5
    assert abs(float(got[0][v].std(unbiased=False)) - float(ref[0][v].std(unbiased=False))) < 1e-5


def test_fuse_matches_osro(host):
    gen = torch.Generator().manual_seed(4)
    a, b = torch.rand(2, 9, 11, generator=gen), torch.rand(2, 9, 11, generator=gen)
    torch.testing.assert_close(host.fuse(a, b, 0.3), osro.fuse(a, b, 0.3), rtol=1e-6, atol=1e-7)
