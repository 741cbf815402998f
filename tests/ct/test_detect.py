"""Metal detection, "do no harm": no clean real slice is flagged (dense contrast and dense
calcifications included), and simulated metal of every size group is found."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mar_rt.ct.detect import MetalCriteria, detect_metal
from mar_rt.ct.masks import SIZE_GROUPS, body_outline, generate_metal_mask
from mar_rt.ct.simulate import simulate_metal_artifact
from mar_rt.ct.units import mu_to_hu

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SDL_PIXEL_MM = 5.12 * 0.3 / 4.16  # 512/416 · 0.3 mm (DESIGN §4)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder is not beside the checkout)")
    return path


def _volumes():
    for npz in sorted(_need(DATA / "ct-volumes").glob("*.npz")):
        spacing = json.loads(npz.with_suffix(".json").read_text())["spacing_mm"]
        with np.load(npz) as data:
            yield npz.stem, data["hu"], spacing["x"] * spacing["y"]


def test_no_clean_real_slice_is_called_metal():
    flagged, candidates, n = [], [], 0
    for name, hu, area in _volumes():
        for k, plane in enumerate(hu):
            det = detect_metal(plane, area)
            n += 1
            if det.components:
                candidates.append((name, k))
            if det.has_metal:
                flagged.append((name, k, [c.reason for c in det.components]))
    for path in sorted((DATA / "clean-ct").rglob("*.npy")):
        det = detect_metal(np.load(path), (0.8 if "spineweb" in str(path) else 0.6) ** 2)
        n += 1
        if det.has_metal:
            flagged.append((path.name, 0, [c.reason for c in det.components]))
    assert n >= 318
    assert flagged == []
    # the test is not vacuous: the chest series holds dense contrast and a calcification
    # above 2500 HU (up to the 3071 HU ceiling) that a plain threshold calls metal
    assert len(candidates) >= 8 and all(name == "lidc_chest" for name, _ in candidates)


def test_dense_contrast_and_calcification_are_reported_as_rejected():
    hu = dict((name, v) for name, v, _ in _volumes())["lidc_chest"]
    calcification = detect_metal(hu[29], 0.703125**2)
    bolus = detect_metal(hu[67], 0.703125**2)
    for det in (calcification, bolus):
        assert not det.has_metal and len(det.rejected) >= 1
        assert max(c.peak_hu for c in det.rejected) >= 3000
    assert "not metal" in bolus.rejected[0].reason


@pytest.fixture(scope="module")
def clean_sdl():
    from mar_rt.ct.syndeeplesion import read_gt

    path = _need(DATA / "syndeeplesion" / "train" / "000129_03_01" / "115" / "gt.h5")
    return read_gt(path)["image"]


@pytest.mark.parametrize("size_px", [35, 77, 115, 254, 451, 885, 2061])
def test_simulated_metal_of_every_size_group_is_found(clean_sdl, size_px):
    body = body_outline(clean_sdl)
    mask = generate_metal_mask(seed=size_px, body_mask=body, size_px=size_px, kind="disc")
    sim = simulate_metal_artifact(torch.from_numpy(clean_sdl), torch.from_numpy(mask), seed=1)
    hu = mu_to_hu(sim["ma_CT"].numpy().astype(np.float64))
    det = detect_metal(hu, SDL_PIXEL_MM**2)
    assert (det.mask & mask).sum() == mask.sum()  # every metal pixel is in the mask
    assert (det.mask & ~mask).sum() < 0.5 * mask.sum() + 30  # and little else
    # on a 12-bit scanner (ceiling 3071 HU) metal is a saturated plateau: found from 20 mm²
    clipped = detect_metal(np.minimum(hu, 3071.0), SDL_PIXEL_MM**2)
    if mask.sum() * SDL_PIXEL_MM**2 >= 2 * MetalCriteria().plateau_mm2:
        assert (clipped.mask & mask).sum() >= 0.9 * mask.sum()
    assert {g.label for g in SIZE_GROUPS} >= {"small", "large"}


def test_criteria_are_checked_and_inputs_refused():
    with pytest.raises(ValueError, match="threshold_hu ≤ plateau_hu ≤ extended_hu"):
        MetalCriteria(plateau_hu=5000.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        detect_metal(np.full((8, 8), np.nan), 1.0)
    with pytest.raises(ValueError, match="pixel area"):
        detect_metal(np.zeros((8, 8)), 0.0)
    empty = detect_metal(np.zeros((8, 8)), 1.0)
    assert not empty.has_metal and empty.components == ()
