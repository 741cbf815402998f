"""Small batch inputs: 6 series of 4 kinds, one of them broken (NaN pixels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATA

PANCREAS = SHARED_DATA / "dicom" / "pancreas_4"
"""4 real CT slices (512², Philips, uncompressed), from ``../shared/data``."""

SIZE = 64
MU_WATER = 0.192
MU_TITANIUM = 2.412


def phantom(n: int, *, metal: bool, seed: int = 0) -> np.ndarray:
    """(n, 64, 64) μ (cm⁻¹): a water ellipse with a bone disc, and a titanium disc if ``metal``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    body = (xx / 26) ** 2 + (yy / 20) ** 2 <= 1
    img = np.where(body, MU_WATER, 0.0)
    img = np.where((xx - 8) ** 2 + (yy + 4) ** 2 <= 16, 0.35, img)
    if metal:
        img = np.where((xx + 9) ** 2 + (yy - 3) ** 2 <= 9, MU_TITANIUM, img)
    stack = np.repeat(img[None], n, axis=0) + rng.normal(0, 0.002, (n, SIZE, SIZE)) * body
    return stack.astype(np.float32)


def metal_npy_series(root: Path, bundle: Path, *extra: str) -> tuple[Path, Path, list[str]]:
    """Four one-slice .npy series with metal in ``root/in``; returns that folder, the output
    folder ``root/out`` and the ``mar-rt batch`` arguments that run them on ``bundle`` (one
    SDE step, μ units, torch, no previews) followed by ``extra``."""
    src, out = root / "in", root / "out"
    src.mkdir()
    for i in range(4):
        np.save(src / f"s{i}.npy", phantom(1, metal=True, seed=i))
    args = [str(src), "--out", str(out), "--bundle", str(bundle), "--units", "mu"]
    args += ["--steps", "1", "--backend", "torch", "--no-preview", *extra]
    return src, out, args


def _metal_dicom(src: list[Path], folder: Path) -> None:
    """Copies of ``src`` as a new series with a titanium-like disc (3000 HU) burnt in."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for i, path in enumerate(src):
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.copy()
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        yy, xx = np.mgrid[: arr.shape[0], : arr.shape[1]]
        disc = (yy - 300) ** 2 + (xx - 230) ** 2 <= 15**2
        arr[disc] = np.clip(round((3000 - intercept) / slope), 0, np.iinfo(arr.dtype).max)
        ds.PixelData = arr.astype(arr.dtype).tobytes()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = "metal copy"
        ds.save_as(folder / f"M{i:03d}.dcm")


def make_inputs(root: Path) -> dict[str, Path]:
    """Six series under ``root/in`` (μ units for the volumes); returns name → path.

    - ``metal.npy``: one 64² slice with a titanium disc;
    - ``water.npy``: two 64² slices without metal;
    - ``vol.nii.gz``: a 3-slice NIfTI with metal;
    - ``broken.npy``: a slice with NaN pixels (fails: BadInputError names the file);
    - ``dicom/pancreas``: the 4 real slices (no metal), one series;
    - ``dicom/metal``: 2 of them with a metal disc, a second series.
    """
    import nibabel as nib

    if not PANCREAS.is_dir():
        pytest.skip(f"real data not found at {PANCREAS} (the shared/ folder beside the checkout)")
    src = root / "in"
    (src / "volumes").mkdir(parents=True)
    paths = {
        "metal": src / "volumes" / "metal.npy",
        "water": src / "volumes" / "water.npy",
        "nifti": src / "volumes" / "vol.nii.gz",
        "broken": src / "volumes" / "broken.npy",
        "pancreas": src / "dicom" / "pancreas",
        "dicom_metal": src / "dicom" / "metal",
    }
    np.save(paths["metal"], phantom(1, metal=True)[0])
    np.save(paths["water"], phantom(2, metal=False, seed=1))
    vol = phantom(3, metal=True, seed=2)
    nib.save(nib.Nifti1Image(np.transpose(vol, (2, 1, 0)), np.eye(4)), paths["nifti"])
    bad = phantom(1, metal=True, seed=3)[0]
    bad[10:12, 10:12] = np.nan
    np.save(paths["broken"], bad)
    dicoms = sorted(PANCREAS.glob("*.dcm"))
    paths["pancreas"].mkdir(parents=True)
    for f in dicoms:
        (paths["pancreas"] / f.name).write_bytes(f.read_bytes())
    _metal_dicom(dicoms[:2], paths["dicom_metal"])
    return paths
