"""Pick the reader from the input path, and the writer from the study's source kind.

Readers: a folder of ``<k>.h5`` files or a ``.h5`` file → SynDeepLesion; ``.nii``/``.nii.gz``
→ NIfTI; ``.npy`` → numpy; any other file or folder → DICOM.

Writers: every call creates one new folder ``out_dir/MAR_<id>`` atomically, where ``<id>`` is
the new SeriesInstanceUID (DICOM) or a random hex id, never a string from the input.  It holds
the images (``IM000001.dcm …``, ``image.nii.gz`` or ``image.npy``) and ``qa.json``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.runtime.io.common import (
    SourceKind,
    Study,
    Units,
    atomic_file,
    atomic_folder,
    check_finite,
    check_inside,
    check_sinograms,
    from_mu,
    write_qa_record,
)
from mar_rt.runtime.io.dicom import read_dicom, write_dicom_series
from mar_rt.runtime.io.volumes import (
    NiftiHandle,
    NpyHandle,
    merge_kept,
    read_nifti,
    read_npy,
    read_syndeeplesion,
    write_nifti,
)


def detect_kind(path: Path | str) -> SourceKind:
    """The source kind :func:`read_study` would use for ``path``."""
    p = Path(path)
    if p.is_dir():
        has_case = any(re.fullmatch(r"\d+\.h5", f.name) for f in p.glob("*.h5"))
        return "h5" if has_case else "dicom"
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".h5"):
        return "h5"
    return "dicom"


def read_study(
    path: Path | str | Sequence[Path | str],
    *,
    units: Units | None = None,
    series_uid: str | None = None,
    skip_bad: bool = False,
    geometry: FanBeamGeometry | None = None,
) -> Study:
    """Read any supported input as a Study.

    ``path`` is a file or folder, or a list of DICOM files (one series).  ``units`` ('hu' or
    'mu') is required for NIfTI and ``.npy``; ``series_uid`` and ``skip_bad`` apply to DICOM;
    with ``geometry`` any sinogram shape is checked against it.
    """
    if not isinstance(path, (str, Path)):
        study = read_dicom(list(path), series_uid=series_uid, skip_bad=skip_bad)
        if geometry is not None:
            check_sinograms(study, geometry)
        return study
    kind = detect_kind(path)
    if kind in ("nifti", "npy") and units is None:
        raise ValueError(f"{path}: say which units the {kind} values are in (units='hu' or 'mu')")
    if kind == "dicom":
        study = read_dicom(path, series_uid=series_uid, skip_bad=skip_bad)
    elif kind == "nifti":
        study = read_nifti(path, units=units)  # type: ignore[arg-type]
    elif kind == "npy":
        study = read_npy(path, units=units)  # type: ignore[arg-type]
    else:
        study = read_syndeeplesion(path)
    if geometry is not None:
        check_sinograms(study, geometry)
    return study


def write_study(
    study: Study,
    images_mu: np.ndarray,
    out_dir: Path | str,
    *,
    bundle_name: str,
    bundle_sha256: str = "",
    units: Units | None = None,
    qa: dict[str, Any] | None = None,
    keep: np.ndarray | None = None,
    folder_name: str | None = None,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``images_mu`` (μ, (N, H, W) at the source size) the way ``study`` came in.

    DICOM → a derived series (:func:`write_dicom_series`); NIfTI → ``image.nii.gz`` with the
    source affine; ``.npy`` and SynDeepLesion → ``image.npy``.  ``units`` defaults to the
    units the input was read in ('mu' for SynDeepLesion); DICOM is always HU.  Slices where
    ``keep`` (bool (N,)) is True are written from ``study.stored``, bit for bit.  The new
    folder is ``out_dir/<folder_name>`` (default ``MAR_<id>``), created atomically with
    ``qa.json`` and whatever ``extras(folder)`` adds; returns it.
    """
    if study.source_kind == "dicom":
        return write_dicom_series(
            study,
            images_mu,
            out_dir,
            bundle_name=bundle_name,
            bundle_sha256=bundle_sha256,
            qa=qa,
            keep=keep,
            folder_name=folder_name,
            extras=extras,
        )
    handle = study.handle
    read_units: Units = handle.units if isinstance(handle, (NiftiHandle, NpyHandle)) else "mu"
    units = read_units if units is None else units
    out_dir = Path(out_dir)
    final = check_inside(out_dir / (folder_name or f"MAR_{uuid.uuid4().hex[:16]}"), out_dir)
    with atomic_folder(final) as tmp:
        if study.source_kind == "nifti":
            write_nifti(tmp / "image.nii.gz", images_mu, units=units, like=study, keep=keep)
        else:
            stored = study.stored if units == read_units else None
            values = merge_kept(from_mu(np.asarray(images_mu), units), keep, stored)
            check_finite(values, final / "image.npy", "values to write")
            if isinstance(handle, NpyHandle) and handle.ndim == 2 and values.shape[0] == 1:
                values = values[0]
            with atomic_file(tmp / "image.npy") as f:
                np.save(f, values, allow_pickle=False)
        if qa is not None:
            write_qa_record(tmp / "qa.json", qa)
        if extras is not None:
            extras(tmp)
    return final


def stored_hu(study: Study) -> np.ndarray:
    """The study's values as the source stored them, in HU, float64 (N, H, W), unclipped.

    DICOM: stored pixel values × RescaleSlope + RescaleIntercept per slice; ``.npy`` /
    NIfTI: the values read, converted from μ when read as μ; SynDeepLesion: from μ.  Without
    ``study.stored``, HU of ``study.images`` (clipped at −1000 HU).
    """
    from mar_rt.ct.units import mu_to_hu

    if study.stored is None:
        return mu_to_hu(study.images.astype(np.float64))
    stored = study.stored.astype(np.float64)
    handle = study.handle
    if study.source_kind == "dicom" and handle is not None:
        slopes = np.array([float(ds.RescaleSlope) for ds in handle.datasets])
        intercepts = np.array([float(ds.RescaleIntercept) for ds in handle.datasets])
        return stored * slopes[:, None, None] + intercepts[:, None, None]
    if isinstance(handle, (NiftiHandle, NpyHandle)) and handle.units == "hu":
        return stored
    return mu_to_hu(stored)
