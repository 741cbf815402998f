"""Host build of the Joseph projector and its adjoints against the torch reference (mar_rt.ct).

Tolerances: float32 kernels against the float64 reference, ‖·‖-relative ≤ 1e-5.  The adjoint
identity ⟨Ax, y⟩ = ⟨x, Aᵀy⟩ is a cancellation-free sum of ~10⁵–10⁶ float32 products on each
side, so it is held to 1e-4 relative (measured ~1e-9 at 416²); the explicit-transpose test
compares against Aᵀ assembled column by column from the forward kernel itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mar_rt.ct import projector as ref
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.errors import BadInputError
from tests.kernels._util import phantom, rel_error

pytestmark = pytest.mark.nvcc


def test_forward_matches_reference(host, small_geometry):
    g = small_geometry
    x = phantom(g.n_rows, g.n_cols, seed=1, batch=2)
    expected = ref.forward_project(x.double(), g)
    got = host.forward_project(x, g)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert got.shape == (2, g.n_views, g.n_det)
    assert rel_error(got, expected) < 1e-5


@pytest.mark.parametrize("gpu_layout", [False, True])
@pytest.mark.parametrize("nb", [1, 2, 4, 8])
def test_forward_instantiations(host, small_geometry, gpu_layout, nb):
    """The GPU's instantiations (transposed column-branch reads, nb slices per thread, with a
    partial last chunk of slices) against the reference."""
    g = small_geometry
    x = phantom(g.n_rows, g.n_cols, seed=2, batch=3)
    p = host.get_host_projector(g)
    got = p.forward(x, slices_per_thread=nb, gpu_layout=gpu_layout)
    assert rel_error(got, ref.forward_project(x.double(), g)) < 1e-5
    np.testing.assert_allclose(got, p.forward(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["scatter", "gather"])
def test_adjoint_matches_reference(host, small_geometry, method):
    g = small_geometry
    y = torch.from_numpy(np.random.default_rng(2).random((2, *g.sino_shape), dtype=np.float32))
    expected = ref.back_project(y.double(), g)
    got = host.back_project(y, g, method=method)
    assert rel_error(got, expected) < 1e-5


@pytest.mark.parametrize("nb", [2, 4, 8])
def test_gather_adjoint_instantiations(host, small_geometry, nb):
    g = small_geometry
    y = torch.from_numpy(np.random.default_rng(3).random((3, *g.sino_shape), dtype=np.float32))
    got = host.get_host_projector(g).adjoint(y, method="gather", slices_per_thread=nb)
    assert rel_error(got, ref.back_project(y.double(), g)) < 1e-5


def test_adjoints_are_the_explicit_transpose(host):
    """Aᵀ assembled from forward projections of unit images, against both adjoint bodies."""
    g = FanBeamGeometry(
        n_rows=12,
        n_cols=10,
        pixel_size=1.0,
        n_views=23,
        n_det=31,
        det_spacing=1.1,
        source_distance=30.0,
        detector_distance=20.0,
        det_offset=-0.4,
        angle_offset=0.3,
    )
    n_pix = g.n_rows * g.n_cols
    units = np.eye(n_pix, dtype=np.float32).reshape(n_pix, g.n_rows, g.n_cols)
    a = host.forward_project(units, g).reshape(n_pix, -1).T.astype(np.float64)  # (rays, pixels)
    assert np.count_nonzero(a) > 0
    y = np.random.default_rng(3).standard_normal(g.sino_shape).astype(np.float32)
    expected = (a.T @ y.ravel().astype(np.float64)).reshape(g.image_shape)
    for method in ("scatter", "gather"):
        got = host.back_project(y, g, method=method)
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), method


@pytest.mark.parametrize("method", ["scatter", "gather"])
def test_adjoint_identity_at_syndeeplesion_size(host, method):
    g = FanBeamGeometry.syndeeplesion()
    rng = np.random.default_rng(4)
    x = rng.random(g.image_shape, dtype=np.float32)
    y = rng.random(g.sino_shape, dtype=np.float32)
    ax = host.forward_project(x, g)
    aty = host.back_project(y, g, method=method)
    lhs = np.vdot(ax.astype(np.float64), y.astype(np.float64))
    rhs = np.vdot(x.astype(np.float64), aty.astype(np.float64))
    assert abs(lhs - rhs) <= 1e-4 * abs(lhs)


def test_syndeeplesion_grid_forward_matches_reference(host, sdl_few_views):
    """416² and 641 bins (40 views keep the reference's tables cheap)."""
    g = sdl_few_views
    x = phantom(*g.image_shape, seed=5)
    assert rel_error(host.forward_project(x, g), ref.forward_project(x.double(), g)) < 1e-5


@pytest.mark.slow
def test_syndeeplesion_forward_matches_reference(host):
    """The full 416² / 640 × 641 protocol against ct (~20 s of reference tables on 2 cores;
    the 40-view test above covers the same code)."""
    g = FanBeamGeometry.syndeeplesion()
    x = phantom(*g.image_shape, seed=5)
    assert rel_error(host.forward_project(x, g), ref.forward_project(x, g)) < 1e-5


@pytest.mark.parametrize("method", ["scatter", "gather"])
def test_syndeeplesion_grid_adjoint_matches_reference(host, sdl_few_views, method):
    """416² and 641 bins (40 views keep the reference's tables cheap)."""
    g = sdl_few_views
    y = torch.from_numpy(np.random.default_rng(6).random(g.sino_shape, dtype=np.float32))
    expected = ref.back_project(y, g)
    assert rel_error(host.back_project(y, g, method=method), expected) < 1e-5


def test_batch_out_and_array_kinds(host, small_geometry):
    g = small_geometry
    x = phantom(g.n_rows, g.n_cols, seed=7, batch=3).numpy()
    batched = host.forward_project(x, g)
    assert isinstance(batched, np.ndarray)
    for b in range(3):
        np.testing.assert_array_equal(batched[b], host.forward_project(x[b], g))
    out = np.full((3, *g.sino_shape), np.nan, dtype=np.float32)
    assert host.forward_project(x, g, out=out) is out
    np.testing.assert_array_equal(out, batched)
    # float64 and non-contiguous inputs are converted, not refused
    np.testing.assert_allclose(
        host.forward_project(np.asfortranarray(x[0].astype(np.float64)), g), batched[0], rtol=1e-6
    )


def test_bad_inputs_are_refused(host, small_geometry):
    g = small_geometry
    with pytest.raises(BadInputError, match="image has shape"):
        host.forward_project(np.zeros((5, 5), np.float32), g)
    bad = np.zeros(g.sino_shape, np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(BadInputError, match="NaN"):
        host.back_project(bad, g)
    with pytest.raises(BadInputError, match="out must be"):
        host.forward_project(np.zeros(g.image_shape, np.float32), g, out=np.zeros(3, np.float32))


def test_planes_beyond_the_32_bit_index_are_refused():
    import dataclasses

    from mar_rt.kernels._arrays import geometry_tables

    assert 46341**2 >= 2**31 > 46340**2
    huge = dataclasses.replace(
        FanBeamGeometry.syndeeplesion(), n_rows=46341, n_cols=46341, pixel_size=1e-4
    )
    with pytest.raises(BadInputError, match="32-bit in-plane index"):
        geometry_tables(huge)
