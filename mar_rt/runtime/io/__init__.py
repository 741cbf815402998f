"""Runtime I/O: read CT inputs as a :class:`Study` (μ in cm⁻¹), write results back.

Inputs: DICOM CT (file, folder or file list), NIfTI, ``.npy``, SynDeepLesion ``.h5`` cases.
Outputs: a DERIVED DICOM series beside the original, NIfTI or ``.npy``, each with ``qa.json``.
:func:`to_grid` / :func:`from_grid` move a study onto the bundle's image grid and back.
The contract is documented in docs/interfaces.md ("mar_rt.runtime.io").
"""

from mar_rt.runtime.io.common import (
    GridMap,
    Slice,
    Study,
    atomic_file,
    atomic_folder,
    check_sinograms,
    from_grid,
    resample_images,
    to_grid,
    write_qa_record,
)
from mar_rt.runtime.io.dicom import DicomHandle, read_dicom, write_dicom_series
from mar_rt.runtime.io.dispatch import detect_kind, read_study, write_study
from mar_rt.runtime.io.volumes import (
    read_nifti,
    read_npy,
    read_syndeeplesion,
    write_nifti,
    write_npy,
)

__all__ = [
    "DicomHandle",
    "GridMap",
    "Slice",
    "Study",
    "atomic_file",
    "atomic_folder",
    "check_sinograms",
    "detect_kind",
    "from_grid",
    "read_dicom",
    "read_nifti",
    "read_npy",
    "read_study",
    "read_syndeeplesion",
    "resample_images",
    "to_grid",
    "write_dicom_series",
    "write_nifti",
    "write_npy",
    "write_qa_record",
    "write_study",
]
