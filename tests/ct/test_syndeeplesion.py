"""SynDeepLesion h5 layout: read the official files, round-trip our writer, refuse bad files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from mar_rt.ct import syndeeplesion as sdl


def test_read_official_case(sdl_case_129) -> None:
    gt = sdl.read_gt(sdl_case_129 / "gt.h5")
    case = sdl.read_case(sdl_case_129 / "80.h5")
    assert set(gt) == {"image", "poly_CT", "poly_sinogram"}
    assert set(case) == {"ma_CT", "ma_sinogram", "LI_CT", "LI_sinogram", "metal_trace"}
    assert gt["image"].shape == (416, 416) and gt["poly_sinogram"].shape == (640, 641)
    assert all(v.dtype == np.float32 for v in (*gt.values(), *case.values()))
    assert set(np.unique(case["metal_trace"])) == {0.0, 1.0}
    with h5py.File(sdl_case_129 / "gt.h5") as f:
        np.testing.assert_array_equal(gt["image"], f["image"][()])


def _fields(rng: np.random.Generator) -> dict[str, np.ndarray]:
    img = rng.uniform(0, 0.5, (416, 416)).astype(np.float32)
    sino = rng.uniform(0, 4, (640, 641)).astype(np.float32)
    return {
        "image": img,
        "poly_CT": img + 1,
        "poly_sinogram": sino,
        "ma_CT": img + 2,
        "ma_sinogram": sino + 1,
        "LI_CT": img + 3,
        "LI_sinogram": sino + 2,
        "metal_trace": sino > 3,
        "mask": torch.from_numpy(img > 0.45),
    }


def test_write_then_read_round_trip(tmp_path, sdl_case_129) -> None:
    fields = _fields(np.random.default_rng(0))
    written = sdl.write_case(tmp_path / "case", fields, 7)
    assert [p.name for p in written] == ["gt.h5", "7.h5"]
    assert sorted(p.name for p in (tmp_path / "case").iterdir()) == ["7.h5", "gt.h5"]
    gt = sdl.read_gt(tmp_path / "case" / "gt.h5")
    case = sdl.read_case(tmp_path / "case" / "7.h5")
    for name in sdl.GT_FIELDS:
        np.testing.assert_array_equal(gt[name], fields[name])
    np.testing.assert_array_equal(case["metal_trace"], fields["metal_trace"].astype(np.float32))
    np.testing.assert_array_equal(case["mask"], fields["mask"].numpy().astype(np.float32))
    np.testing.assert_array_equal(case["LI_sinogram"], fields["LI_sinogram"])
    # same dataset names, dtypes and compression as the official files
    for ours, official in (("gt.h5", "gt.h5"), ("7.h5", "80.h5")):
        with h5py.File(tmp_path / "case" / ours) as a, h5py.File(sdl_case_129 / official) as b:
            for name in b:
                assert a[name].dtype == b[name].dtype, name
                assert a[name].shape == b[name].shape, name
                assert a[name].compression == "gzip", name


def test_missing_dataset_is_named(tmp_path) -> None:
    path = tmp_path / "gt.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((416, 416), np.float32)
        f["poly_sinogram"] = np.zeros((640, 641), np.float32)
    with pytest.raises(ValueError, match=r"gt\.h5: missing dataset\(s\) poly_CT"):
        sdl.read_gt(path)
    assert sdl.read_image(path).shape == (416, 416)


def test_unreadable_and_absent_files(tmp_path) -> None:
    bad = tmp_path / "3.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match=r"3\.h5: not a readable HDF5 file"):
        sdl.read_case(bad)
    with pytest.raises(ValueError, match="no such file"):
        sdl.read_case(tmp_path / "absent.h5")
    nan = tmp_path / "nan.h5"
    with h5py.File(nan, "w") as f:
        f["image"] = np.full((4, 4), np.nan, np.float32)
    with pytest.raises(ValueError, match="image contains NaN"):
        sdl.read_image(nan)


def test_write_refuses_incomplete_or_bad_fields_and_leaves_old_files(tmp_path) -> None:
    fields = _fields(np.random.default_rng(1))
    folder = tmp_path / "case"
    sdl.write_case(folder, fields, 0)
    before = (folder / "gt.h5").read_bytes()
    with pytest.raises(ValueError, match="gt.h5 needs field\\(s\\) poly_CT"):
        sdl.write_case(folder, {"image": fields["image"], "poly_sinogram": fields["image"]})
    with pytest.raises(ValueError, match="need a non-negative index k"):
        sdl.write_case(folder, {n: fields[n] for n in sdl.CASE_FIELDS})
    broken = dict(fields, poly_CT=np.full((416, 416), np.inf, np.float32))
    with pytest.raises(ValueError, match="poly_CT contains NaN or inf"):
        sdl.write_case(folder, broken, 0)
    assert (folder / "gt.h5").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["0.h5", "gt.h5"]  # no temporaries left
    with pytest.raises(ValueError, match="no SynDeepLesion fields"):
        sdl.write_case(folder, {"foo": fields["image"]})


def test_find_gt_files_follows_links_to_case_folders_once(tmp_path, sdl_case_129) -> None:
    """A set assembled from links (to the official case folder, here) is found like a copied
    one; a link back up the tree is not walked twice."""
    root = tmp_path / "set"
    (root / "a").mkdir(parents=True)
    (root / "a" / "case").symlink_to(sdl_case_129, target_is_directory=True)
    (root / "a" / "up").symlink_to(root, target_is_directory=True)  # a cycle
    (root / "b").mkdir()
    (root / "b" / "gt.h5").write_bytes((sdl_case_129 / "gt.h5").read_bytes())
    found = sdl.find_gt_files(root)
    assert found == [root / "a" / "case" / "gt.h5", root / "b" / "gt.h5"]
    assert sdl.read_gt(found[0])["image"].shape == (416, 416)
