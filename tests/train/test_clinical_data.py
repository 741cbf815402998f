"""The clinical recipe's data: per-pair simulator settings, both routes' image inputs, the
official cases kept out of training (issue 21)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from mar_rt.ct import physics
from mar_rt.ct.sim_settings import TRAINING_RANGES, SimulationSettings
from mar_rt.train.data_config import DataConfig
from mar_rt.train.domains import DomainData, concat_domains
from mar_rt.train.pairs import generate_pairs, pair_settings, simulate_pair
from mar_rt.train.phantoms import ellipse_phantom
from mar_rt.train.presets import recipe_config
from mar_rt.train.sources import CleanSlice, series_id
from mar_rt.train.split import split_slices


def test_protocol_settings_are_the_protocol():
    assert pair_settings("protocol", 123, "Fe") == SimulationSettings(material="Fe")


def test_training_settings_are_a_seeded_draw_with_the_implant_metal():
    a, b = pair_settings("training", 11, "Au"), pair_settings("training", 11, "Au")
    assert a == b  # deterministic per pair seed
    assert a != pair_settings("training", 12, "Au")
    draws = [pair_settings("training", s, "Ti") for s in range(40)]
    r = TRAINING_RANGES
    for d in draws:
        assert d.material == "Ti"
        scale = d.metal_density / physics.DENSITY["Ti"]
        assert r.density_scale[0] <= scale <= r.density_scale[1]
        assert r.photons[0] <= d.photons <= r.photons[1]
        assert d.upsample in r.upsample and d.bhc in r.bhc and d.filter in r.filters
    # the draws really vary what the issue lists (BHC, kernel, photons)
    assert len({d.bhc for d in draws}) == 3 and len({d.filter for d in draws}) >= 4
    assert max(d.photons for d in draws) / min(d.photons for d in draws) > 5
    with pytest.raises(ValueError, match="is for|are for"):
        simulate_pair(
            np.zeros((416, 416), np.float32), np.zeros((416, 416), bool), material="Fe",
            seed=0, device="cpu", settings=SimulationSettings(material="Ti"),
        )  # fmt: skip


def test_a_cache_of_other_settings_is_not_reused(tmp_path):
    sl = CleanSlice("toy_c", ellipse_phantom(3, region="abdomen"), "phantom", "generated")
    jobs = [(0, 0, 400)]
    first = generate_pairs([sl], jobs, seed=0, cache_dir=tmp_path, sim_ranges="protocol")
    again = generate_pairs([sl], jobs, seed=0, cache_dir=tmp_path, sim_ranges="protocol")
    torch.testing.assert_close(again.fields["ma_CT"], first.fields["ma_CT"])  # read back
    drawn = generate_pairs([sl], jobs, seed=0, cache_dir=tmp_path, sim_ranges="training")
    index = json.loads((tmp_path / "pairs.json").read_text())
    assert index["config"]["sim_ranges"] == "training"
    # same mask, other physics: a new simulation, not the protocol's cached file
    assert torch.equal(drawn.fields["mask"], first.fields["mask"])
    assert float((drawn.fields["ma_CT"] - first.fields["ma_CT"]).abs().max()) > 0.01
    with pytest.raises(ValueError, match="sim_ranges"):
        generate_pairs([sl], jobs, seed=0, sim_ranges="scanner")


def test_concat_domains_keeps_items_in_order():
    def part(v: float, n: int) -> DomainData:
        t = torch.full((n, 1, 4, 4), v)
        return DomainData(
            kind="image", x0=t, mu=t + 1, weight=t * 0 + 1,
            points=[torch.zeros(1, 2, dtype=torch.int32) + i for i in range(n)],
            content=torch.full((n, 3), v), artifact=torch.full((n, 3), -v),
        )  # fmt: skip

    both = concat_domains([part(1.0, 2), part(2.0, 3)])
    assert len(both) == 5 and len(both.points) == 5
    assert both.mu[:, 0, 0, 0].tolist() == [2, 2, 3, 3, 3]
    assert both.artifact[:, 0].tolist() == [-1, -1, -2, -2, -2]
    bad = dataclasses.replace(part(1.0, 1), kind="sinogram")
    with pytest.raises(ValueError, match="kinds"):
        concat_domains([part(1.0, 1), bad])


def test_clinical_recipe_keeps_the_official_cases_out_of_training():
    r = recipe_config("clinical-cpu")
    assert r.data == dataclasses.replace(r.data)  # frozen, valid
    assert r.data.sim_ranges == "training" and r.data.image_inputs == "both"
    img = ellipse_phantom(4, region="abdomen")
    slices = [
        CleanSlice("sdl_000129_03_01_115", img, "SynDeepLesion train", ""),
        CleanSlice("sdl_000195_02_02_202", img, "SynDeepLesion train", ""),
        CleanSlice("cleanct_000372_05_01_030", img, "ADN", ""),
    ]
    assert {series_id(s) for s in slices[:2]} == set(r.data.exclude_series)
    train, _ = split_slices(slices, r.data.val_ids, r.data.exclude_series)
    assert [s.slice_id for s in train] == ["cleanct_000372_05_01_030"]
    train, _ = split_slices(slices, r.data.val_ids)  # the tiny recipe still trains on them
    assert len(train) == 3
    with pytest.raises(ValueError, match="image_inputs"):
        DataConfig(image_inputs="scanner")
    with pytest.raises(ValueError, match="sim_ranges"):
        DataConfig(sim_ranges="scanner")


def test_four_step_recipe_starts_where_the_one_step_recipe_starts():
    """clinical-cpu-s4 is clinical-cpu with T = 4: same data and networks, and the same
    marginal at t = T (x_T = μ + eps (x_0 − μ) + λz), so T = 1 weights are a fair start."""
    from mar_rt.models.sde import make_schedule

    one, four = recipe_config("clinical-cpu"), recipe_config("clinical-cpu-s4")
    assert (one.sde.T, four.sde.T) == (1, 4)
    assert (four.pipeline.steps, four.residual_loop_steps) == (4, 4)
    assert four.data == one.data and four.unet == one.unet
    s1, s4 = make_schedule(one.sde), make_schedule(four.sde)
    assert s4.decay(4) == pytest.approx(s1.decay(1)) == pytest.approx(one.sde.eps)
    assert s4.sigma_bars[4] == pytest.approx(s1.sigma_bars[1])
    # the intermediate states lie between μ + λz and x_0: the reverse loop has work to do
    assert 0 < s4.sigma_bars[1] < s4.sigma_bars[2] < s4.sigma_bars[3] < s4.sigma_bars[4]


def test_train_help_names_every_preset():
    """`mar-rt train --config`'s help is written out (the CLI does not import torch to build
    it), so it must list the presets ``recipe_config`` accepts."""
    import re
    import typing

    from mar_rt.cli.train import ConfigOpt
    from mar_rt.train.presets import PRESETS

    help_text = typing.get_args(ConfigOpt)[1].help
    named = set(re.findall(r"[a-z0-9-]+", help_text.split(":", 1)[1]))
    assert named == {*PRESETS, "tiny"}
