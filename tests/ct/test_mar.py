"""Segmentation, metal trace, LI and NMAR (DESIGN §6) against the official SynDeepLesion files
and closed forms."""

from __future__ import annotations

import dataclasses
import math

import h5py
import numpy as np
import pytest
import torch

from mar_rt.ct import mar
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.metrics import psnr
from mar_rt.ct.units import MU_WATER

SDL = FanBeamGeometry.syndeeplesion()
CASES = [("sdl_case_129", "80.h5"), ("sdl_case_195", "0.h5")]


def _small_geometry() -> FanBeamGeometry:
    g = SDL.with_image_size(96)
    return dataclasses.replace(
        g, n_views=120, n_det=137, det_spacing=2 * math.sqrt(2) * g.n_cols * g.pixel_size / 137
    )


def _load(folder, name):
    with h5py.File(folder / "gt.h5") as f:
        gt = {k: f[k][()] for k in f}
    with h5py.File(folder / name) as f:
        case = {k: f[k][()] for k in f}
    return gt, case


@pytest.mark.parametrize(("fixture", "name"), CASES)
def test_li_inpaint_reproduces_official_li_sinogram(fixture, name, request) -> None:
    _, case = _load(request.getfixturevalue(fixture), name)
    li = mar.li_inpaint(case["ma_sinogram"], case["metal_trace"] > 0)
    assert li.dtype == torch.float32
    assert float((li - torch.from_numpy(case["LI_sinogram"])).abs().max()) <= 1e-4


@pytest.mark.parametrize(("fixture", "name"), CASES)
def test_fbp_of_official_li_sinogram_matches_li_ct(fixture, name, request) -> None:
    from mar_rt.ct.fbp import fbp

    _, case = _load(request.getfixturevalue(fixture), name)
    image = fbp(torch.from_numpy(case["LI_sinogram"]), SDL).numpy()
    mae_hu = np.abs(image - case["LI_CT"]).mean() / MU_WATER * 1000
    assert mae_hu <= 20.0, mae_hu


def test_li_inpaint_closed_form() -> None:
    p = torch.arange(10, dtype=torch.float64).repeat(4, 1) ** 2  # rows: j²
    tr = torch.zeros(4, 10, dtype=torch.bool)
    tr[0, 3:6] = True  # interior run: line from (2, 4) to (6, 36)
    tr[1, :3] = True  # run at the left end: nearest outside value p[3] = 9
    tr[2, 7:] = True  # run at the right end: p[6] = 36
    tr[3, :] = True  # whole view in the trace: unchanged
    out = mar.li_inpaint(p, tr)
    np.testing.assert_allclose(out[0, 2:7], [4, 12, 20, 28, 36])
    np.testing.assert_allclose(out[1, :4], [9, 9, 9, 9])
    np.testing.assert_allclose(out[2, 6:], [36, 36, 36, 36])
    torch.testing.assert_close(out[3], p[3])
    torch.testing.assert_close(out[~tr], p[~tr])
    # batched and numpy input give the same
    batched = mar.li_inpaint(np.stack([p.numpy()] * 2), np.stack([tr.numpy()] * 2))
    torch.testing.assert_close(batched[1], out)


def test_li_inpaint_bad_input() -> None:
    with pytest.raises(ValueError, match="trace has shape"):
        mar.li_inpaint(np.zeros((4, 5)), np.zeros((4, 6), bool))
    with pytest.raises(ValueError, match="sinogram contains 1 NaN"):
        mar.li_inpaint(np.array([[0.0, np.nan]]), np.zeros((1, 2), bool))


def test_segment_metal_drops_specks(sdl_case_129) -> None:
    _, case = _load(sdl_case_129, "80.h5")
    img = case["ma_CT"].copy()
    img[5, 5] = 3.0  # an isolated hot pixel
    seg = mar.segment_metal(img)
    assert seg.dtype == torch.bool and not bool(seg[5, 5])
    np.testing.assert_array_equal(seg.numpy(), case["ma_CT"] > 0.672)  # one 124-px implant
    assert int(seg.sum()) == 124


@pytest.mark.parametrize(("fixture", "name"), CASES)
def test_metal_trace_covers_the_official_trace(fixture, name, request) -> None:
    _, case = _load(request.getfixturevalue(fixture), name)
    ours = mar.metal_trace(mar.segment_metal(case["ma_CT"]), SDL).numpy()
    official = case["metal_trace"] > 0
    # our mask is recovered from ma_CT and Joseph interpolation widens the trace a little
    assert (ours & official).sum() / official.sum() >= 0.98
    assert (ours & official).sum() / ours.sum() >= 0.95


def test_li_correct_on_official_case(sdl_case_195) -> None:
    gt, case = _load(sdl_case_195, "0.h5")
    mask = mar.segment_metal(case["ma_CT"])
    out = mar.li_correct(case["ma_CT"], mask, SDL, case["ma_sinogram"])
    assert out["metal_found"] and not out["synthetic_sinogram"]
    li = out["li_image"].numpy()
    assert psnr(li, gt["image"], mask) > psnr(case["ma_CT"], gt["image"], mask) + 4
    assert np.abs(li - case["LI_CT"]).mean() / MU_WATER * 1000 <= 25


def _phantom(g: FanBeamGeometry):
    """Water disc with two air pockets beside a small metal insert (μ in cm⁻¹)."""
    n = g.n_rows
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    body = (xx**2 + yy**2 <= (0.42 * n) ** 2) * MU_WATER
    for cx in (-10, 10):
        body[(xx - cx) ** 2 + yy**2 <= 16] = 0.0
    mask = xx**2 + yy**2 <= 4
    return torch.from_numpy(body), torch.from_numpy(mask)


def test_nmar_restores_the_trace_far_better_than_li() -> None:
    """A phantom its own NMAR prior describes: normalised data are flat across the trace."""
    g = _small_geometry()
    truth, mask = _phantom(g)
    from mar_rt.ct.projector import Projector

    proj = Projector(g, dtype=torch.float64)
    p_true = proj.forward(truth)
    p_meas = p_true + proj.forward(mask.double()) * 2.4  # metal on top of water
    ma = proj.fbp(p_meas)
    li = mar.li_correct(ma, mask, g, p_meas, projector=proj)
    nm = mar.nmar_correct(ma, mask, g, p_meas, projector=proj)
    tr = nm["trace"]
    err_li = (li["li_sinogram"] - p_true)[tr].abs().mean()
    err_nmar = (nm["nmar_sinogram"] - p_true)[tr].abs().mean()
    assert err_nmar < 0.4 * err_li, (float(err_nmar), float(err_li))
    torch.testing.assert_close(nm["nmar_sinogram"][~tr], p_meas[~tr])
    prior = nm["prior"]
    assert set(torch.unique(prior[prior <= MU_WATER]).tolist()) <= {0.0, MU_WATER}


@pytest.mark.gpu
def test_nmar_on_cuda_matches_the_cpu() -> None:
    """NMAR (its k-means included) on CUDA tensors gives the CPU result."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from mar_rt.ct.projector import Projector

    g = _small_geometry()
    truth, mask = _phantom(g)
    out = {}
    for device in ("cpu", "cuda"):
        proj = Projector(g, device=device, dtype=torch.float64)
        p_meas = proj.forward(truth.to(device)) + proj.forward(mask.double().to(device)) * 2.4
        ma = proj.fbp(p_meas)
        out[device] = mar.nmar_correct(ma, mask.to(device), g, p_meas, projector=proj)
    for key in ("prior", "nmar_sinogram", "nmar_image"):
        torch.testing.assert_close(out["cuda"][key].cpu(), out["cpu"][key], msg=key)


def test_kmeans_1d_matches_lloyd() -> None:
    rng = np.random.default_rng(0)
    v = np.concatenate(
        [rng.normal(0, 0.02, 500), rng.normal(0.19, 0.02, 900), rng.normal(0.5, 0.1, 80)]
    )
    cuts = mar.kmeans_1d(torch.from_numpy(v), (0.0, MU_WATER, 2 * MU_WATER))
    c = np.array([0.0, MU_WATER, 2 * MU_WATER])  # plain Lloyd iterations as the reference
    labels = np.argmin(np.abs(v[:, None] - c), 1)
    for _ in range(200):
        c = np.array([v[labels == k].mean() if (labels == k).any() else c[k] for k in range(3)])
        new = np.argmin(np.abs(v[:, None] - c), 1)
        if np.array_equal(new, labels):
            break
        labels = new
    assert np.diff(cuts).tolist() == [int((labels == k).sum()) for k in range(3)]


def test_empty_mask_passes_through() -> None:
    g = _small_geometry()
    truth, _ = _phantom(g)
    empty = torch.zeros(g.image_shape, dtype=torch.bool)
    li = mar.li_correct(truth, empty, g)
    assert li["metal_found"] is False and li["synthetic_sinogram"] is True
    assert li["li_image"] is truth and not bool(li["trace"].any())
    nm = mar.nmar_correct(truth, empty, g)
    assert nm["metal_found"] is False and nm["nmar_image"] is truth


def test_bad_inputs_are_named() -> None:
    g = _small_geometry()
    truth, mask = _phantom(g)
    edge = mask.clone()
    edge[0, 40] = True
    with pytest.raises(ValueError, match=r"mask: metal touches the image edge \(top row\)"):
        mar.li_correct(truth, edge, g)
    assert mar.li_correct(truth, edge, g, allow_edge=True)["metal_found"]
    with pytest.raises(ValueError, match="mask has shape"):
        mar.li_correct(truth, mask[:10], g)
    with pytest.raises(ValueError, match="image_mu has shape"):
        mar.nmar_correct(truth[:50], mask[:50], g)
    bad = truth.clone()
    bad[3, 3] = float("inf")
    with pytest.raises(ValueError, match="image_mu contains 1 NaN or inf"):
        mar.li_correct(bad, mask, g)
    with pytest.raises(ValueError, match="sinogram has shape"):
        mar.li_correct(truth, mask, g, np.zeros((10, 10)))
    with pytest.raises(ValueError, match="another geometry"):
        from mar_rt.ct.projector import get_projector

        mar.li_correct(truth, mask, g, projector=get_projector(SDL))
