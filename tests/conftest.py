"""Shared fixtures: the real-data folder ``../shared/data`` beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SDL_TRAIN = SHARED_DATA / "syndeeplesion" / "train"


@pytest.fixture(scope="session", autouse=True)
def _session_artifact_cache(tmp_path_factory):
    """ONNX exports and engines built by the tests go to a session folder ($MAR_RT_CACHE),
    never to the user's ~/.cache/mar-rt."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MAR_RT_CACHE", str(tmp_path_factory.getbasetemp() / "mar-rt-cache"))
    yield
    patch.undo()


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the shared/ folder beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; skips the test when absent."""
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def sdl_case_129() -> Path:
    """SynDeepLesion training case 000129_03_01/115 (gt.h5 + 80.h5)."""
    return _need(SDL_TRAIN / "000129_03_01" / "115")


@pytest.fixture(scope="session")
def sdl_case_195() -> Path:
    """SynDeepLesion training case 000195_02_02/202 (gt.h5 + 0.h5)."""
    return _need(SDL_TRAIN / "000195_02_02" / "202")
