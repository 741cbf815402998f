"""Clean-slice readers: every shared source, DICOM, NIfTI, .npy units and the export folder."""

from __future__ import annotations

import numpy as np
import pytest

from mar_rt.ct.syndeeplesion import read_image
from mar_rt.ct.units import MU_WATER, hu_to_mu
from mar_rt.errors import BadInputError
from mar_rt.train import sources
from mar_rt.train.phantoms import ellipse_phantom
from mar_rt.train.split import RESERVED_VAL_ID


def test_shared_data_slices(shared_data):
    slices = sources.load_clean_slices(shared_data)
    ids = [s.slice_id for s in slices]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert RESERVED_VAL_ID in ids
    kinds = {i.split("_")[0] for i in ids}
    assert kinds == {"sdl", "cleanct", "dlpng", "spineweb"}
    for s in slices:
        assert s.image_mu.shape == (416, 416) and s.image_mu.dtype == np.float32
        assert np.isfinite(s.image_mu).all() and s.image_mu.min() >= 0.0
        # no clean pixel may look like metal to the 2500 HU threshold
        assert s.image_mu.max() < 0.672
        # soft tissue sits near water: the median inside the body is within ±200 HU of water
        body = s.image_mu[s.image_mu > hu_to_mu(-500.0)]
        assert abs(np.median(body) / MU_WATER - 1.0) < 0.2
    # SynDeepLesion targets are used unchanged
    by_id = {s.slice_id: s for s in slices}
    gt = shared_data / "syndeeplesion" / "train" / "000321_03_01" / "011" / "gt.h5"
    np.testing.assert_array_equal(by_id[RESERVED_VAL_ID].image_mu, read_image(gt))


def test_npy_units(tmp_path):
    mu = ellipse_phantom(3, (256, 256))
    hu = (mu / MU_WATER - 1.0) * 1000.0
    np.save(tmp_path / "a_hu.npy", hu)
    np.save(tmp_path / "b_mu.npy", mu)
    guessed_hu = sources.read_npy(tmp_path / "a_hu.npy")
    explicit_hu = sources.read_npy(tmp_path / "a_hu.npy", units="hu")
    guessed_mu = sources.read_npy(tmp_path / "b_mu.npy")
    np.testing.assert_allclose(guessed_hu.image_mu, explicit_hu.image_mu)
    np.testing.assert_allclose(guessed_mu.image_mu, guessed_hu.image_mu, atol=1e-5)
    # 256² → 416² keeps the mean (same field of view, bilinear)
    assert abs(guessed_mu.image_mu.mean() - mu.mean()) < 2e-3
    with pytest.raises(BadInputError):
        sources.read_npy(tmp_path / "a_hu.npy", units="kelvin")


def test_dicom_slice_matches_pydicom_rescale():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = np.clip(apply_modality_lut(ds.pixel_array, ds).astype(np.float64), -1000, 2000)
    s = sources.read_dicom_slice(path)
    assert s.image_mu.shape == (416, 416)
    mean_hu = (s.image_mu.mean() / MU_WATER - 1.0) * 1000.0
    assert abs(mean_hu - hu.mean()) < 0.01 * (abs(hu.mean()) + 1000.0)


def test_nifti_slices(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    vol = np.full((128, 128, 5), -1000.0, np.float32)
    vol[32:96, 40:90, :] = 40.0
    nibabel.save(nibabel.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    got = sources.read_nifti_slices(tmp_path / "v.nii.gz", max_slices=3)
    assert [s.slice_id for s in got] == ["nifti_v_000", "nifti_v_002", "nifti_v_004"]
    centre = got[0].image_mu[208, 208]
    assert abs(centre - hu_to_mu(40.0)) < 1e-4


def test_export_round_trip(tmp_path):
    slices = [
        sources.CleanSlice("toy_a", ellipse_phantom(1), "phantom 1", "generated"),
        sources.CleanSlice("toy_b", ellipse_phantom(2), "phantom 2", "generated"),
    ]
    sources.export_sources(slices, tmp_path / "exp")
    back = sources.load_clean_slices(tmp_path / "exp")
    assert [s.slice_id for s in back] == ["toy_a", "toy_b"]
    assert back[0].source == "phantom 1"
    for a, b in zip(slices, back, strict=True):
        np.testing.assert_array_equal(a.image_mu, b.image_mu)


def test_missing_and_empty(tmp_path):
    with pytest.raises(BadInputError):
        sources.load_clean_slices(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError):
        sources.load_clean_slices(tmp_path / "empty")


def test_several_sources_combine_and_ids_stay_unique(tmp_path):
    a = [sources.CleanSlice("toy_a", ellipse_phantom(1), "phantom 1", "generated")]
    b = [sources.CleanSlice("toy_b", ellipse_phantom(2), "phantom 2", "generated")]
    sources.export_sources(a, tmp_path / "one")
    sources.export_sources(b, tmp_path / "two")
    np.save(tmp_path / "loose.npy", ellipse_phantom(3))  # a plain file as a third source
    both = sources.load_clean_slices([tmp_path / "two", tmp_path / "one", tmp_path / "loose.npy"])
    assert [s.slice_id for s in both] == ["npy_loose", "toy_a", "toy_b"]
    np.testing.assert_array_equal(both[1].image_mu, a[0].image_mu)
    with pytest.raises(BadInputError, match=r"one \+ .*one: duplicate slice ids \['toy_a'\]"):
        sources.load_clean_slices([tmp_path / "one", tmp_path / "one"])
    with pytest.raises(BadInputError, match="no data sources"):
        sources.load_clean_slices([])


# ---------------------------------------------------------------------- ct-volumes
def _volume(folder, name, hu, spacing=0.8):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{name}.npz", hu=hu.astype(np.int16))
    meta = {"spacing_mm": {"x": spacing, "y": spacing, "z": 2.0}, "licence": "CC BY 4.0"}
    (folder / f"{name}.json").write_text(json.dumps(meta))


def test_ct_volume_resized_to_416_whatever_its_field_of_view(tmp_path):
    """A 512² slice holding a water disc of radius 160 px becomes a 416² slice whose disc has
    radius 160·416/512 = 130 px (the whole field of view kept), μ of water inside."""
    r, c = np.ogrid[:512, :512]
    disc = (r - 255.5) ** 2 + (c - 255.5) ** 2 <= 160.0**2
    hu = np.where(disc, 0, -1024)[None].repeat(3, 0)
    hu[1, 250:262, 250:262] = 3071  # a dense spot, clipped to MAX_CLEAN_HU
    _volume(tmp_path / "vol", "scan_a", hu)
    out = sources.load_clean_slices(tmp_path / "vol")
    assert [s.slice_id for s in out] == ["ctvol_scan_a_000", "ctvol_scan_a_001", "ctvol_scan_a_002"]
    assert {s.series for s in out} == {"ctvol_scan_a"}
    assert "CC BY 4.0" in out[0].licence and "512² at 0.800 mm" in out[0].source
    img = out[0].image_mu
    assert img.shape == (416, 416)
    area = float((img > hu_to_mu(-500.0)).sum())
    assert abs(np.sqrt(area / np.pi) - 130.0) < 1.0
    assert abs(img[208, 208] - MU_WATER) < 1e-5
    assert out[1].image_mu.max() <= hu_to_mu(sources.MAX_CLEAN_HU) + 1e-6
    assert len(sources.read_ct_volume(tmp_path / "vol" / "scan_a.npz", stride=2)) == 2


def test_ct_volume_low_res_is_skipped_or_padded(tmp_path):
    hu = np.full((2, 100, 120), 0, np.int16)
    _volume(tmp_path / "v", "low", hu, spacing=3.0)
    path = tmp_path / "v" / "low.npz"
    assert sources.read_ct_volume(path) == []
    padded = sources.read_ct_volume(path, low_res="pad")
    assert len(padded) == 2 and padded[0].image_mu.shape == (416, 416)
    img = padded[0].image_mu
    # 100 of 120 rows are water, padded with air above and below (10 rows each → 35 of 416)
    rows = (img[:, 208] > hu_to_mu(-500.0)).sum()
    assert abs(rows - 100 * 416 / 120) <= 2
    with pytest.raises(BadInputError, match="low_res"):
        sources.read_ct_volume(path, low_res="stretch")
    (tmp_path / "v" / "low.json").unlink()
    with pytest.raises(BadInputError, match="spacing"):
        sources.read_ct_volume(path)


def test_shared_ct_volumes(shared_data):
    folder = shared_data / "ct-volumes"
    slices = sources.ct_volume_slices(folder, stride=16)
    series = {s.series for s in slices}
    assert series == {"ctvol_pancreas_ct_cb001", "ctvol_lidc_chest", "ctvol_totalseg_abdomen_dicom"}
    for s in slices:
        assert s.image_mu.shape == (416, 416) and s.image_mu.max() < 0.672
        body = s.image_mu[s.image_mu > hu_to_mu(-500.0)]
        assert abs(np.median(body) / MU_WATER - 1.0) < 0.2
