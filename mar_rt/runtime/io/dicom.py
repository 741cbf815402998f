"""DICOM CT in (one file, a folder, or a list of files) and a DERIVED series out.

Reading (DESIGN §12, §13):

1. Every file is parsed with ``pydicom.dcmread(force=False)`` and checked on its own: readable,
   Modality CT, single-frame greyscale pixel data that decodes, PixelSpacing, RescaleSlope and
   RescaleIntercept present (a CT image without them is refused: mar-rt will not guess HU),
   RescaleType absent or HU, finite HU.  Problems are collected per file; by default any bad
   file stops the read with one message listing them all, with ``skip_bad=True`` they are
   logged, skipped and listed in ``Study.skipped``.
2. Files are grouped by SeriesInstanceUID; several series are refused (naming each UID and a
   file of it) unless ``series_uid`` picks one.
3. Slices must share size, PixelSpacing and ImageOrientationPatient; they are sorted by
   ImagePositionPatient projected on the slice normal (row × column direction cosines),
   ascending, falling back to InstanceNumber, then to file order.
4. HU = stored·RescaleSlope + RescaleIntercept → μ (HU clipped at −1000, DESIGN §3).

Writing: a new series (new SeriesInstanceUID and SOPInstanceUIDs, SeriesNumber = original +
1000, ImageType DERIVED\\SECONDARY\\<original values 3+>, references to every source image and
to the source series) into ``out/MAR_<new SeriesInstanceUID>/IM000001.dcm …`` (names only from
generated indices and UIDs), written to a temporary folder inside ``out`` and renamed into
place.  Patient, study, frame-of-reference, geometry and window tags are kept; HU are stored
with the original bit depth, RescaleSlope and RescaleIntercept, clipped to the representable
range (logged).  Input files are never opened for writing.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mar_rt.errors import BadInputError, MarRtError
from mar_rt.runtime.io.common import (
    Study,
    atomic_folder,
    check_finite,
    check_inside,
    hu_to_mu_f32,
    mu_to_hu_f64,
    write_qa_record,
)

log = logging.getLogger(__name__)

SERIES_NUMBER_OFFSET = 1000
# Files with these suffixes inside an input folder are not DICOM and are passed over quietly.
NON_DICOM_SUFFIXES = frozenset(
    {".json", ".txt", ".md", ".csv", ".log", ".xml", ".html", ".pdf", ".png", ".jpg", ".jpeg"}
    | {".npy", ".npz", ".nii", ".gz", ".h5", ".zip", ".tar", ".py", ".sh"}
)
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DROPPED_KEYWORDS = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "IconImageSequence",
)
_MAR_APPLIED_TAG = 0x00189391  # set to YES only when the installed dictionary names it
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Unpaired BodyPartExamined defined terms (PS3.16 Annex L) for which Laterality is absent;
# for any other value (paired, or a non-standard term such as PARTIALBODY) laterality is
# not known here, so the derived series carries an empty Laterality (Type 2C).
_UNPAIRED_BODY_PARTS = frozenset(
    "ABDOMEN ABDOMENPELVIS BRAIN CHEST CHESTABDOMEN CHESTABDPELVIS COCCYX CSPINE HEAD "
    "HEADNECK HEART JAW LIVER LSPINE MEDIASTINUM NECK PANCREAS PELVIS SACRUM SKULL SPINE "
    "SSPINE THORAX TSPINE WHOLEBODY".split()
)
MANUFACTURER = "mar-rt"


@dataclass(frozen=True)
class DicomHandle:
    """What the writer needs from the source series: one header-only dataset per slice."""

    datasets: tuple[Any, ...]  # pydicom Datasets without pixel data, in study order
    series_uid: str
    not_dicom: tuple[Path, ...] = ()  # files without the DICM preamble, left out


def has_dicm_preamble(path: Path) -> bool:
    """True when ``path`` starts with the 128-byte preamble and ``DICM`` (DICOM Part 10)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def sop_class_uid(ds: Any) -> str:
    """The SOP Class UID of ``ds``: the data set's, else the file meta's Media Storage SOP
    Class UID (real exports leave the data set's empty), else CT Image Storage."""
    value = str(ds.get("SOPClassUID", "") or "").strip()
    if not value:
        meta = getattr(ds, "file_meta", None)
        value = str(meta.get("MediaStorageSOPClassUID", "") or "").strip() if meta else ""
    return value or CT_IMAGE_STORAGE


def sop_instance_uid(ds: Any) -> str:
    """The SOP Instance UID of ``ds``: the data set's, else the file meta's Media Storage SOP
    Instance UID (empty in some anonymised exports), else ''."""
    value = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not value:
        meta = getattr(ds, "file_meta", None)
        value = str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip() if meta else ""
    return value


def is_mar_derived(ds: Any) -> bool:
    """True when ``ds`` is a derived image (ImageType DERIVED) or one mar-rt wrote (our
    ContributingEquipmentSequence entry): a loop guard for nodes and batch jobs."""
    image_type = [str(v).upper() for v in (ds.get("ImageType", []) or [])]
    if image_type[:1] == ["DERIVED"]:
        return True
    for item in ds.get("ContributingEquipmentSequence", []) or []:
        if str(item.get("Manufacturer", "")) == MANUFACTURER:
            return True
    return False


@dataclass
class _Loaded:
    path: Path
    ds: Any
    mu: np.ndarray  # float32 (H, W), cm⁻¹
    stored: np.ndarray  # (H, W) stored pixel values, as decoded (before rescale)


class _FileProblem(Exception):
    """A per-file reason, collected and reported with the file name."""


# --- reading ------------------------------------------------------------------------------------
def list_dicom_files(path: Path | str | Sequence[Path | str]) -> list[Path]:
    """The candidate files of ``path``: a file, a folder (searched recursively, skipping hidden
    files, DICOMDIR and the NON_DICOM_SUFFIXES), or a list of files."""
    if isinstance(path, (str, Path)):
        root = Path(path)
        if root.is_dir():
            files = sorted(
                p
                for p in root.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(root).parts)
                and p.name.upper() != "DICOMDIR"
                and p.suffix.lower() not in NON_DICOM_SUFFIXES
            )
        elif root.exists():
            files = [root]
        else:
            raise BadInputError(f"{root}: no such file or folder")
    else:
        files = [Path(p) for p in path]
    if not files:
        raise BadInputError(f"{path}: no DICOM files found")
    return files


def _load_one(path: Path) -> _Loaded:
    """Parse and check one file; raise _FileProblem with the reason."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=False)
    except Exception as exc:  # every parser failure is a per-file problem
        raise _FileProblem(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    modality = ds.get("Modality")
    if modality != "CT":
        what = "has no Modality" if modality is None else f"Modality is {modality!r}"
        raise _FileProblem(f"{what}, not CT")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise _FileProblem("has no pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise _FileProblem("is a multi-frame (enhanced) image; only single-frame CT is supported")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise _FileProblem(f"has SamplesPerPixel {ds.SamplesPerPixel}; CT must be greyscale")
    missing = [k for k in ("RescaleSlope", "RescaleIntercept") if ds.get(k) in (None, "")]
    if missing:
        raise _FileProblem(f"is a CT image without {' and '.join(missing)}; cannot convert to HU")
    rescale_type = str(ds.get("RescaleType", "HU") or "HU").upper()
    if rescale_type != "HU":
        raise _FileProblem(f"has RescaleType {rescale_type!r}; only HU is supported")
    spacing = ds.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        raise _FileProblem("has no PixelSpacing")
    try:
        stored = ds.pixel_array
    except Exception as exc:
        raise _FileProblem(
            f"pixel data could not be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    if stored.ndim != 2:
        raise _FileProblem(f"pixel data has shape {stored.shape}; expected one 2-D image")
    hu = stored.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    try:
        check_finite(hu, path, "HU values")
    except BadInputError as exc:
        raise _FileProblem(str(exc).removeprefix(f"{path}: ")) from exc
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    return _Loaded(path=path, ds=ds, mu=hu_to_mu_f32(hu), stored=np.array(stored))


def _problems_message(problems: list[tuple[Path, str]], n_files: int) -> str:
    lines = [f"  {p}: {why}" for p, why in problems]
    return (
        f"{len(problems)} of {n_files} DICOM files are unusable (nothing was written; pass "
        "skip_bad=True / --skip-bad to leave them out):\n" + "\n".join(lines)
    )


def _select_series(loaded: list[_Loaded], series_uid: str | None) -> list[_Loaded]:
    groups: dict[str, list[_Loaded]] = {}
    for item in loaded:
        groups.setdefault(str(item.ds.get("SeriesInstanceUID", "")), []).append(item)
    if series_uid is not None:
        if series_uid not in groups:
            raise BadInputError(
                f"series {series_uid} not found; the files hold: "
                + ", ".join(f"{uid} (e.g. {g[0].path})" for uid, g in groups.items())
            )
        return groups[series_uid]
    if len(groups) > 1:
        listing = "; ".join(
            f"{uid or '<no SeriesInstanceUID>'} ({len(g)} files, e.g. {g[0].path})"
            for uid, g in groups.items()
        )
        raise BadInputError(
            f"the input mixes {len(groups)} series: {listing}. Choose one (series_uid=...)."
        )
    return next(iter(groups.values()))


def _check_consistent(items: list[_Loaded]) -> None:
    first = items[0]
    for item in items[1:]:
        if item.mu.shape != first.mu.shape:
            raise BadInputError(
                f"slices differ in size: {first.path} is {first.mu.shape[0]}×{first.mu.shape[1]}, "
                f"{item.path} is {item.mu.shape[0]}×{item.mu.shape[1]}"
            )
        a = np.array(first.ds.PixelSpacing, dtype=float)
        b = np.array(item.ds.PixelSpacing, dtype=float)
        if not np.allclose(a, b, rtol=1e-4):
            raise BadInputError(
                f"slices differ in PixelSpacing: {first.path} has {a.tolist()}, "
                f"{item.path} has {b.tolist()}"
            )
        oa, ob = first.ds.get("ImageOrientationPatient"), item.ds.get("ImageOrientationPatient")
        if oa is not None and ob is not None and not np.allclose(oa, ob, atol=1e-4):
            raise BadInputError(
                f"slices differ in ImageOrientationPatient: {first.path} has {list(oa)}, "
                f"{item.path} has {list(ob)}"
            )


def _sort(items: list[_Loaded]) -> tuple[list[_Loaded], np.ndarray]:
    """Sort by ImagePositionPatient on the normal, else InstanceNumber, else file order."""
    have_geometry = all(
        i.ds.get("ImagePositionPatient") is not None
        and i.ds.get("ImageOrientationPatient") is not None
        for i in items
    )
    if have_geometry:
        iop = np.array(items[0].ds.ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        pos = np.array([np.dot(normal, np.array(i.ds.ImagePositionPatient, float)) for i in items])
        order = np.argsort(pos, kind="stable")
        pos = pos[order]
        if len(pos) > 1 and np.any(np.diff(pos) < 1e-3):
            log.warning("%s: several slices share one position", items[0].path.parent)
        return [items[k] for k in order], pos
    positions = np.full(len(items), np.nan)
    if all(i.ds.get("InstanceNumber") is not None for i in items):
        log.info("%s: no ImagePositionPatient; sorting by InstanceNumber", items[0].path.parent)
        order = np.argsort([int(i.ds.InstanceNumber) for i in items], kind="stable")
        return [items[k] for k in order], positions
    if len(items) > 1:
        log.warning("%s: no slice positions or instance numbers; keeping file order", items[0].path)
    return items, positions


def read_dicom(
    path: Path | str | Sequence[Path | str],
    *,
    series_uid: str | None = None,
    skip_bad: bool = False,
) -> Study:
    """Read one CT series as a :class:`Study` (``source_kind="dicom"``).

    ``path`` is a file, a folder (recursive) or a list of files.  See the module docstring for
    the checks; every refusal is a BadInputError naming the file(s) and the problem.
    """
    candidates = list_dicom_files(path)
    # a file without the DICM preamble is left out, unless its name claims DICOM: then it
    # is a broken file, reported like any other
    files = [f for f in candidates if has_dicm_preamble(f) or f.suffix.lower() in _DICOM_SUFFIXES]
    not_dicom = tuple(f for f in candidates if f not in set(files))
    for f in not_dicom:
        log.info("%s: not a DICOM file (no DICM preamble); left out", f)
    if not files:
        raise BadInputError(
            f"{path}: no DICOM file found (the {len(candidates)} file(s) there have no DICM "
            "preamble)"
        )
    loaded: list[_Loaded] = []
    problems: list[tuple[Path, str]] = []
    for f in files:
        try:
            loaded.append(_load_one(f))
        except _FileProblem as exc:
            problems.append((f, str(exc)))
    if problems:
        if not skip_bad:
            raise BadInputError(_problems_message(problems, len(files)))
        for p, why in problems:
            log.warning("skipping %s: %s", p, why)
        if not loaded:
            raise BadInputError(_problems_message(problems, len(files)) + "\nno usable file left")
    items = _select_series(loaded, series_uid)
    _check_consistent(items)
    items, positions = _sort(items)
    images = np.stack([i.mu for i in items])
    spacing = tuple(float(v) for v in items[0].ds.PixelSpacing)
    return Study(
        images=images,
        pixel_spacing_mm=(spacing[0], spacing[1]),
        positions_mm=positions,
        source_kind="dicom",
        source_paths=tuple(i.path for i in items),
        stored=np.stack([i.stored for i in items]),
        handle=DicomHandle(
            datasets=tuple(i.ds for i in items),
            series_uid=str(items[0].ds.get("SeriesInstanceUID", "")),
            not_dicom=not_dicom,
        ),
        skipped=tuple(problems),
    )


# --- writing ------------------------------------------------------------------------------------
def _clean_text(text: str, limit: int) -> str:
    """A DICOM LO/ST-safe string: printable, no backslash, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() and c != "\\" else " " for c in text)
    return text[:limit].rstrip()


def _encode_hu(hu: np.ndarray, ds: Any, where: Path) -> np.ndarray:
    """Stored pixel values for ``hu`` with ``ds``'s bit depth, slope and intercept (clipped)."""
    if int(ds.get("BitsAllocated", 16)) != 16:
        log.warning(
            "%s: source is %s-bit; writing 16-bit signed HU", where, ds.get("BitsAllocated")
        )
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    stored = np.rint((hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
    # air a little below the floor (the source's −1000 or −1024 HU) is clipped quietly
    floor_margin = 100.0 / abs(float(ds.RescaleSlope))
    n_clipped = int(np.count_nonzero((stored < lo - floor_margin) | (stored > hi)))
    if n_clipped:
        slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        log.warning(
            "%s: %d pixels outside the representable range [%g, %g] HU were clipped",
            where,
            n_clipped,
            lo * slope + icpt,
            hi * slope + icpt,
        )
    return np.clip(stored, lo, hi).astype(np.int16 if signed else np.uint16)


def _source_references(handle: DicomHandle) -> list[Any]:
    """(ReferencedSOPClassUID, ReferencedSOPInstanceUID) items for every source image."""
    from pydicom.dataset import Dataset

    items = []
    for src in handle.datasets:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class_uid(src)
        ref.ReferencedSOPInstanceUID = sop_instance_uid(src)
        items.append(ref)
    return items


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _derive(
    src: Any,
    *,
    stored: np.ndarray | None,
    hu: np.ndarray | None,
    where: Path,
    series_uid: str,
    study_uid: str,
    source_series_uid: str,
    references: list[Any],
    bundle_name: str,
    bundle_sha256: str,
    now: _dt.datetime,
) -> Any:
    """A new dataset for one derived slice (``src`` is left untouched).

    Exactly one of ``stored`` (the source's stored pixel values, copied bit for bit: a slice
    that was not corrected) and ``hu`` (new values, encoded with the source's bit depth,
    RescaleSlope and RescaleIntercept) is given.
    """
    import pydicom
    from pydicom.datadict import keyword_for_tag
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    import mar_rt

    ds = copy.deepcopy(src)
    for keyword in _DROPPED_KEYWORDS + _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    sop_class = sop_class_uid(src)
    sop_uid = generate_uid()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesNumber = int(src.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET
    if src.get("InstanceNumber") in (None, ""):
        ds.InstanceNumber = 1
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate = ds.SeriesDate = ds.ContentDate = date
    ds.InstanceCreationTime = ds.SeriesTime = ds.ContentTime = time
    original_type = [str(v) for v in (src.get("ImageType", []) or [])]
    ds.ImageType = ["DERIVED", "SECONDARY", *(original_type[2:] or ["AXIAL"])]
    old_description = str(src.get("SeriesDescription", "") or "")
    ds.SeriesDescription = _clean_text(f"MAR {old_description}".strip(), 64)
    ds.DerivationDescription = _clean_text(
        f"Metal artifact reduction (DuDoCROP) by mar-rt {mar_rt.__version__}; bundle "
        f"{bundle_name} sha256 {bundle_sha256 or 'unknown'}",
        1024,
    )
    source_ref = Dataset()
    source_ref.ReferencedSOPClassUID = sop_class
    source_ref.ReferencedSOPInstanceUID = sop_instance_uid(src)
    source_ref.PurposeOfReferenceCodeSequence = [
        _code("121322", "DCM", "Source image for image processing operation")
    ]
    ds.SourceImageSequence = [source_ref]
    if "ReferencedSeriesSequence" in ds:
        del ds.ReferencedSeriesSequence
    if source_series_uid:  # an anonymised source without one cannot be referenced by series
        series_ref = Dataset()
        series_ref.SeriesInstanceUID = source_series_uid
        series_ref.ReferencedInstanceSequence = references
        ds.ReferencedSeriesSequence = [series_ref]
    equipment = Dataset()
    equipment.Manufacturer = MANUFACTURER
    equipment.SoftwareVersions = _clean_text(str(mar_rt.__version__), 64)
    equipment.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    equipment.ContributionDescription = _clean_text(
        f"Metal artifact reduction, bundle {bundle_name}", 64
    )
    equipment.PurposeOfReferenceCodeSequence = [_code("109102", "DCM", "Processing Equipment")]
    ds.ContributingEquipmentSequence = [
        *list(src.get("ContributingEquipmentSequence", []) or []),
        equipment,
    ]
    ds.BurnedInAnnotation = "NO"
    body_part = str(ds.get("BodyPartExamined", "") or "").upper()
    if body_part and body_part not in _UNPAIRED_BODY_PARTS and "Laterality" not in ds:
        ds.Laterality = ""
    mar_keyword = keyword_for_tag(_MAR_APPLIED_TAG)
    if mar_keyword:
        setattr(ds, mar_keyword, "YES")

    if hu is not None:
        pixels = _encode_hu(hu, ds, where)
    else:
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        bits = int(ds.get("BitsAllocated", 16))
        dtype = np.dtype(f"{'i' if signed else 'u'}{max(bits // 8, 1)}").newbyteorder("<")
        pixels = np.asarray(stored).astype(dtype, casting="unsafe")
        if not np.array_equal(pixels, stored):
            raise MarRtError(f"{where}: stored pixel values do not fit the source's {dtype}")
    vr = "OW" if int(ds.get("BitsAllocated", 16)) > 8 else "OB"
    ds.add_new(0x7FE00010, vr, np.ascontiguousarray(pixels).tobytes())  # PixelData
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _clean_text(f"MAR_RT_{mar_rt.__version__}", 16)
    ds.file_meta = meta
    return ds


def write_dicom_series(
    study: Study,
    images_mu: np.ndarray,
    out_dir: Path | str,
    *,
    bundle_name: str,
    bundle_sha256: str = "",
    qa: dict[str, Any] | None = None,
    keep: np.ndarray | None = None,
    folder_name: str | None = None,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``images_mu`` (μ cm⁻¹, (N, H, W) at the source size, study order) as a DERIVED
    series of the DICOM ``study``; return the new folder ``out_dir/<folder_name>`` (default
    ``MAR_<SeriesInstanceUID>``).

    Slices where ``keep`` (bool (N,)) is True are written with the source's stored pixel
    values, bit for bit (their ``images_mu`` rows are ignored).  ``qa`` (JSON-able dict) is
    written beside the images as ``qa.json``; ``extras(folder)`` may add more files (a
    preview).  ``out_dir`` must not be, or lie inside, a folder holding input files.  Nothing
    appears under ``out_dir`` unless the whole series was written.
    """
    from pydicom.uid import generate_uid

    handle = study.handle
    if study.source_kind != "dicom" or not isinstance(handle, DicomHandle):
        raise MarRtError(f"{study.source_paths[0]}: not a DICOM study; use another writer")
    images_mu = np.asarray(images_mu)
    n = len(handle.datasets)
    expected = (n, int(handle.datasets[0].Rows), int(handle.datasets[0].Columns))
    if images_mu.shape != expected:
        raise MarRtError(
            f"{study.source_paths[0]}: refusing to write images of shape {images_mu.shape}; the "
            f"source series is {expected} (map grid outputs back with from_grid first)"
        )
    keep = np.zeros(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    if keep.shape != (n,):
        raise MarRtError(f"keep has shape {keep.shape}, expected ({n},)")
    if keep.any() and study.stored is None:
        raise MarRtError(f"{study.source_paths[0]}: no stored pixel values to pass through")
    check_finite(images_mu[~keep], "output images", "values")
    out_dir = Path(out_dir)
    out_root = out_dir.resolve()
    for folder in {p.resolve().parent for p in study.source_paths}:
        if out_root == folder or folder in out_root.parents:
            raise MarRtError(
                f"refusing to write into {out_dir}: it is inside the input folder {folder}; "
                "choose an output folder outside the input"
            )
    series_uid = generate_uid()
    study_uid = str(handle.datasets[0].get("StudyInstanceUID", "") or "").strip()
    if not study_uid:
        study_uid = generate_uid()
        log.warning(
            "%s: the source has no StudyInstanceUID; the derived series gets a new study %s",
            study.source_paths[0],
            study_uid,
        )
    final = check_inside(out_dir / (folder_name or f"MAR_{series_uid}"), out_dir)
    now = _dt.datetime.now()
    hu = mu_to_hu_f64(images_mu)
    references = _source_references(handle)
    with atomic_folder(final) as tmp:
        for i, src in enumerate(handle.datasets):
            name = f"IM{i + 1:06d}.dcm"
            ds = _derive(
                src,
                stored=study.stored[i] if keep[i] else None,  # type: ignore[index]
                hu=None if keep[i] else hu[i],
                where=final / name,
                series_uid=series_uid,
                study_uid=study_uid,
                source_series_uid=handle.series_uid,
                references=references,
                bundle_name=bundle_name,
                bundle_sha256=bundle_sha256,
                now=now,
            )
            ds.save_as(tmp / name, enforce_file_format=True)
        if qa is not None:
            write_qa_record(tmp / "qa.json", {**qa, "series_instance_uid": series_uid})
        if extras is not None:
            extras(tmp)
    log.debug("wrote %d derived slices to %s", n, final)
    return final
