"""CuPy kernels against the torch-CUDA reference (mar_rt.ct, models.sde, runtime.osro) and the
host build.  Marked ``gpu``; skipped without CuPy and a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mar_rt.ct import mar as ref_mar
from mar_rt.ct import projector as ref
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.ramp import filter_sinogram
from mar_rt.runtime import osro
from tests.kernels._util import phantom, rel_error

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    from mar_rt.kernels import gpu as gpu_module

    ok, why = gpu_module.gpu_available()
    if not ok:
        pytest.skip(f"no GPU kernels here: {why}")
    return gpu_module


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch.device("cuda")


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x.get()


@pytest.mark.parametrize("batch", [1, 3, 11])  # 11 = one chunk of 8, one of 2, one of 1 ...
@pytest.mark.parametrize("geometry", ["small", "sdl40"])
def test_projector_matches_reference(gpu, cuda, small_geometry, sdl_few_views, geometry, batch):
    g = small_geometry if geometry == "small" else sdl_few_views
    x = phantom(g.n_rows, g.n_cols, seed=1, batch=batch).to(cuda)
    expected = ref.forward_project(x.double(), g)
    got = gpu.forward_project(x, g)
    assert isinstance(got, torch.Tensor) and got.is_cuda
    assert rel_error(_np(got), _np(expected)) < 1e-5
    y = torch.rand(batch, *g.sino_shape, device=cuda)
    expected_bp = ref.back_project(y.double(), g)
    for method in ("gather", "scatter"):
        assert rel_error(_np(gpu.back_project(y, g, method=method)), _np(expected_bp)) < 1e-5
    expected_fbp = ref.get_projector(g, cuda, torch.float64).fbp(y.double())
    q = filter_sinogram(y.double(), g).float()
    got_fbp = gpu.get_gpu_projector(g).backproject_filtered(q)
    assert rel_error(_np(got_fbp), _np(expected_fbp)) < 1e-5


def test_adjoint_identity_on_gpu(gpu, cuda):
    import cupy as cp

    g = FanBeamGeometry.syndeeplesion()
    rng = cp.random.default_rng(2)
    x = rng.random(g.image_shape, dtype=cp.float32)
    y = rng.random(g.sino_shape, dtype=cp.float32)
    lhs = float(cp.vdot(gpu.forward_project(x, g).astype(cp.float64), y.astype(cp.float64)))
    for method in ("gather", "scatter"):
        aty = gpu.back_project(y, g, method=method)
        rhs = float(cp.vdot(x.astype(cp.float64), aty.astype(cp.float64)))
        assert abs(lhs - rhs) <= 1e-4 * abs(lhs), method


def test_fbp_matches_reference(gpu, cuda, sdl_few_views):
    g = sdl_few_views
    sino = ref.forward_project(phantom(*g.image_shape, seed=3).to(cuda).double(), g)
    expected = ref.get_projector(g, cuda, torch.float64).fbp(sino)
    assert rel_error(_np(gpu.fbp(sino.float(), g)), _np(expected)) < 1e-5
    q = filter_sinogram(sino, g).float()
    got_bp = gpu.get_gpu_projector(g).backproject_filtered(q)
    assert rel_error(_np(got_bp), _np(expected)) < 1e-5


def test_mar_kernels_match_reference(gpu, cuda, small_geometry):
    g = small_geometry
    yy, xx = torch.meshgrid(torch.arange(g.n_rows), torch.arange(g.n_cols), indexing="ij")
    mask = ((yy - 12) ** 2 + (xx - 14) ** 2 < 16).to(cuda)
    got = gpu.metal_trace(mask, g)
    expected = ref_mar.metal_trace(mask, g)
    differ = got != expected
    assert int(expected.sum()) > 20
    fp = ref.forward_project(mask.double(), g)
    assert bool((fp[differ].abs() < 1e-4).all())
    sino = torch.rand(*g.sino_shape, device=cuda)
    li = gpu.li_inpaint(sino, expected)
    torch.testing.assert_close(li, ref_mar.li_inpaint(sino, expected), rtol=0, atol=1e-7)


def test_sde_and_osro_match_reference(gpu, cuda):
    gen = torch.Generator(device=cuda).manual_seed(5)
    x, eps, mu, z = (torch.randn(2, 1, 33, 31, device=cuda, generator=gen) for _ in range(4))
    expected = mu + 0.9 * (x - mu) - 0.05 * eps + 0.01 * z
    torch.testing.assert_close(gpu.sde_step(x, eps, mu, 0.9, 0.05, 0.01, z), expected)
    buf = x.clone()
    assert gpu.sde_step(buf, eps, mu, 0.9, 0.05, 0.0, None, out=buf) is buf
    torch.testing.assert_close(buf, mu + 0.9 * (x - mu) - 0.05 * eps)
    src, refi = torch.rand(3, 40, 36, device=cuda), torch.rand(3, 40, 36, device=cuda)
    valid = torch.rand(3, 40, 36, device=cuda) > 0.2
    torch.testing.assert_close(
        gpu.match_stats(src, refi, valid), osro.match_stats(src, refi, valid), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(gpu.fuse(src, refi, 0.3), osro.fuse(src, refi, 0.3))


def test_torch_outputs_are_dlpack_views(gpu, cuda, small_geometry):
    g = small_geometry
    x = phantom(g.n_rows, g.n_cols, seed=6).to(cuda)
    out = torch.empty(g.sino_shape, device=cuda)
    assert gpu.forward_project(x, g, out=out) is out
    torch.testing.assert_close(out, gpu.forward_project(x, g))


def test_gpu_matches_host_build(gpu, cuda, small_geometry):
    from mar_rt.kernels import build

    if build.find_nvcc() is None:
        pytest.skip("nvcc not found: no host build to compare with")
    from mar_rt.kernels import host

    g = small_geometry
    x = phantom(g.n_rows, g.n_cols, seed=7)
    np.testing.assert_allclose(
        _np(gpu.forward_project(x.to(cuda), g)),
        host.forward_project(x, g).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
