"""Host build of the metal-trace and LI kernels against mar_rt.ct.mar and the official files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mar_rt.ct import mar as ref
from mar_rt.ct import projector as ref_projector
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.errors import BadInputError

pytestmark = pytest.mark.nvcc


def _disc_mask(g: FanBeamGeometry) -> torch.Tensor:
    yy, xx = np.mgrid[0 : g.n_rows, 0 : g.n_cols]
    mask = (yy - 0.4 * g.n_rows) ** 2 + (xx - 0.55 * g.n_cols) ** 2 < (0.12 * g.n_rows) ** 2
    mask |= (np.abs(yy - 0.7 * g.n_rows) < 1.5) & (np.abs(xx - 0.3 * g.n_cols) < 4)  # a rod
    return torch.from_numpy(mask)


def test_metal_trace_matches_reference(host, small_geometry):
    """Equal except on grazing rays, where FP(M) is ~0 and the float rounding of the Joseph
    weights decides the sign; there the reference's FP(M) must be below 1e-4 cm."""
    g = small_geometry
    mask = _disc_mask(g)
    got = host.metal_trace(mask, g)
    expected = ref.metal_trace(mask, g)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bool
    assert int(expected.sum()) > 50
    differ = got != expected
    fp = ref_projector.forward_project(mask.double(), g)
    assert bool((fp[differ].abs() < 1e-4).all())
    assert int(differ.sum()) <= 0.01 * int(expected.sum())


def test_li_matches_reference(host):
    """Runs in the middle, at both detector ends, a whole-trace view and an empty view."""
    rng = np.random.default_rng(11)
    sino = rng.random((3, 8, 40), dtype=np.float32)
    trace = rng.random(sino.shape) < 0.3
    trace[0, 0, :5] = True  # left end
    trace[0, 1, -7:] = True  # right end
    trace[1, 2, :] = True  # whole view
    trace[1, 3, :] = False  # nothing to do
    expected = ref.li_inpaint(torch.from_numpy(sino), torch.from_numpy(trace)).numpy()
    got = host.li_inpaint(sino, trace)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(got[1, 2], sino[1, 2])
    np.testing.assert_array_equal(got[~trace], sino[~trace])


def test_li_reproduces_official_li_sinogram(host, sdl_case_129):
    """DESIGN §4: LI of ma_sinogram across metal_trace reproduces LI_sinogram to ~2.4e-7."""
    import h5py

    with h5py.File(sdl_case_129 / "80.h5") as f:
        ma = f["ma_sinogram"][()]
        trace = f["metal_trace"][()]
        li = f["LI_sinogram"][()]
    got = host.li_inpaint(ma, trace)
    assert np.abs(got - li).max() < 1e-6
    assert trace.sum() > 0


def test_li_refuses_mismatched_trace(host):
    with pytest.raises(BadInputError, match="trace has shape"):
        host.li_inpaint(np.zeros((4, 9), np.float32), np.zeros((4, 8), bool))


def test_metal_trace_at_syndeeplesion_size(host, sdl_case_129):
    """Trace of the official case's metal (ma_CT > 0.672, DESIGN §6) against the file's trace:
    the mask is only approximate, so most — not all — bins agree."""
    import h5py

    with h5py.File(sdl_case_129 / "80.h5") as f:
        mask = f["ma_CT"][()] > 0.672
        official = f["metal_trace"][()].astype(bool)
    got = host.metal_trace(mask, FanBeamGeometry.syndeeplesion())
    inter = np.logical_and(got, official).sum()
    union = np.logical_or(got, official).sum()
    assert inter / union > 0.8
