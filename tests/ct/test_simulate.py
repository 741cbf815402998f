"""Metal artifact simulation (DESIGN §5) against the official SynDeepLesion case and physics."""

from __future__ import annotations

import dataclasses
import math

import h5py
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from mar_rt.ct import physics
from mar_rt.ct import simulate as sim
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.mar import segment_metal
from mar_rt.ct.units import MU_WATER, hu_to_mu, mu_to_hu

SDL = FanBeamGeometry.syndeeplesion()


def _small_geometry() -> FanBeamGeometry:
    g = SDL.with_image_size(96)
    return dataclasses.replace(
        g, n_views=120, n_det=137, det_spacing=2 * math.sqrt(2) * g.n_cols * g.pixel_size / 137
    )


def _small_phantom(n: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Water disc (+40 HU) with a bone rod and a 2-px-radius metal insert."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    image = np.where(xx**2 + yy**2 <= (0.42 * n) ** 2, hu_to_mu(40.0), 0.0)
    image[(xx - 15) ** 2 + (yy + 5) ** 2 <= 25] = hu_to_mu(1200.0)
    mask = (xx + 8) ** 2 + (yy - 3) ** 2 <= 4
    return image.astype(np.float32), mask


# --- the official case -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official(sdl_case_129):
    with h5py.File(sdl_case_129 / "gt.h5") as f:
        gt = {k: f[k][()] for k in f}
    with h5py.File(sdl_case_129 / "80.h5") as f:
        case = {k: f[k][()] for k in f}
    mask = segment_metal(case["ma_CT"]).numpy()
    out = sim.simulate_metal_artifact(gt["image"], mask, seed=0)
    return gt, case, mask, {k: v.numpy() for k, v in out.items()}


def test_outputs_have_the_official_layout(official) -> None:
    gt, case, _, out = official
    for name in ("image", "poly_CT", "poly_sinogram"):
        assert out[name].shape == gt[name].shape and out[name].dtype == np.float32
    for name in ("ma_CT", "ma_sinogram", "LI_CT", "LI_sinogram", "metal_trace"):
        assert out[name].shape == case[name].shape
    assert out["metal_trace"].dtype == bool and out["mask"].dtype == bool
    np.testing.assert_array_equal(out["image"], gt["image"])


def test_ma_sinogram_matches_official_outside_the_trace(official) -> None:
    gt, case, mask, out = official
    outside = case["metal_trace"] == 0
    ref = case["ma_sinogram"]
    rel = np.abs(out["ma_sinogram"] - ref)[outside].sum() / np.abs(ref[outside]).sum()
    inside = ~outside
    rel_in = np.abs(out["ma_sinogram"] - ref)[inside].sum() / np.abs(ref[inside]).sum()
    print(f"\nma_sinogram mean relative error: outside trace {rel:.4%}, inside {rel_in:.3%}")
    assert rel <= 0.015
    assert rel_in <= 0.05
    ref_poly = gt["poly_sinogram"]
    assert np.abs(out["poly_sinogram"] - ref_poly).sum() / np.abs(ref_poly).sum() <= 0.015


def test_artifact_strength_matches_official(official) -> None:
    from mar_rt.ct.fbp import fbp

    gt, case, mask, out = official
    roi = ~ndi.binary_dilation(mask, iterations=6)
    sinos = torch.from_numpy(np.stack([out["ma_sinogram"], case["ma_sinogram"]]))
    ours, theirs = fbp(sinos, SDL).numpy()  # the SAME reconstructor for both

    def rmse_hu(x: np.ndarray) -> float:
        return float(np.sqrt(np.mean((x - gt["image"])[roi] ** 2)) / MU_WATER * 1000)

    ratio = rmse_hu(ours) / rmse_hu(theirs)
    print(
        f"\nartifact RMSE outside metal+6px: ours {rmse_hu(ours):.1f} HU, "
        f"official {rmse_hu(theirs):.1f} HU, ratio {ratio:.3f}"
    )
    assert 0.75 <= ratio <= 1.25


def test_reconstructions_and_trace_agree_with_official(official) -> None:
    gt, case, mask, out = official
    assert np.abs(mu_to_hu(out["poly_CT"]) - mu_to_hu(gt["poly_CT"])).mean() <= 25
    official_trace = case["metal_trace"] > 0
    assert (out["metal_trace"] & official_trace).sum() / official_trace.sum() >= 0.98
    # as in the official files, ma_CT > 0.672 recovers the metal
    seg = out["ma_CT"] > 0.672
    assert (seg & mask).sum() / (seg | mask).sum() >= 0.7


# --- physics on a small geometry -----------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    from mar_rt.ct.projector import Projector

    g = _small_geometry()
    return g, Projector(g, dtype=torch.float64)


def test_deterministic_per_seed(small) -> None:
    g, proj = small
    image, mask = _small_phantom()
    a = sim.simulate_metal_artifact(image, mask, geometry=g, projector=proj, seed=3)
    b = sim.simulate_metal_artifact(image, mask, geometry=g, projector=proj, seed=3)
    c = sim.simulate_metal_artifact(image, mask, geometry=g, projector=proj, seed=4)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert not torch.equal(a["ma_sinogram"], c["ma_sinogram"])
    assert not torch.equal(a["poly_sinogram"], a["ma_sinogram"])


def test_noise_follows_poisson_statistics(small) -> None:
    """(noisy − noiseless) ≈ BHC'(p)·N(0, 1/λ) with λ = N0·e^{−p} + scatter."""
    g, proj = small
    image, mask = _small_phantom()
    n0 = 1e5
    kw = dict(geometry=g, projector=proj, photons=n0, scatter=20.0)
    noisy = sim.simulate_metal_artifact(image, mask, seed=1, **kw)["poly_sinogram"].double()
    clean = sim.simulate_metal_artifact(image, mask, noise=False, **kw)["poly_sinogram"].double()
    a1, a2, a3 = physics.water_bhc_coefficients()
    grid = np.linspace(0, 12, 200001)
    p_pre = np.interp(clean.numpy(), a1 * grid + a2 * grid**2 + a3 * grid**3, grid)
    lam = n0 * np.exp(-p_pre)  # expected counts (scatter included in the noiseless p)
    slope = a1 + 2 * a2 * p_pre + 3 * a3 * p_pre**2
    z = (noisy - clean).numpy() / (slope / np.sqrt(lam))
    assert np.std(z) == pytest.approx(1.0, abs=0.03)
    assert abs(np.mean(z)) < 0.05


def test_water_only_image_gives_monochromatic_projections(small) -> None:
    """No bone, noiseless: the BHC undoes water beam hardening, so p ≈ FP(image) (with the
    water under the metal removed, as the protocol zeroes both maps there)."""
    g, proj = small
    n = g.n_rows
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    image = np.where(xx**2 + yy**2 <= (0.42 * n) ** 2, MU_WATER, 0.0)
    mask = (xx + 8) ** 2 + (yy - 3) ** 2 <= 4
    out = sim.simulate_metal_artifact(image, mask, geometry=g, projector=proj, noise=False)
    mono = proj.forward(torch.from_numpy(np.where(mask, 0.0, image)))
    err = (out["poly_sinogram"].double() - mono).abs()
    assert float(err.max()) <= 0.02
    body = mono > 0.5
    assert float(err[body].sum() / mono[body].sum()) <= 0.01


def test_denser_metals_attenuate_more(small) -> None:
    g, proj = small
    image, mask = _small_phantom()
    means = []
    for metal in ("Ti", "Fe", "Cu", "Au"):
        out = sim.simulate_metal_artifact(
            image, mask, geometry=g, projector=proj, material=metal, noise=False
        )
        means.append(float(out["ma_sinogram"][out["metal_trace"]].mean()))
    assert means == sorted(means) and means[0] < means[-1] - 1


def test_batch_equals_single_slices(small) -> None:
    g, proj = small
    image, mask = _small_phantom()
    flipped = (image[:, ::-1].copy(), mask[:, ::-1].copy())
    batch = sim.simulate_metal_artifact(
        np.stack([image, flipped[0]]),
        np.stack([mask, flipped[1]]),
        geometry=g,
        projector=proj,
        noise=False,
    )
    single = sim.simulate_metal_artifact(
        flipped[0], flipped[1], geometry=g, projector=proj, noise=False
    )
    for name in single:
        torch.testing.assert_close(batch[name][1], single[name])


def test_material_split_closed_form() -> None:
    t_w, t_b = hu_to_mu(100.0), hu_to_mu(1500.0)
    mid = (t_w + t_b) / 2
    image = torch.tensor([[0.1, t_w, mid, t_b, 0.6, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[False, False, False, False, False, True]])
    water, bone = sim.split_materials(image, mask)
    torch.testing.assert_close(water[0], torch.tensor([0.1, t_w, mid / 2, 0, 0, 0]).double())
    torch.testing.assert_close(bone[0], torch.tensor([0, 0, mid / 2, t_b, 0.6, 0]).double())


def test_trace_edge_is_a_detector_erosion() -> None:
    trace = torch.tensor([[0, 1, 1, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    expected = np.array([[0, 1, 0, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(sim.trace_edge(trace).numpy(), expected)
    ref = trace.numpy() & ~ndi.binary_erosion(trace.numpy(), np.ones((1, 3)), border_value=1)
    np.testing.assert_array_equal(sim.trace_edge(trace).numpy(), ref)


def test_bad_inputs_are_named(small) -> None:
    g, proj = small
    image, mask = _small_phantom()
    kw = dict(geometry=g, projector=proj)
    with pytest.raises(ValueError, match="mask has no metal pixels"):
        sim.simulate_metal_artifact(image, np.zeros_like(mask), **kw)
    edge = mask.copy()
    edge[:, -1] = True
    with pytest.raises(ValueError, match=r"metal touches the image edge \(.*right column\)"):
        sim.simulate_metal_artifact(image, edge, **kw)
    bad = image.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="image_mu contains 1 NaN"):
        sim.simulate_metal_artifact(bad, mask, **kw)
    with pytest.raises(ValueError, match="image_mu has shape"):
        sim.simulate_metal_artifact(image[:50], mask[:50], **kw)
    with pytest.raises(ValueError, match="mask has shape"):
        sim.simulate_metal_artifact(image, mask[:50], **kw)
    with pytest.raises(ValueError, match="'bone' is not an implant metal"):
        sim.simulate_metal_artifact(image, mask, material="bone", **kw)
    with pytest.raises(ValueError, match="'mithril' is unknown"):
        sim.simulate_metal_artifact(image, mask, material="mithril", **kw)
