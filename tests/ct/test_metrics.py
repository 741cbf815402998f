"""SynDeepLesion metrics (DESIGN §3) against scikit-image and closed forms."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from mar_rt.ct import metrics

skm = pytest.importorskip("skimage.metrics")


def _reference_ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None) -> float:
    """Independent SSIM: skimage on the clamped, masked, 2×2 block-averaged images."""
    x = np.clip(pred.astype(np.float64), 0, 0.5) / 0.5
    y = np.clip(target.astype(np.float64), 0, 0.5) / 0.5
    if mask is not None:
        x[mask], y[mask] = 0, 0
    f = max(1, round(max(x.shape) / 256))
    if f > 1:
        h, w = x.shape[0] // f, x.shape[1] // f
        x = x[: h * f, : w * f].reshape(h, f, w, f).mean((1, 3))
        y = y[: h * f, : w * f].reshape(h, f, w, f).mean((1, 3))
    return skm.structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )


def test_ssim_and_psnr_match_skimage_on_official_case(sdl_case_129) -> None:
    with h5py.File(sdl_case_129 / "gt.h5") as f:
        target = f["image"][()]
    with h5py.File(sdl_case_129 / "80.h5") as f:
        ma, li = f["ma_CT"][()], f["LI_CT"][()]
    mask = ma > 0.672
    for pred in (ma, li):
        assert metrics.ssim(pred, target, mask) == pytest.approx(
            _reference_ssim(pred, target, mask), abs=1e-4
        )
        x = np.clip(pred, 0, 0.5) / 0.5
        y = np.clip(target, 0, 0.5) / 0.5
        x[mask], y[mask] = 0, 0
        ref_psnr = skm.peak_signal_noise_ratio(
            y.astype(np.float64), x.astype(np.float64), data_range=1
        )
        assert metrics.psnr(pred, target, mask) == pytest.approx(ref_psnr, abs=1e-6)
    # LI removes most of the metal artifact on this case
    assert metrics.psnr(li, target, mask) > metrics.psnr(ma, target, mask) + 5


def test_ssim_without_downsampling_on_random_images() -> None:
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 0.45, (300, 300))  # round(300/256) = 1: no downsample
    pred = target + rng.normal(0, 0.03, target.shape)
    assert metrics.ssim(pred, target) == pytest.approx(
        _reference_ssim(pred, target, None), abs=1e-6
    )
    # 600² downsamples by round(600/256) = 2
    big_t = rng.uniform(0, 0.45, (600, 600))
    big_p = big_t + rng.normal(0, 0.05, big_t.shape)
    assert metrics.ssim(big_p, big_t) == pytest.approx(
        _reference_ssim(big_p, big_t, None), abs=1e-6
    )


def test_psnr_closed_form() -> None:
    target = np.full((64, 64), 0.2)
    delta = 0.01
    # MSE on the metric scale is (δ/0.5)²
    expected = 10 * math.log10(1 / (delta / 0.5) ** 2)
    assert metrics.psnr(target + delta, target) == pytest.approx(expected, abs=1e-9)
    # values above 0.5 cm⁻¹ are clamped before comparison
    assert metrics.psnr(np.full((64, 64), 0.7), np.full((64, 64), 0.5)) == math.inf
    # differences only under the metal mask do not count
    pred = target.copy()
    mask = np.zeros_like(target, bool)
    mask[10:20, 10:20] = True
    pred[mask] = 3.0
    assert metrics.psnr(pred, target, mask) == math.inf
    assert metrics.ssim(pred, target, mask) == pytest.approx(1.0, abs=1e-12)


def test_batches_and_torch_inputs() -> None:
    rng = np.random.default_rng(1)
    t = rng.uniform(0, 0.4, (2, 64, 64))
    p = t + rng.normal(0, 0.02, t.shape)
    batch = metrics.psnr(torch.from_numpy(p), torch.from_numpy(t))
    assert batch.shape == (2,)
    assert batch[1] == pytest.approx(metrics.psnr(p[1], t[1]))
    assert metrics.ssim(p, t)[0] == pytest.approx(metrics.ssim(p[0], t[0]))


def test_size_groups_hold_the_published_masks_in_pairs() -> None:
    published = [2061, 890, 881, 451, 254, 124, 118, 112, 53, 35]
    labels = [metrics.size_group(px) for px in published]
    expected = [g.label for g in metrics.SIZE_GROUPS for _ in range(2)]
    assert labels == expected
    with pytest.raises(ValueError, match="non-negative"):
        metrics.size_group(-1)


def test_aggregate_by_size() -> None:
    recs = [
        {"metal_px": 2061, "psnr": 30.0, "ssim": 0.9},
        {"metal_px": 890, "psnr": 32.0, "ssim": 0.8},
        {"metal_px": 35, "psnr": 40.0, "ssim": 1.0},
    ]
    agg = metrics.aggregate_by_size(recs)
    assert list(agg) == ["large", "small", "mean"]
    assert agg["large"]["psnr"] == pytest.approx(31.0) and agg["large"]["n"] == 2
    assert agg["mean"]["ssim"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="record 0 has no 'ssim'"):
        metrics.aggregate_by_size([{"metal_px": 3, "psnr": 1.0}])


def test_bad_inputs() -> None:
    a = np.zeros((32, 32))
    with pytest.raises(ValueError, match="pred_mu has shape"):
        metrics.psnr(a, np.zeros((32, 31)))
    with pytest.raises(ValueError, match="target_mu contains NaN"):
        metrics.psnr(a, np.full((32, 32), np.nan))
    with pytest.raises(ValueError, match="too small for SSIM"):
        metrics.ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="mask has shape"):
        metrics.psnr(a, a, np.zeros((16, 16), bool))
