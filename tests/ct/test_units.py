"""Unit conversions (DESIGN §3) against closed-form values and the DeepLesion PNG convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mar_rt.ct import units


@pytest.mark.parametrize(
    ("hu", "mu"),
    [(0.0, 0.192), (-1000.0, 0.0), (1000.0, 0.384), (-2000.0, 0.0), (2500.0, 0.672)],
)
def test_hu_to_mu_closed_form(hu: float, mu: float) -> None:
    assert units.hu_to_mu(hu) == pytest.approx(mu, abs=1e-12)
    assert units.hu_to_mu(np.array([hu]))[0] == pytest.approx(mu, abs=1e-7)
    assert float(units.hu_to_mu(torch.tensor([hu]))[0]) == pytest.approx(mu, abs=1e-7)


def test_mu_to_hu_inverts_hu_to_mu_above_air() -> None:
    hu = np.linspace(-1000, 3000, 41)
    np.testing.assert_allclose(units.mu_to_hu(units.hu_to_mu(hu)), hu, atol=1e-9)
    t = torch.from_numpy(hu)
    torch.testing.assert_close(units.mu_to_hu(units.hu_to_mu(t)), t, atol=1e-9, rtol=0)
    # no clipping on the way back: negative μ from a reconstruction stays below −1000 HU
    assert units.mu_to_hu(-0.0192) == pytest.approx(-1100.0)


def test_network_scales() -> None:
    mu = np.array([-0.1, 0.0, 0.25, 0.5, 0.6])
    np.testing.assert_allclose(units.image_to_net(mu), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(units.net_to_image(units.image_to_net(mu)), np.clip(mu, 0, 0.5))
    # +1604 HU is the top of the image scale (DESIGN §3)
    assert units.image_to_net(units.hu_to_mu(1604.0)) == pytest.approx(1.0, abs=1e-4)
    p = torch.tensor([-1.0, 0.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(units.sino_to_net(p), torch.tensor([0, 0, 0.5, 1, 1]).double())
    torch.testing.assert_close(units.net_to_sino(units.sino_to_net(p)), p.clamp(0, 4))


def test_dtypes_follow_the_input() -> None:
    assert units.hu_to_mu(torch.zeros(2, dtype=torch.float64)).dtype == torch.float64
    assert units.hu_to_mu(torch.zeros(2, dtype=torch.int16)).dtype == torch.float32
    assert units.hu_to_mu(np.zeros(2, dtype=np.int32)).dtype == np.float32
    assert isinstance(units.hu_to_mu(0), float)


def test_deeplesion_png_values() -> None:
    raw = np.array([0, 32768, 31768, 65535], dtype=np.uint16)
    np.testing.assert_array_equal(units.deeplesion_png_to_hu(raw), [-32768, 0, -1000, 32767])
    assert units.deeplesion_png_to_hu(raw).dtype == np.float32
    t = units.deeplesion_png_to_hu(torch.from_numpy(raw.astype(np.int32)))
    assert t.dtype == torch.float32 and float(t[2]) == -1000.0


def test_deeplesion_png_file_gives_plausible_hu(shared_data) -> None:
    from PIL import Image

    with Image.open(shared_data / "clean-ct" / "deeplesion_000001_01_01_103.png") as im:
        hu = units.deeplesion_png_to_hu(np.asarray(im).astype(np.int32))
    # DeepLesion pads outside the scan circle with −3024 HU; inside it, the darkest pixels are
    # air near −1000 HU and the most common values are fat and soft tissue
    assert hu.min() == -3024
    inside = hu[hu > -2000]
    assert -1100 <= np.percentile(inside, 1) <= -900
    values, counts = np.unique(np.round(inside, -1), return_counts=True)
    assert -150 <= values[np.argmax(counts)] <= 100
    assert hu.max() <= 4000
