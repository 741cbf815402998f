"""NIfTI / npy / SynDeepLesion h5 readers and writers, resampling to the grid, dispatch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from mar_rt.ct.geometry import FanBeamGeometry  # noqa: E402
from mar_rt.errors import BadInputError  # noqa: E402
from mar_rt.runtime.io import (  # noqa: E402
    Study,
    atomic_file,
    detect_kind,
    from_grid,
    read_nifti,
    read_npy,
    read_study,
    read_syndeeplesion,
    to_grid,
    write_nifti,
    write_npy,
    write_study,
)


def _mu(hu):
    """DESIGN §3: clip HU at −1000, μ = (HU/1000 + 1)·0.192."""
    return (np.maximum(np.asarray(hu, np.float64), -1000.0) / 1000.0 + 1.0) * 0.192


def _volume(shape=(6, 5, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1000, 2000, shape).astype(np.float32)


# --- NIfTI ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("diag", "marker_at"),
    [
        # LPS voxel axes: voxel (0, 0) is the most right and anterior → top-left on screen
        ((-0.7, -0.7, 2.5), lambda img: img[0, 0]),
        # RAS voxel axes: voxel (0, 0) is the most left and posterior → bottom-right
        ((0.7, 0.7, 2.5), lambda img: img[-1, -1]),
    ],
)
def test_nifti_orientation_is_radiological(tmp_path, diag, marker_at):
    data = np.full((6, 5, 3), -500.0, np.float32)
    data[0, 0, 1] = 1234.0
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([*diag, 1.0])), str(path))
    study = read_nifti(path, units="hu")
    assert study.images.shape == (3, 5, 6)  # (slices, rows = y, cols = x)
    assert marker_at(study.images[1]) == pytest.approx(_mu(1234.0), rel=1e-6)
    assert study.pixel_spacing_mm == pytest.approx((0.7, 0.7))
    np.testing.assert_allclose(study.positions_mm, [0.0, 2.5, 5.0])


def test_nifti_slices_ascend_when_stored_descending(tmp_path):
    data = np.zeros((4, 4, 3), np.float32)
    data[..., 0] = 100.0  # the highest slice in world z (affine z step is negative)
    path = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, -2.0, 1.0])), str(path))
    study = read_nifti(path, units="hu")
    np.testing.assert_allclose(study.positions_mm, [-4.0, -2.0, 0.0])
    assert np.allclose(study.images[2], _mu(100.0)) and np.allclose(study.images[0], _mu(0.0))


@pytest.mark.parametrize("units", ["hu", "mu"])
def test_nifti_round_trip_keeps_values_affine_and_units(tmp_path, units):
    hu = _volume()
    values = hu if units == "hu" else _mu(hu).astype(np.float32)
    affine = np.array([[0, -0.8, 0, 10], [-0.8, 0, 0, 20], [0, 0, 3, -5], [0, 0, 0, 1.0]])
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(values, affine), str(src))
    study = read_nifti(src, units=units)
    out = write_nifti(tmp_path / "out.nii.gz", study.images, units=units, like=study)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_allclose(np.asarray(back.dataobj), values, rtol=1e-5, atol=1e-3)
    assert back.get_data_dtype() == np.float32


def test_nifti_nan_refused(tmp_path):
    data = _volume()
    data[1, 2, 0] = np.inf
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(BadInputError, match=r"bad\.nii\.gz: voxel values contain 0 NaN and 1 inf"):
        read_nifti(path, units="hu")


# --- npy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("units", ["hu", "mu"])
def test_npy_round_trip(tmp_path, units):
    hu = _volume((2, 8, 9))
    values = hu if units == "hu" else _mu(hu).astype(np.float32)
    np.save(tmp_path / "in.npy", values)
    study = read_npy(tmp_path / "in.npy", units=units)
    np.testing.assert_allclose(study.images, _mu(hu), rtol=1e-6)
    write_npy(tmp_path / "out.npy", study.images, units=units)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), values, rtol=1e-5, atol=1e-3)


def test_npy_2d_int_hu_and_bad_files(tmp_path):
    np.save(tmp_path / "slice.npy", np.array([[-2000, 0], [1000, 40]], np.int32))
    study = read_npy(tmp_path / "slice.npy", units="hu")
    np.testing.assert_allclose(study.images[0], [[0.0, 0.192], [0.384, 0.192 * 1.04]], rtol=1e-6)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadInputError, match=r"obj\.npy: not a readable \.npy array"):
        read_npy(tmp_path / "obj.npy", units="hu")
    np.save(tmp_path / "nan.npy", np.array([[np.nan, 0.0]]))
    with pytest.raises(BadInputError, match=r"nan\.npy: pixel values contain 1 NaN"):
        read_npy(tmp_path / "nan.npy", units="mu")
    np.save(tmp_path / "4d.npy", np.zeros((1, 2, 3, 4)))
    with pytest.raises(BadInputError, match=r"4d\.npy: array has shape \(1, 2, 3, 4\)"):
        read_npy(tmp_path / "4d.npy", units="mu")


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "x.npy") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_the_permissions_open_and_mkdir_would_give(tmp_path):
    import os

    from mar_rt.runtime.io.common import atomic_folder

    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "x.json") as tmp:
            tmp.write_text("{}")
        with atomic_folder(tmp_path / "series") as folder:
            (folder / "a").write_text("a")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
    assert (tmp_path / "series").stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0700


# --- SynDeepLesion h5 ---------------------------------------------------------------------------
def test_syndeeplesion_case(sdl_case_129):
    geometry = FanBeamGeometry.syndeeplesion()
    study = read_syndeeplesion(sdl_case_129 / "80.h5", geometry=geometry)
    with h5py.File(sdl_case_129 / "80.h5") as h5, h5py.File(sdl_case_129 / "gt.h5") as gt:
        np.testing.assert_array_equal(study.images[0], h5["ma_CT"][()])
        np.testing.assert_array_equal(study.sinograms[0], h5["ma_sinogram"][()])
        np.testing.assert_array_equal(study.metal_traces[0], h5["metal_trace"][()] > 0)
        np.testing.assert_array_equal(study.targets[0], gt["image"][()])
    assert study.sinogram_is_measured and study.source_kind == "h5"
    assert study.metal_traces.dtype == bool and study.metal_traces.sum() > 0
    assert study.pixel_spacing_mm == pytest.approx((geometry.pixel_size * 10,) * 2)
    same, grid_map = to_grid(study, geometry, resample=False)
    assert same is study and not grid_map.resampled
    folder_study = read_study(sdl_case_129)  # the case folder: every <k>.h5
    assert detect_kind(sdl_case_129) == "h5" and len(folder_study) == 1
    slice0 = folder_study.slice(0)
    assert slice0.source_path.name == "80.h5" and slice0.target is not None


def _tiny_case(folder, sino_shape=(640, 641), trace_shape=None):
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "3.h5", "w") as h5:
        h5["ma_CT"] = np.zeros((8, 8), np.float32)
        h5["ma_sinogram"] = np.zeros(sino_shape, np.float32)
        h5["metal_trace"] = np.zeros(trace_shape or sino_shape, np.uint8)
    return folder / "3.h5"


def test_sinogram_shape_must_match_geometry(tmp_path):
    path = _tiny_case(tmp_path / "case", sino_shape=(640, 600))
    with pytest.raises(
        BadInputError, match=r"3\.h5: sinograms have shape \(640, 600\).*640 views × 641"
    ):
        read_syndeeplesion(path, geometry=FanBeamGeometry.syndeeplesion())
    other = _tiny_case(tmp_path / "other", sino_shape=(640, 641), trace_shape=(640, 640))
    with pytest.raises(
        BadInputError, match=r"metal_trace \(640, 640\) and ma_sinogram \(640, 641\)"
    ):
        read_syndeeplesion(other)
    with h5py.File(tmp_path / "nope.h5", "w") as h5:
        h5["image"] = np.zeros((4, 4))
    with pytest.raises(BadInputError, match=r"nope\.h5: no 'ma_CT' dataset"):
        read_syndeeplesion(tmp_path / "nope.h5")


# --- the bundle grid ------------------------------------------------------------------------------
def _disc_study(n=512, spacing=0.5) -> Study:
    """One slice: water background, a μ = 0.4 disc of radius 30 mm centred at (+20, −40) mm."""
    centres = (np.arange(n) - (n - 1) / 2) * spacing
    x, y = np.meshgrid(centres, -centres)
    image = np.where((x - 20) ** 2 + (y + 40) ** 2 < 30**2, 0.4, 0.192).astype(np.float32)
    return Study(
        images=image[None],
        pixel_spacing_mm=(spacing, spacing),
        positions_mm=np.zeros(1),
        source_kind="npy",
        source_paths=(Path("disc.npy"),),
        metal_masks=(image > 0.3)[None],
    )


def _centroid_mm(image: np.ndarray, spacing: float) -> tuple[float, float]:
    n = image.shape[0]
    centres = (np.arange(n) - (n - 1) / 2) * spacing
    x, y = np.meshgrid(centres, -centres)
    w = image - 0.192
    return float((w * x).sum() / w.sum()), float((w * y).sum() / w.sum())


def test_resample_to_grid_keeps_field_of_view_and_maps_back(caplog):
    geometry = FanBeamGeometry.syndeeplesion()
    study = _disc_study()
    with caplog.at_level(logging.WARNING):
        on_grid, grid_map = to_grid(study, geometry)
    assert "resampling 512×512 → 416×416" in caplog.text and "0.5 → 0.6154 mm" in caplog.text
    assert on_grid.images.shape == (1, 416, 416) and grid_map.resampled
    assert on_grid.metal_masks.shape == (1, 416, 416) and on_grid.metal_masks.dtype == bool
    new_spacing = 0.5 * 512 / 416
    assert on_grid.pixel_spacing_mm == pytest.approx((new_spacing, new_spacing))
    cx, cy = _centroid_mm(on_grid.images[0], new_spacing)
    assert abs(cx - 20) < 0.1 and abs(cy + 40) < 0.1  # the disc stays where it was, in mm
    area = (on_grid.images[0] - 0.192).sum() * new_spacing**2
    assert area == pytest.approx((0.4 - 0.192) * np.pi * 30**2, rel=2e-3)
    back = from_grid(on_grid.images, grid_map)
    assert back.shape == (1, 512, 512)
    error = np.abs(back - study.images)
    assert error.max() < 0.21 and (error > 1e-4).mean() < 0.02  # only at the disc's edge


def test_other_size_refused_without_resampling():
    with pytest.raises(BadInputError, match=r"disc\.npy: image size 512×512 .*supported: 416×416"):
        to_grid(_disc_study(), FanBeamGeometry.syndeeplesion(), resample=False)


# --- dispatch -------------------------------------------------------------------------------------
def test_read_and_write_study_by_kind(tmp_path):
    hu = _volume((6, 5, 2))
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "v.nii.gz"))
    np.save(tmp_path / "v.npy", hu[..., 0])
    with pytest.raises(ValueError, match="units"):
        read_study(tmp_path / "v.npy")
    for name, result in (("v.nii.gz", "image.nii.gz"), ("v.npy", "image.npy")):
        study = read_study(tmp_path / name, units="hu")
        folder = write_study(study, study.images, tmp_path / "out", bundle_name="b", qa={"k": 1})
        assert folder.parent == tmp_path / "out" and folder.name.startswith("MAR_")
        assert sorted(p.name for p in folder.iterdir()) == sorted([result, "qa.json"])
        assert json.loads((folder / "qa.json").read_text()) == {"k": 1}
        again = read_study(folder / result, units="hu")  # written back in HU, the input's units
        np.testing.assert_allclose(again.images, study.images, rtol=1e-5, atol=1e-6)
