"""DataConfig.image_inputs: pairs seen the way the image-only route sees them."""

from __future__ import annotations

import numpy as np
import torch

from mar_rt.ct.mar import METAL_THRESHOLD_MU, li_correct, segment_metal
from mar_rt.ct.projector import get_projector
from mar_rt.train.data_config import DataConfig, image_only_view
from mar_rt.train.pair_meta import PairMeta
from mar_rt.train.pairs import GEOMETRY, PairSet
from mar_rt.train.phantoms import ellipse_phantom


def _pairs() -> PairSet:
    """Two pairs on the 416² grid: one with a dense disc above the metal threshold, one whose
    implant stays below it (so nothing would be segmented)."""
    target = torch.from_numpy(ellipse_phantom(5, (416, 416)).astype(np.float32))
    r, c = np.ogrid[:416, :416]
    disc = torch.from_numpy((r - 230) ** 2 + (c - 250) ** 2 <= 49)
    ma = torch.stack([target.clone(), target.clone()])
    ma[0][disc] = 2.4  # titanium: segmented
    ma[1][disc] = 0.6  # below the threshold: the true mask is kept
    n = 2
    fields = {
        "image": torch.stack([target, target]),
        "ma_CT": ma,
        "LI_CT": torch.zeros(n, 416, 416),
        "mask": torch.stack([disc, disc]),
        "ma_sinogram": torch.zeros(n, *GEOMETRY.sino_shape),  # "measured": unlike FP(ma_CT)
        "LI_sinogram": torch.zeros(n, *GEOMETRY.sino_shape),
        "poly_sinogram": torch.ones(n, *GEOMETRY.sino_shape),
        "metal_trace": torch.zeros(n, *GEOMETRY.sino_shape, dtype=torch.bool),
        "NMAR_CT": torch.zeros(n, 416, 416),
    }
    metas = [PairMeta(f"toy_{i}", 0, 1, "Ti", 49, "disc", "mild", "abdomen") for i in range(n)]
    return PairSet(metas, fields)


def test_image_only_view_is_what_the_route_computes():
    pairs = _pairs()
    view = image_only_view(pairs)
    f, v = pairs.fields, view.fields
    proj = get_projector(GEOMETRY, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(v["ma_sinogram"], proj.forward(f["ma_CT"]))
    seg = segment_metal(f["ma_CT"][0], METAL_THRESHOLD_MU)
    assert torch.equal(v["mask"][0], seg) and torch.equal(v["mask"][1], f["mask"][1])
    for i in range(2):
        # LI of the reprojection, as `mar-rt eval --image-only` runs it (mar_rt.ct.mar)
        li = li_correct(f["ma_CT"][i], v["mask"][i], GEOMETRY, projector=proj, allow_edge=True)
        torch.testing.assert_close(v["LI_CT"][i], li["li_image"], rtol=0, atol=1e-5)
        assert torch.equal(v["metal_trace"][i], li["trace"])
    for name in ("image", "ma_CT", "poly_sinogram"):  # inputs and targets kept
        assert torch.equal(v[name], f[name])
    assert "NMAR_CT" not in v and view.metas == pairs.metas
    assert DataConfig().image_inputs == "measured"
    assert DataConfig(image_inputs="both").to_dict()["image_inputs"] == "both"
