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
from pathlib import Path
from typing import Any

import numpy as np

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.runtime.io.common import (
    SourceKind,
    Study,
    Units,
    atomic_folder,
    check_inside,
    check_sinograms,
    write_qa_record,
)
from mar_rt.runtime.io.dicom import read_dicom, write_dicom_series
from mar_rt.runtime.io.volumes import (
    NiftiHandle,
    NpyHandle,
    read_nifti,
    read_npy,
    read_syndeeplesion,
    write_nifti,
    write_npy,
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
    path: Path | str,
    *,
    units: Units | None = None,
    series_uid: str | None = None,
    skip_bad: bool = False,
    geometry: FanBeamGeometry | None = None,
) -> Study:
    """Read any supported input as a Study.

    ``units`` ('hu' or 'mu') is required for NIfTI and ``.npy``; ``series_uid`` and
    ``skip_bad`` apply to DICOM; with ``geometry`` any sinogram shape is checked against it.
    """
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
    units: Units | None = None,
    qa: dict[str, Any] | None = None,
) -> Path:
    """Write ``images_mu`` (μ, (N, H, W) at the source size) the way ``study`` came in.

    DICOM → a derived series (:func:`write_dicom_series`); NIfTI → ``image.nii.gz`` with the
    source affine; ``.npy`` and SynDeepLesion → ``image.npy``.  ``units`` defaults to the
    units the input was read in ('mu' for SynDeepLesion); DICOM is always HU.  Returns the new
    folder.
    """
    if study.source_kind == "dicom":
        return write_dicom_series(study, images_mu, out_dir, bundle_name=bundle_name, qa=qa)
    handle = study.handle
    if units is None:
        units = handle.units if isinstance(handle, (NiftiHandle, NpyHandle)) else "mu"
    out_dir = Path(out_dir)
    final = check_inside(out_dir / f"MAR_{uuid.uuid4().hex[:16]}", out_dir)
    with atomic_folder(final) as tmp:
        if study.source_kind == "nifti":
            write_nifti(tmp / "image.nii.gz", images_mu, units=units, like=study)
        else:
            write_npy(tmp / "image.npy", images_mu, units=units)
        if qa is not None:
            write_qa_record(tmp / "qa.json", qa)
    return final
