"""Fixtures of the kernel tests: the host build (skipped without nvcc) and small geometries."""

from __future__ import annotations

import pytest

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.kernels import build


@pytest.fixture(scope="session")
def host():
    """``mar_rt.kernels.host`` with its library built; skips only when nvcc is absent (a failed
    build with nvcc present is an error, not a skip)."""
    if build.find_nvcc() is None:
        pytest.skip("nvcc not found: the host build of the CUDA kernels needs it")
    build.load_host_library()
    from mar_rt.kernels import host as host_module

    return host_module


@pytest.fixture(scope="session")
def small_geometry() -> FanBeamGeometry:
    """A non-square grid, an odd view count, offsets, and a detector that overhangs the image."""
    return FanBeamGeometry(
        n_rows=30,
        n_cols=26,
        pixel_size=0.5,
        n_views=45,
        n_det=57,
        det_spacing=0.6,
        source_distance=40.0,
        detector_distance=25.0,
        det_offset=0.35,
        angle_offset=0.1,
    )


@pytest.fixture(scope="session")
def sdl_few_views() -> FanBeamGeometry:
    """SynDeepLesion's 416² image and 641-bin detector, with 40 views (cheap reference tables)."""
    return FanBeamGeometry.syndeeplesion(n_views=40)
