"""Untrained test bundles shared by the runtime tests, built once per pytest session.

The bundle folder lives under the session's base temp dir, so every test module that asks
for the same bundle gets the one already written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.runtime.config import PipelineConfig
from mar_rt.runtime.demo import make_untrained_bundle, small_geometry

SMALL = 64
"""Image size of the fast test geometry (96 views × 97 bins)."""


def _bundle(
    factory: pytest.TempPathFactory, name: str, geometry: FanBeamGeometry, steps: int
) -> Path:
    folder = factory.getbasetemp() / name
    if not (folder / "bundle.json").is_file():
        make_untrained_bundle(
            folder,
            config="micro",
            seed=0,
            geometry=geometry,
            pipeline=PipelineConfig(steps=steps, image_size=geometry.n_rows),
        )
    return folder


def micro_bundle(factory: pytest.TempPathFactory) -> Path:
    """Micro networks on the 64² test geometry, 2 steps by default."""
    return _bundle(factory, "micro-64", small_geometry(SMALL), steps=2)


def micro_bundle_sdl(factory: pytest.TempPathFactory) -> Path:
    """Micro networks on the SynDeepLesion geometry (416², 640 × 641), 1 step by default."""
    return _bundle(factory, "micro-sdl", FanBeamGeometry.syndeeplesion(), steps=1)
