"""Real DICOM series for the runtime tests (``../shared/data/dicom``), and a metal case made
from one of them by changing nothing but pixel values."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DICOM = DATA / "dicom"
PANCREAS_4 = DICOM / "pancreas_4"
TOTALSEG = DICOM / "totalseg_abdomen"


def need(path: Path) -> Path:
    """``path``, or skip the test with the reason."""
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder is not beside the checkout)")
    return path


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    """Bool disc of ``radius`` pixels at ``centre`` (row, col)."""
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def with_metal(src: Path, dst: Path, slices: tuple[int, ...] = (1, 2)) -> dict[str, np.ndarray]:
    """Copy the series ``src`` to ``dst`` (other files too), putting a saturated 6-px-radius
    implant and two dark photon-starvation streaks into the pixel data of the files sorted at
    positions ``slices``; every header attribute is kept.  Returns {file name: metal mask}."""
    import pydicom

    dst.mkdir(parents=True, exist_ok=True)
    masks = {}
    files = sorted(p for p in src.iterdir() if p.is_file())
    dicom_files = [p for p in files if p.name.endswith(".dcm")]
    for p in files:
        if p not in dicom_files:
            shutil.copy(p, dst / p.name)
    for k, p in enumerate(dicom_files):
        ds = pydicom.dcmread(p)
        if k in slices:
            stored = ds.pixel_array.copy()
            ceiling = 2 ** int(ds.BitsStored) - 1
            m = disc(stored.shape, (300, 220), 6)
            stored[m] = ceiling
            rows = np.arange(stored.shape[0])
            for dc in (-14, 14):  # dark streaks leaving the implant, −300 HU darker
                band = np.zeros_like(m)
                band[rows[230:370], 220 + dc : 222 + dc] = True
                stored[band] = np.clip(stored[band].astype(int) - 300, 0, ceiling)
            ds.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
            masks[p.name] = m
        ds.save_as(dst / p.name, enforce_file_format=True)
    return masks
