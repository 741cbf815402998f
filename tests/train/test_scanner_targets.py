"""DataConfig.image_target="scanner": the image U-Net's target is the metal-free, noise-free
image of each pair's own scan (domains.with_scanner_targets)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mar_rt.ct.simulate import simulate_metal_artifact
from mar_rt.ct.units import MU_WATER, image_to_net, mu_to_hu
from mar_rt.train.data_config import DataConfig
from mar_rt.train.domains import image_domain, with_scanner_targets
from mar_rt.train.pair_meta import PairMeta
from mar_rt.train.pairs import GEOMETRY, PairSet, pair_settings
from mar_rt.train.presets import recipe_config

N = 416
_R, _C = np.ogrid[:N, :N]
_DIST = np.hypot(_R - 208, _C - 208)
_METAL = np.hypot(_R - 208, _C - 260) <= 4


def _water_pairs(n: int = 1) -> PairSet:
    """``n`` pairs of a water disc (radius 150 px) with a small titanium disc inside."""
    water = torch.from_numpy(np.where(_DIST <= 150, MU_WATER, 0.0).astype(np.float32))
    mask = torch.from_numpy(_METAL)
    fields = {
        "image": torch.stack([water] * n),
        "mask": torch.stack([mask] * n),
        "ma_CT": torch.stack([water] * n),
        "NMAR_CT": torch.stack([water] * n),
    }
    metas = [PairMeta(f"water_{i}", 0, 11 + i, "Ti", int(_METAL.sum()), "disc", "mild", "abdomen")
             for i in range(n)]  # fmt: skip
    return PairSet(metas, fields)


def _interior() -> np.ndarray:
    """Inside the disc, away from its rim and from the metal."""
    far_metal = np.hypot(_R - 208, _C - 260) > 30
    return (_DIST < 120) & far_metal


def test_protocol_scan_of_water_is_water_without_noise():
    # the protocol's water beam-hardening correction linearises water exactly, so the scanner's
    # metal-free image of a water disc is water (0 HU) away from its rim
    pairs = _water_pairs()
    out = with_scanner_targets(pairs, sim_ranges="protocol").fields
    inside = _interior()
    target = mu_to_hu(out["scanner_CT"][0].numpy())
    assert abs(target[inside].mean()) < 3.0, target[inside].mean()
    # the protocol reconstructs with Ram-Lak, the pipeline's kernel: both targets agree
    torch.testing.assert_close(out["scanner_CT"], out["scanner_CT_own"], rtol=0, atol=1e-4)
    # it is the expectation of the pair's noisy scans: a scan minus the target is the noise
    # alone, whose variance is half that of the difference of two independent scans
    scans = [
        mu_to_hu(
            simulate_metal_artifact(
                pairs.fields["image"][0], pairs.fields["mask"][0], geometry=GEOMETRY, seed=s
            )["poly_CT"].numpy()
        )[inside]
        for s in (3, 4)
    ]
    noise_var = (scans[0] - target[inside]).var()
    ratio = noise_var / ((scans[0] - scans[1]).var() / 2)
    assert 0.85 < ratio < 1.15, ratio


def test_uncorrected_scan_keeps_its_cupping():
    # a training draw without beam-hardening correction: water reads low, and lower in the
    # centre than near the rim (cupping), which the target now keeps
    seed = next(s for s in range(200) if pair_settings("training", s, "Ti").bhc == "none")
    pairs = _water_pairs()
    pairs = PairSet([dataclasses.replace(pairs.metas[0], seed=seed)], pairs.fields)
    hu = mu_to_hu(with_scanner_targets(pairs, sim_ranges="training").fields["scanner_CT"][0])
    hu = hu.numpy()
    centre = hu[_DIST < 30].mean()
    rim = hu[(_DIST > 125) & (_DIST < 135) & (np.hypot(_R - 208, _C - 260) > 30)].mean()
    assert centre < -20.0, centre
    assert centre < rim - 5.0, (centre, rim)


def test_cached_targets_are_read_back(tmp_path: Path):
    pairs = _water_pairs()
    first = with_scanner_targets(pairs, sim_ranges="protocol", cache_dir=tmp_path).fields
    files = sorted(tmp_path.glob("scanner-*.pt"))
    assert len(files) == 1
    again = with_scanner_targets(pairs, sim_ranges="protocol", cache_dir=tmp_path).fields
    assert torch.equal(first["scanner_CT"], again["scanner_CT"])
    # another kernel is another cache entry
    with_scanner_targets(pairs, sim_ranges="protocol", filter="hann", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("scanner-*.pt"))) == 2


def test_image_domain_target_and_recipe_wiring(tmp_path: Path):
    from mar_rt.train.recipe import _domain_data

    pairs = _water_pairs()
    target = torch.full((1, N, N), 0.1)
    fields = {**pairs.fields, "scanner_CT": target, "scanner_CT_own": target + 0.01}
    pairs = PairSet(pairs.metas, fields)
    emb = torch.zeros(1, 4)
    dom = image_domain(pairs, emb, emb, mu_source="nmar", target="scanner_CT")
    assert torch.equal(dom.x0, image_to_net(target)[:, None])
    with pytest.raises(ValueError, match="scanner_CT_x"):
        image_domain(pairs, emb, emb, mu_source="nmar", target="scanner_CT_x")
    with pytest.raises(ValueError, match="image_target"):
        DataConfig(image_target="sharp")

    # the recipe: measured μ → scanner_CT (pipeline kernel), image-only μ → scanner_CT_own
    recipe = recipe_config("clinical-cpu-scanner")
    recipe = dataclasses.replace(
        recipe,
        data=dataclasses.replace(recipe.data, image_inputs="measured"),
        pipeline=dataclasses.replace(recipe.pipeline, mu_source="nmar"),
        cache_pairs=False,
    )
    run = SimpleNamespace(recipe=recipe, work=tmp_path, train=pairs, emb={"image": (emb, emb)})
    dom = _domain_data(run, "image")
    assert torch.equal(dom.x0, image_to_net(target)[:, None])
    clean = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, image_target="clean"))
    run = SimpleNamespace(recipe=clean, work=tmp_path, train=pairs, emb={"image": (emb, emb)})
    assert torch.equal(_domain_data(run, "image").x0, image_to_net(pairs.fields["image"])[:, None])
