"""Procedural metal masks (DESIGN §5): seeded, inside the body, every published size group."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.ndimage as ndi

from mar_rt.ct import masks
from mar_rt.ct.metrics import size_group

PUBLISHED_PX = (35, 53, 112, 118, 124, 254, 451, 881, 890, 2061)


@pytest.fixture(scope="module")
def body(sdl_case_129) -> np.ndarray:
    with h5py.File(sdl_case_129 / "gt.h5") as f:
        return masks.body_outline(f["image"][()])


def test_body_outline_of_a_real_slice(body: np.ndarray, sdl_case_129) -> None:
    with h5py.File(sdl_case_129 / "gt.h5") as f:
        image = f["image"][()]
    assert body.dtype == bool and body.shape == (416, 416)
    assert not body[0].any() and not body[:, 0].any()  # field corners are air
    labels, n = ndi.label(body)
    assert n == 1 and not ndi.binary_fill_holes(body)[~body].any()
    # almost all soft tissue and bone (μ > 0.15) lies in the outline; almost no air does
    tissue = image > 0.15
    assert (body & tissue).sum() / tissue.sum() > 0.97
    assert (body & (image < 0.02)).sum() < 0.05 * body.sum()


@pytest.mark.parametrize("kind", masks.KINDS)
def test_every_kind_hits_every_published_size(kind: str, body: np.ndarray) -> None:
    outside = ~ndi.binary_erosion(body, iterations=3)
    for i, target in enumerate(PUBLISHED_PX):
        m = masks.generate_metal_mask(seed=i, body_mask=body, size_px=target, kind=kind)
        assert m.dtype == bool and m.shape == (416, 416)
        assert abs(int(m.sum()) - target) <= 0.1 * target, (kind, target, int(m.sum()))
        assert not (m & outside).any(), "metal outside the body outline (3 px margin)"


def test_deterministic_per_seed(body: np.ndarray) -> None:
    a = masks.generate_metal_mask(seed=5, body_mask=body)
    b = masks.generate_metal_mask(seed=5, body_mask=body)
    c = masks.generate_metal_mask(seed=6, body_mask=body)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # SeedSequence seeds work too
    ss = np.random.SeedSequence([1, 2, 3])
    np.testing.assert_array_equal(
        masks.generate_metal_mask(seed=ss, size_px=200),
        masks.generate_metal_mask(seed=ss, size_px=200),
    )


def test_random_sizes_cover_all_size_groups() -> None:
    groups = set()
    for seed in range(60):
        m = masks.generate_metal_mask(seed=seed)
        lo, hi = masks.size_limits((416, 416))
        assert 0.9 * lo <= m.sum() <= 1.1 * hi
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
        groups.add(size_group(int(m.sum())))
    assert groups == {"large", "medium-large", "medium", "medium-small", "small"}


def test_shapes_have_the_expected_structure(body: np.ndarray) -> None:
    def components(mask: np.ndarray) -> int:
        return ndi.label(mask, structure=np.ones((3, 3)))[1]

    for seed in range(4):
        assert components(masks.generate_metal_mask(seed=seed, size_px=500, kind="disc")) == 1
        assert components(masks.generate_metal_mask(seed=seed, size_px=800, kind="screw")) == 1
        assert components(masks.generate_metal_mask(seed=seed, size_px=600, kind="multi")) >= 2
        assert components(masks.generate_metal_mask(seed=seed, size_px=400, kind="dental")) >= 2
    # a disc is round: its area matches the bounding-box inscribed circle
    d = masks.generate_metal_mask(seed=0, size_px=1000, kind="disc")
    rows = np.flatnonzero(d.any(1))
    diameter = rows[-1] - rows[0] + 1
    assert d.sum() == pytest.approx(np.pi * diameter**2 / 4, rel=0.08)
    # a rod is long and thin
    r = masks.generate_metal_mask(seed=0, size_px=400, kind="rod")
    ev = np.linalg.eigvalsh(np.cov(np.argwhere(r).T.astype(float)))
    assert ev[1] / ev[0] > 4


def test_other_image_sizes_scale_the_limits() -> None:
    assert masks.size_limits((256, 256)) == (11, 947)
    m = masks.generate_metal_mask((256, 256), seed=0, size_px=100)
    assert m.shape == (256, 256) and abs(int(m.sum()) - 100) <= 10


def test_bad_inputs(body: np.ndarray) -> None:
    with pytest.raises(ValueError, match="size_px 5000 outside the allowed 30–2500"):
        masks.generate_metal_mask(seed=0, size_px=5000)
    with pytest.raises(ValueError, match="kind 'spoon' is unknown"):
        masks.generate_metal_mask(seed=0, kind="spoon")
    tiny = np.zeros((416, 416), bool)
    tiny[200:212, 200:212] = True
    with pytest.raises(ValueError, match="does not fit inside the body outline"):
        masks.generate_metal_mask(seed=0, body_mask=tiny, size_px=2000, kind="disc")
    with pytest.raises(ValueError, match="leaves no room"):
        masks.generate_metal_mask(seed=0, body_mask=np.zeros((416, 416), bool))
    with pytest.raises(ValueError, match="body_mask has shape"):
        masks.generate_metal_mask(seed=0, body_mask=body[:100])
    with pytest.raises(ValueError, match="NaN"):
        masks.body_outline(np.full((8, 8), np.nan))
