"""PipelineConfig's per-route overrides (``image_only``): validation, serialisation, and that
configs without them serialise exactly as before."""

from __future__ import annotations

import json

import pytest

from mar_rt.runtime.config import ROUTE_SWITCHES, PipelineConfig


def test_no_overrides_serialise_as_before():
    cfg = PipelineConfig(steps=1, mu_source="nmar", norm2=False)
    d = cfg.to_dict()
    assert "image_only" not in d  # an old bundle.json's "pipeline" section, byte for byte
    assert PipelineConfig.from_dict(d) == cfg and PipelineConfig.from_dict(d).image_only is None
    assert cfg.for_route("image_only") is cfg and cfg.for_route("sinogram") is cfg
    assert cfg.route_overrides("image_only") == {}


def test_overrides_round_trip_and_apply_to_the_image_only_route_only():
    over = {"osro_fidelity": False, "alpha": 0.25, "mu_source": "li", "norm2": True}
    cfg = PipelineConfig(steps=1, mu_source="nmar", alpha=0.5, image_only=over)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["image_only"] == over
    back = PipelineConfig.from_dict(d)
    assert back == cfg and hash(back) == hash(cfg)
    io = cfg.for_route("image_only")
    assert (io.alpha, io.osro_fidelity, io.mu_source, io.norm2) == (0.25, False, "li", True)
    assert io.image_only is None and io.steps == 1
    assert cfg.for_route("sinogram") is cfg
    with pytest.raises(ValueError, match="unknown route"):
        cfg.for_route("measured")


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"image_size": 256}, "may override only"),
        ({"bogus": 1}, "may override only"),
        ({"image_only": {}}, "may override only"),
        ({"residual_scale": 1.0}, "may override only"),
        ({"alpha": 1.5}, "alpha"),
        ({"mu_source": "x"}, "mu_source"),
        ({"steps": 0}, "steps"),
        ("alpha", "dict of switch overrides"),
    ],
)
def test_bad_overrides_are_refused_by_name(over, match):
    with pytest.raises(ValueError, match=match):
        PipelineConfig(image_only=over)


def test_every_route_switch_is_a_field():
    fields = set(PipelineConfig().to_dict())
    assert set(ROUTE_SWITCHES) <= fields
