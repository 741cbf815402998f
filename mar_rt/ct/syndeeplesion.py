"""Read and write the SynDeepLesion h5 layout (DESIGN.md §5, "Outputs").

A case folder holds ``gt.h5`` (``image``, ``poly_CT``, ``poly_sinogram``) and one ``<k>.h5``
per metal mask k (``ma_CT``, ``ma_sinogram``, ``LI_CT``, ``LI_sinogram``, ``metal_trace``).
Images are float32 416×416 μ in cm⁻¹, sinograms float32 640×641 (views × bins), the trace
uint8. Our writer adds an optional ``mask`` (uint8, the metal mask) to ``<k>.h5``; readers of
the official files ignore it. Arrays come back as float32 numpy arrays (trace and mask as 0/1).

Files are written gzip-compressed (level 4, as the official ones) under a temporary name in
the same folder and then renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

GT_FIELDS = ("image", "poly_CT", "poly_sinogram")
"""Datasets of ``gt.h5``."""

CASE_FIELDS = ("ma_CT", "ma_sinogram", "LI_CT", "LI_sinogram", "metal_trace")
"""Datasets of ``<k>.h5``."""

EXTRA_CASE_FIELDS = ("mask",)
"""Optional datasets of ``<k>.h5`` that we write (not in the official release)."""

_UINT8_FIELDS = ("metal_trace", "mask")


def _read(
    path: str | os.PathLike[str], required: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from err
    with f:
        missing = [name for name in required if name not in f]
        if missing:
            raise ValueError(
                f"{path}: missing dataset(s) {', '.join(missing)} "
                f"(found: {', '.join(sorted(f.keys())) or 'none'})"
            )
        out: dict[str, np.ndarray] = {}
        for name in (*required, *(n for n in optional if n in f)):
            obj = f[name]
            if not isinstance(obj, h5py.Dataset):
                raise ValueError(f"{path}: {name} is not a dataset")
            arr = np.asarray(obj[()], dtype=np.float32)
            if arr.ndim != 2:
                raise ValueError(f"{path}: dataset {name} has shape {arr.shape}, expected 2-D")
            if not np.isfinite(arr).all():
                raise ValueError(f"{path}: dataset {name} contains NaN or inf")
            out[name] = arr
    return out


def find_gt_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every ``gt.h5`` below ``root``, sorted, following symbolic links to folders (a set
    assembled from links to case folders is read like a copied one); a folder reached twice
    through links is read once."""
    found, seen = [], set()
    for here, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        if "gt.h5" in files:
            found.append(Path(here) / "gt.h5")
    return sorted(found)


def read_gt(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """``gt.h5`` → {image, poly_CT, poly_sinogram} as float32 arrays; ValueError naming the
    file and dataset when one is missing."""
    return _read(path, GT_FIELDS, ())


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Only ``image`` (float32 μ, cm⁻¹) of a ``gt.h5``; the other datasets may be absent."""
    return _read(path, ("image",), ())["image"]


def read_case(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """``<k>.h5`` → {ma_CT, ma_sinogram, LI_CT, LI_sinogram, metal_trace[, mask]} as float32."""
    return _read(path, CASE_FIELDS, EXTRA_CASE_FIELDS)


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"field {name} has shape {arr.shape}, expected 2-D")
    if name in _UINT8_FIELDS:
        return (arr > 0.5).astype(np.uint8) if arr.dtype != np.bool_ else arr.astype(np.uint8)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"field {name} contains NaN or inf")
    return arr


def _write_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for name, arr in arrays.items():
                f.create_dataset(name, data=arr, compression="gzip", compression_opts=4)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_case(
    folder: str | os.PathLike[str], fields: Mapping[str, Any], k: int | None = None
) -> list[Path]:
    """Write ``fields`` into ``folder`` in the SynDeepLesion layout; returns the paths written.

    Fields named in :data:`GT_FIELDS` go to ``gt.h5``; those in :data:`CASE_FIELDS` (plus
    ``mask``) go to ``<k>.h5``, which needs ``k``. Either group may be absent, but a group that
    is present must be complete (ValueError naming the missing fields). Other keys are ignored.
    Numpy arrays or torch tensors; written atomically (temporary name, then rename).
    """
    folder = Path(folder)
    gt = {n: fields[n] for n in GT_FIELDS if n in fields}
    case = {n: fields[n] for n in (*CASE_FIELDS, *EXTRA_CASE_FIELDS) if n in fields}
    jobs: list[tuple[Path, dict[str, np.ndarray]]] = []
    for group, names, fname in ((gt, GT_FIELDS, "gt.h5"), (case, CASE_FIELDS, f"{k}.h5")):
        if not group:
            continue
        missing = [n for n in names if n not in group]
        if missing:
            raise ValueError(f"write_case: {fname} needs field(s) {', '.join(missing)}")
        if group is case and (k is None or int(k) < 0):
            raise ValueError(f"write_case: per-mask fields need a non-negative index k, got {k!r}")
        jobs.append((folder / fname, {n: _as_numpy(v, n) for n, v in group.items()}))
    if not jobs:
        raise ValueError(
            f"write_case: no SynDeepLesion fields in {sorted(fields)}; "
            f"expected some of {', '.join(GT_FIELDS + CASE_FIELDS)}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for path, arrays in jobs:
        _write_atomic(path, arrays)
    return [path for path, _ in jobs]
