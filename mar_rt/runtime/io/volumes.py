"""NIfTI and ``.npy`` volumes in and out, and SynDeepLesion ``.h5`` cases in.

Orientation.  A NIfTI volume is reoriented to RAS+ (nibabel ``io_orientation``), and each axial
slice k is shown the radiological way: ``image[row, col] = ras[X−1−col, Y−1−row, k]``, so row 0
is anterior and column 0 the patient's right, as a DICOM axial slice is; slices ascend from
inferior to superior.  The writer inverts exactly this and reuses the source affine and header.

``.npy`` files hold (H, W) or (N, H, W) arrays in the units the caller names ('hu' or 'mu');
they are loaded with ``allow_pickle=False``.

SynDeepLesion (DESIGN §5): ``<k>.h5`` holds ``ma_CT`` (μ), ``ma_sinogram`` (a measured
sinogram) and ``metal_trace``; ``gt.h5`` in the same folder holds the target ``image``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.errors import BadInputError
from mar_rt.runtime.io.common import (
    Study,
    Units,
    atomic_file,
    check_finite,
    check_sinograms,
    from_mu,
    to_mu,
)

log = logging.getLogger(__name__)

SDL_PIXEL_MM = 512 / 416 * 0.3  # SynDeepLesion pixel, mm (DESIGN §4)


def _check_units(units: str) -> None:
    if units not in ("hu", "mu"):
        raise ValueError(f"units must be 'hu' or 'mu', got {units!r}")


def _as_stack(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        return array
    raise BadInputError(f"{path}: array has shape {array.shape}; expected (H, W) or (N, H, W)")


def merge_kept(
    values: np.ndarray, keep: np.ndarray | None, stored: np.ndarray | None
) -> np.ndarray:
    """``values`` (N, H, W) in the output units, with the rows where ``keep`` is True replaced
    by ``stored`` bit for bit.  The result has ``stored``'s dtype when rows are kept (integer
    rows that were computed are rounded and clipped to it), else ``values``' dtype."""
    if keep is None or stored is None or not np.any(keep):
        return values
    keep = np.asarray(keep, dtype=bool)
    dtype = stored.dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        computed = np.clip(np.rint(values), info.min, info.max).astype(dtype)
    else:
        computed = values.astype(dtype)
    return np.where(keep[:, None, None], stored, computed)


# --- NIfTI ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NiftiHandle:
    """The source volume's affine, header and its orientation relative to RAS+."""

    affine: np.ndarray
    header: Any
    to_ras: np.ndarray  # nibabel orientation transform, source axes → RAS+
    from_ras: np.ndarray  # its inverse
    units: Units  # the units the volume was read in


@dataclass(frozen=True)
class NpyHandle:
    """The units an ``.npy`` input was read in, and its number of dimensions (2 or 3)."""

    units: Units
    ndim: int = 3


def read_nifti(path: Path | str, *, units: Units) -> Study:
    """Read a 3-D (or 2-D, or 4-D with one volume) NIfTI CT volume in ``units`` as a Study."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    _check_units(units)
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float64)
    except Exception as exc:
        raise BadInputError(
            f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})"
        ) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise BadInputError(f"{path}: NIfTI data has shape {data.shape}; expected one 3-D volume")
    check_finite(data, path, "voxel values")
    source_ornt = io_orientation(img.affine)
    to_ras = ornt_transform(source_ornt, axcodes2ornt("RAS"))
    from_ras = ornt_transform(axcodes2ornt("RAS"), source_ornt)
    ras = nib.orientations.apply_orientation(data, to_ras)
    images = np.ascontiguousarray(np.transpose(ras[::-1, ::-1, :], (2, 1, 0)))
    ras_affine = img.affine @ nib.orientations.inv_ornt_aff(to_ras, data.shape)
    zooms = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))
    positions = np.array(
        [(ras_affine @ np.array([0.0, 0.0, k, 1.0]))[2] for k in range(ras.shape[2])]
    )
    return Study(
        images=to_mu(images, units, path),
        pixel_spacing_mm=(float(zooms[1]), float(zooms[0])),
        positions_mm=positions,
        source_kind="nifti",
        source_paths=(path,) * images.shape[0],
        stored=images,
        handle=NiftiHandle(
            affine=img.affine, header=img.header, to_ras=to_ras, from_ras=from_ras, units=units
        ),
    )


def write_nifti(
    path: Path | str,
    images_mu: np.ndarray,
    *,
    units: Units,
    like: Study | None = None,
    keep: np.ndarray | None = None,
) -> Path:
    """Write (N, H, W) μ images as float32 NIfTI in ``units``, atomically.

    With ``like`` a NIfTI study, its affine, header and orientation are reused (exact round
    trip); otherwise the affine is diagonal from ``like``'s pixel spacing (or 1 mm) in the
    radiological layout described in the module docstring.  Slices where ``keep`` is True
    take ``like.stored`` (the values as read, when ``units`` are the units read in).
    """
    import nibabel as nib

    _check_units(units)
    path = Path(path)
    stack = from_mu(_as_stack(np.asarray(images_mu), path), units)
    handle = None if like is None else like.handle
    if isinstance(handle, NiftiHandle) and handle.units == units:
        stack = merge_kept(stack, keep, like.stored).astype(np.float32)  # type: ignore[union-attr]
    check_finite(stack, path, "values to write")
    ras = np.transpose(stack, (2, 1, 0))[::-1, ::-1, :]
    if isinstance(handle, NiftiHandle):
        data = nib.orientations.apply_orientation(ras, handle.from_ras)
        header = handle.header.copy()
        affine = handle.affine
    else:
        sy, sx = (
            (1.0, 1.0) if like is None or like.pixel_spacing_mm is None else like.pixel_spacing_mm
        )
        data, header, affine = ras, None, np.diag([sx, sy, 1.0, 1.0])
    out = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine, header)
    out.header.set_data_dtype(np.float32)
    out.header.set_slope_inter(1.0, 0.0)
    with atomic_file(path) as tmp:
        nib.save(out, str(tmp))
    return path


# --- npy ------------------------------------------------------------------------------------
def read_npy(
    path: Path | str, *, units: Units, pixel_spacing_mm: tuple[float, float] | None = None
) -> Study:
    """Read an (H, W) or (N, H, W) ``.npy`` array in ``units`` as a Study (no pickles)."""
    _check_units(units)
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise BadInputError(
            f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})"
        ) from exc
    if array.dtype.kind not in "iuf":
        raise BadInputError(f"{path}: array dtype {array.dtype} is not numeric")
    stack = _as_stack(array, path)
    return Study(
        images=to_mu(stack, units, path),
        pixel_spacing_mm=pixel_spacing_mm,
        positions_mm=np.full(stack.shape[0], np.nan),
        source_kind="npy",
        source_paths=(path,) * stack.shape[0],
        stored=stack,
        handle=NpyHandle(units=units, ndim=array.ndim),
    )


def write_npy(path: Path | str, images_mu: np.ndarray, *, units: Units) -> Path:
    """Write (N, H, W) or (H, W) μ images as float32 ``.npy`` in ``units``, atomically."""
    _check_units(units)
    path = Path(path)
    values = from_mu(np.asarray(images_mu), units)
    check_finite(values, path, "values to write")
    with atomic_file(path) as tmp:
        np.save(tmp, values, allow_pickle=False)
    return path


# --- SynDeepLesion h5 -----------------------------------------------------------------------
def _h5_dataset(h5: Any, name: str, path: Path) -> np.ndarray | None:
    if name not in h5:
        return None
    value = np.asarray(h5[name][()])
    if value.ndim != 2:
        raise BadInputError(f"{path}: '{name}' has shape {value.shape}; expected a 2-D array")
    check_finite(value, path, f"'{name}' values")
    return value


def _sdl_case_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = [p for p in path.glob("*.h5") if re.fullmatch(r"\d+", p.stem)]
        if not files:
            raise BadInputError(f"{path}: no SynDeepLesion '<k>.h5' files in this folder")
        return sorted(files, key=lambda p: int(p.stem))
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    return [path]


def read_syndeeplesion(path: Path | str, *, geometry: FanBeamGeometry | None = None) -> Study:
    """Read a SynDeepLesion case: one ``<k>.h5`` file, or a folder of them (one slice each).

    Takes ``ma_CT`` as the image, ``ma_sinogram`` as a measured sinogram and ``metal_trace``
    when present, and ``gt.h5:image`` beside it as the target when present.  With
    ``geometry``, sinogram shapes are checked against it.
    """
    import h5py

    path = Path(path)
    images, sinos, traces, targets, paths = [], [], [], [], []
    for f in _sdl_case_files(path):
        try:
            with h5py.File(f, "r") as h5:
                ma_ct = _h5_dataset(h5, "ma_CT", f)
                sinos.append(_h5_dataset(h5, "ma_sinogram", f))
                traces.append(_h5_dataset(h5, "metal_trace", f))
        except BadInputError:
            raise
        except Exception as exc:
            raise BadInputError(
                f"{f}: not a readable HDF5 file ({type(exc).__name__}: {exc})"
            ) from exc
        if ma_ct is None:
            raise BadInputError(f"{f}: no 'ma_CT' dataset (is this a SynDeepLesion '<k>.h5'?)")
        if traces[-1] is not None and sinos[-1] is not None and traces[-1].shape != sinos[-1].shape:
            raise BadInputError(
                f"{f}: metal_trace {traces[-1].shape} and ma_sinogram {sinos[-1].shape} differ"
            )
        images.append(ma_ct.astype(np.float32))
        paths.append(f)
        targets.append(_read_gt(f.parent / "gt.h5", ma_ct.shape))

    def stack(items: list[np.ndarray | None], dtype: Any, what: str) -> np.ndarray | None:
        if any(i is None for i in items):
            return None
        if len({i.shape for i in items}) > 1:  # type: ignore[union-attr]
            raise BadInputError(f"{path}: {what} differ in shape between files")
        return np.stack(items).astype(dtype)  # type: ignore[arg-type]

    study = Study(
        images=stack(images, np.float32, "ma_CT"),  # type: ignore[arg-type]
        pixel_spacing_mm=(SDL_PIXEL_MM, SDL_PIXEL_MM) if images[0].shape == (416, 416) else None,
        positions_mm=np.full(len(images), np.nan),
        source_kind="h5",
        source_paths=tuple(paths),
        stored=stack(images, np.float32, "ma_CT"),
        sinograms=stack(sinos, np.float32, "ma_sinogram"),
        sinogram_is_measured=all(s is not None for s in sinos),
        metal_traces=stack(traces, bool, "metal_trace"),
        targets=stack(targets, np.float32, "gt image"),
    )
    if geometry is not None:
        check_sinograms(study, geometry)
    return study


def _read_gt(gt_path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    import h5py

    if not gt_path.is_file():
        return None
    try:
        with h5py.File(gt_path, "r") as h5:
            image = _h5_dataset(h5, "image", gt_path)
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(
            f"{gt_path}: not a readable HDF5 file ({type(exc).__name__}: {exc})"
        ) from exc
    if image is None:
        log.warning("%s: no 'image' dataset; no target for metrics", gt_path)
        return None
    if image.shape != shape:
        raise BadInputError(f"{gt_path}: image {image.shape} differs from ma_CT {shape}")
    return image.astype(np.float32)
