"""Clean CT slices for training: readers for every source, on the SynDeepLesion grid.

Notation (DESIGN.md §3):

    HU        Hounsfield units; μ = (HU/1000 + 1)·μw, μw = ``MU_WATER`` (``mar_rt.ct.units``),
              HU clipped at −1000
    μ         linear attenuation at 70 keV, cm⁻¹, float32 (416, 416) here, row 0 on top
    slice_id  a stable, file-name-safe name per clean slice, e.g. ``sdl_000321_03_01_011``;
              the train/validation split is decided on it (``mar_rt.train.split``)

Sources (each returns :class:`CleanSlice` on the 416² grid, same field of view, bilinear with
antialiasing when shrinking):

    SynDeepLesion ``gt.h5``    dataset ``image`` (μ, already 416²), id ``sdl_<series>_<slice>``
    DeepLesion 16-bit PNG      HU = value − 32768, 512² → 416², id ``dlpng_<stem>``
    ``.npy``                   HU or μ (``units``; guessed as HU when the minimum is < −100)
    DICOM ``.dcm``             HU = stored·RescaleSlope + RescaleIntercept (pydicom, lazy)
    NIfTI ``.nii[.gz]``        HU, axial slices ``data[:, :, z]`` (nibabel, lazy),
                               id ``nifti_<stem>_<z>``
    ``ct-volumes/*.npz``       ``hu`` int16 (n, H, W) + ``<name>.json`` (spacing, licence):
                               every 512² slice resized to 416² whatever its field of view
                               (the SynDeepLesion convention, as ``gt.h5`` images are made),
                               id ``ctvol_<name>_<k>``, series ``ctvol_<name>``
                               (:func:`read_ct_volume`; the low-resolution non-square
                               ``totalseg_body_3mm`` is skipped unless asked for, see there)
    exported folder            ``<slice_id>.npy`` μ 416² + ``sources.json`` (``export_sources``)

Every non-SynDeepLesion slice is clipped to [−1000, ``MAX_CLEAN_HU``] HU so that no clean pixel
reaches the metal threshold (2500 HU); SynDeepLesion targets are used unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.syndeeplesion import read_image
from mar_rt.ct.units import deeplesion_png_to_hu, hu_to_mu, mu_to_hu
from mar_rt.errors import BadInputError

log = logging.getLogger(__name__)

GRID = FanBeamGeometry.syndeeplesion().image_shape
"""The SynDeepLesion image grid (416, 416) every slice is resampled to."""

MAX_CLEAN_HU = 2000.0
"""Upper HU clip of non-SynDeepLesion clean slices (μ 0.576 cm⁻¹, below the metal threshold)."""

MANIFEST = "sources.json"
"""Provenance file of an exported slice folder."""

_ID_RE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, eq=False)
class CleanSlice:
    """One clean slice: ``image_mu`` float32 (416, 416) μ in cm⁻¹ and where it came from."""

    slice_id: str
    image_mu: np.ndarray
    source: str
    licence: str = ""
    series: str = ""
    """The series (patient) the slice belongs to, when the reader knows it; otherwise
    :func:`series_id` derives it from ``slice_id``. Splits are made on it."""


_DEEPLESION_ID = re.compile(r"^(?:sdl|cleanct|dlpng)_(\d{6})_\d{2}_\d{2}(?:_|$)")


def series_id(s: CleanSlice) -> str:
    """The split unit of a slice: ``s.series`` when set; DeepLesion-derived slices
    (``sdl_``, ``cleanct_``, ``dlpng_`` + ``<patient>_<study>_<series>``) group by patient,
    ``deeplesion_<patient>``; NIfTI slices by file, ``nifti_<stem>``; any other slice is its
    own series (its id)."""
    if s.series:
        return s.series
    m = _DEEPLESION_ID.match(s.slice_id)
    if m:
        return f"deeplesion_{m.group(1)}"
    if s.slice_id.startswith("nifti_"):
        return s.slice_id.rsplit("_", 1)[0]
    return s.slice_id


def safe_id(*parts: str) -> str:
    """A file-name-safe slice id from its parts (``[A-Za-z0-9_-]``, joined by ``_``)."""
    text = "_".join(p for p in parts if p)
    return _ID_RE.sub("_", text).strip("_-")[:80] or "slice"


def resample(image: np.ndarray, shape: tuple[int, int] = GRID) -> np.ndarray:
    """(h, w) → ``shape``, same field of view (``mar_rt.ct.resample``; float32)."""
    from mar_rt.ct.resample import resample_images

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 2:
        raise BadInputError(f"clean slice must be 2-D, got shape {arr.shape}")
    return resample_images(arr, shape)


def hu_slice_to_mu(hu: np.ndarray, name: str) -> np.ndarray:
    """HU (any square size) → μ float32 on the grid, HU clipped to [−1000, MAX_CLEAN_HU]."""
    hu = np.asarray(hu, dtype=np.float32)
    if not np.isfinite(hu).all():
        raise BadInputError(f"{name}: contains NaN or inf")
    if hu.ndim != 2 or hu.shape[0] != hu.shape[1] or hu.shape[0] < 64:
        raise BadInputError(f"{name}: need a square 2-D slice of at least 64², got {hu.shape}")
    mu = hu_to_mu(np.clip(resample(hu), -1000.0, MAX_CLEAN_HU))
    return mu.astype(np.float32)


# --- one reader per source ------------------------------------------------------------------
def read_syndeeplesion_gt(path: str | os.PathLike[str]) -> CleanSlice:
    """``<series>/<slice>/gt.h5`` → its ``image`` (μ, 416²), id ``sdl_<series>_<slice>``."""
    path = Path(path)
    try:
        image = read_image(path)
    except ValueError as err:
        raise BadInputError(str(err)) from err
    if image.shape != GRID:
        image = resample(image)
    sid = safe_id("sdl", path.parent.parent.name, path.parent.name)
    return CleanSlice(sid, image.astype(np.float32), f"SynDeepLesion gt.h5 {path}", "DeepLesion")


def read_deeplesion_png(path: str | os.PathLike[str]) -> CleanSlice:
    """DeepLesion 16-bit PNG (HU = value − 32768) → μ on the grid, id ``dlpng_<stem>``."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise BadInputError(
                    f"{path}: PNG mode {im.mode!r} is not a 16-bit DeepLesion slice"
                )
            values = np.asarray(im).astype(np.int32)
    except OSError as err:
        raise BadInputError(f"{path}: unreadable PNG ({err})") from err
    stem = path.stem.removeprefix("deeplesion_")
    mu = hu_slice_to_mu(deeplesion_png_to_hu(values), str(path))
    return CleanSlice(safe_id("dlpng", stem), mu, f"DeepLesion PNG {path}", "DeepLesion")


def read_npy(
    path: str | os.PathLike[str], *, units: str | None = None, prefix: str = "npy"
) -> CleanSlice:
    """A 2-D ``.npy`` slice in HU or μ (``units`` "hu" / "mu"; None guesses HU when the
    minimum is below −100) → μ on the grid, id ``<prefix>_<stem>``."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BadInputError(f"{path}: unreadable .npy ({err})") from err
    if arr.ndim != 2 or arr.dtype.kind not in "iuf":
        raise BadInputError(f"{path}: need a 2-D numeric array, got {arr.shape} {arr.dtype}")
    arr = arr.astype(np.float32)
    if units is None:
        units = "hu" if float(arr.min()) < -100.0 else "mu"
    if units == "hu":
        mu = hu_slice_to_mu(arr, str(path))
    elif units == "mu":
        if not np.isfinite(arr).all():
            raise BadInputError(f"{path}: contains NaN or inf")
        hu = mu_to_hu(arr)
        mu = hu_slice_to_mu(hu, str(path))
    else:
        raise BadInputError(f"{path}: units must be 'hu' or 'mu', got {units!r}")
    stem = path.stem.removesuffix("_gt")
    return CleanSlice(safe_id(prefix, stem), mu, f".npy ({units}) {path}")


def read_dicom_slice(path: str | os.PathLike[str]) -> CleanSlice:
    """A CT DICOM file → μ on the grid, id ``dicom_<stem>``.

    Read by the runtime's DICOM reader (``mar_rt.runtime.io.read_dicom``: Modality CT,
    rescale tags required, compressed transfer syntaxes decoded), so training and correction
    see a file the same way.
    """
    from mar_rt.runtime.io import read_dicom
    from mar_rt.runtime.io.dispatch import stored_hu

    path = Path(path)
    hu = stored_hu(read_dicom(path))[0]
    mu = hu_slice_to_mu(hu, str(path))
    return CleanSlice(safe_id("dicom", path.stem), mu, f"DICOM {path}")


def read_nifti_slices(path: str | os.PathLike[str], *, max_slices: int = 4) -> list[CleanSlice]:
    """Up to ``max_slices`` evenly spaced axial slices ``data[:, :, z]`` (HU) of a NIfTI
    volume; orientation is not normalised (training flips and rotates anyway)."""
    import nibabel

    path = Path(path)
    try:
        data = np.asarray(nibabel.load(str(path)).get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises many types
        raise BadInputError(f"{path}: unreadable NIfTI ({err})") from err
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise BadInputError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    zs = np.unique(np.linspace(0, data.shape[2] - 1, min(max_slices, data.shape[2])).round())
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    return [
        CleanSlice(
            safe_id("nifti", stem, f"{int(z):03d}"),
            hu_slice_to_mu(data[:, :, int(z)].T, f"{path}[z={int(z)}]"),
            f"NIfTI {path} z={int(z)}",
            series=safe_id("nifti", stem),
        )
        for z in zs
    ]


LOW_RES_POLICIES = ("skip", "pad")
"""What :func:`read_ct_volume` does with a volume whose slices are not 512² (``totalseg_body_3mm``,
101 × 122 at 3 mm): ``skip`` it (default: upsampled 3.6× it is far blurrier than any scanner
slice, and a blurred target teaches the networks to blur), or ``pad`` each slice to a square
with air (−1000 HU, centred) and resize that to 416²."""

CT_VOLUME_SIZE = 512
"""In-plane size of a full-resolution ct-volumes series."""


def read_ct_volume(
    path: str | os.PathLike[str], *, low_res: str = "skip", stride: int = 1
) -> list[CleanSlice]:
    """A ``ct-volumes`` series: ``<name>.npz`` (``hu`` int16 (n, H, W)) and ``<name>.json``
    beside it (``spacing_mm``, ``licence``, ``citation``) → every ``stride``-th slice as μ on
    the 416² grid, HU clipped to [−1000, ``MAX_CLEAN_HU``], id ``ctvol_<name>_<k:03d>``
    (k = index in the file), series ``ctvol_<name>``.

    The 512² slice is resized to 416² whatever its field of view (the SynDeepLesion
    convention); the source string records the pixel spacing before and after. Volumes that
    are not 512² follow ``low_res`` (:data:`LOW_RES_POLICIES`): ``[]`` when skipped.
    BadInputError: unreadable file, no ``hu`` array, not (n, H, W), a missing or bad .json.
    """
    path = Path(path)
    if low_res not in LOW_RES_POLICIES:
        raise BadInputError(f"{path}: low_res must be one of {LOW_RES_POLICIES}, got {low_res!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise BadInputError(f"{path}: stride must be a positive integer, got {stride!r}")
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        spacing = float(meta["spacing_mm"]["x"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(f"{meta_path}: missing or without spacing_mm.x ({err})") from err
    try:
        with np.load(path, allow_pickle=False) as f:
            hu = np.asarray(f["hu"])
    except (OSError, ValueError, KeyError) as err:
        raise BadInputError(f"{path}: unreadable or without a 'hu' array ({err})") from err
    if hu.ndim != 3 or hu.dtype.kind not in "iu" or hu.shape[0] == 0:
        raise BadInputError(f"{path}: 'hu' must be integer (n, H, W), got {hu.shape} {hu.dtype}")
    name = path.stem
    h, w = hu.shape[1:]
    if (h, w) != (CT_VOLUME_SIZE, CT_VOLUME_SIZE):
        if low_res == "skip":
            log.info("%s: %d×%d slices are not %d²; skipped (low_res='skip')", path, h, w, 512)
            return []
        side = max(h, w)
        padded = np.full((hu.shape[0], side, side), -1000, np.int16)
        top, left = (side - h) // 2, (side - w) // 2
        padded[:, top : top + h, left : left + w] = hu
        hu = padded
    side = hu.shape[1]
    fov = side * spacing
    licence = str(meta.get("licence", ""))
    if meta.get("citation"):
        licence += f"; cite: {meta['citation']}"
    series = safe_id("ctvol", name)
    out = []
    for k in range(0, hu.shape[0], stride):
        mu = hu_slice_to_mu(hu[k].astype(np.float32), f"{path}[{k}]")
        source = (
            f"ct-volumes {path.name} slice {k} ({side}² at {spacing:.3f} mm, field of view "
            f"{fov:.0f} mm → {GRID[0]}² at {fov / GRID[0]:.3f} mm)"
        )
        out.append(CleanSlice(f"{series}_{k:03d}", mu, source, licence, series))
    return out


def ct_volume_slices(
    folder: str | os.PathLike[str], *, low_res: str = "skip", stride: int = 1
) -> list[CleanSlice]:
    """Every ``*.npz`` series of a ``ct-volumes`` folder (:func:`read_ct_volume`), by id."""
    folder = Path(folder)
    out = [
        s
        for f in sorted(folder.glob("*.npz"))
        for s in read_ct_volume(f, low_res=low_res, stride=stride)
    ]
    return sorted(out, key=lambda s: s.slice_id)


def is_ct_volumes_folder(path: Path) -> bool:
    """True for a folder of ``<name>.npz`` + ``<name>.json`` pairs (the ct-volumes layout)."""
    npz = list(path.glob("*.npz")) if path.is_dir() else []
    return bool(npz) and all(f.with_suffix(".json").is_file() for f in npz)


# --- folders -------------------------------------------------------------------------------
def shared_data_slices(root: str | os.PathLike[str]) -> list[CleanSlice]:
    """Every clean slice of the project's shared data folder (its README's layout):
    ``syndeeplesion/train/*/*/gt.h5``, ``clean-ct/*_gt.npy`` (HU), ``clean-ct/*.png``
    (DeepLesion) and ``clean-ct/spineweb/*.npy`` (HU), sorted by id."""
    root = Path(root)
    out: list[CleanSlice] = []
    for gt in sorted((root / "syndeeplesion").glob("*/*/*/gt.h5")):
        out.append(read_syndeeplesion_gt(gt))
    clean = root / "clean-ct"
    for f in sorted(clean.glob("*.npy")):
        s = read_npy(f, units="hu", prefix="cleanct")
        out.append(CleanSlice(s.slice_id, s.image_mu, s.source, "ADN release (BSD-style)"))
    for f in sorted(clean.glob("*.png")):
        out.append(read_deeplesion_png(f))
    for f in sorted((clean / "spineweb").glob("*.npy")):
        s = read_npy(f, units="hu", prefix="spineweb")
        out.append(
            CleanSlice(s.slice_id, s.image_mu, s.source, "SpineWeb via ADN release (BSD-style)")
        )
    return sorted(out, key=lambda s: s.slice_id)


def read_exported(folder: str | os.PathLike[str]) -> list[CleanSlice]:
    """An :func:`export_sources` folder: ``<slice_id>.npy`` μ slices (+ ``sources.json``)."""
    folder = Path(folder)
    meta = {}
    if (folder / MANIFEST).is_file():
        meta = {e["slice_id"]: e for e in json.loads((folder / MANIFEST).read_text())["slices"]}
    out = []
    for f in sorted(folder.glob("*.npy")):
        arr = np.load(f, allow_pickle=False).astype(np.float32)
        if arr.shape != GRID or not np.isfinite(arr).all():
            raise BadInputError(f"{f}: expected finite μ of shape {GRID}, got {arr.shape}")
        entry = meta.get(f.stem, {})
        out.append(CleanSlice(f.stem, arr, entry.get("source", str(f)), entry.get("licence", "")))
    return out


def load_clean_slices(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, units: str | None = None
) -> list[CleanSlice]:
    """All clean slices under ``path`` (or under each of several paths), sorted by id.

    The shared data folder (has ``syndeeplesion/`` or ``clean-ct/``; its ``ct-volumes/`` is
    read only when named itself), ``ct-volumes`` folders (``*.npz`` + ``*.json``) and
    exported folders (``sources.json``) are read by their layout; any other folder is walked
    for ``gt.h5``, ``.npy`` (``units``), ``.png``, ``.dcm`` and ``.nii[.gz]`` files. A single
    file works too.
    BadInputError when nothing usable is found in a path, or when two slices share an id.
    """
    if not isinstance(path, (str, os.PathLike)):
        paths = list(path)
        if not paths:
            raise BadInputError("no data sources given")
        slices = [s for p in paths for s in load_clean_slices(p, units=units)]
        _refuse_duplicates(slices, " + ".join(str(p) for p in paths))
        return sorted(slices, key=lambda s: s.slice_id)
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder")
    if path.is_dir() and ((path / "syndeeplesion").is_dir() or (path / "clean-ct").is_dir()):
        slices = shared_data_slices(path)
    elif path.is_dir() and (path / MANIFEST).is_file():
        slices = read_exported(path)
    elif is_ct_volumes_folder(path):
        slices = ct_volume_slices(path)
    else:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        slices = []
        for f in files:
            name = f.name.lower()
            if name == "gt.h5":
                slices.append(read_syndeeplesion_gt(f))
            elif name.endswith(".npy"):
                slices.append(read_npy(f, units=units))
            elif name.endswith(".png"):
                slices.append(read_deeplesion_png(f))
            elif name.endswith(".dcm"):
                slices.append(read_dicom_slice(f))
            elif name.endswith((".nii", ".nii.gz")):
                slices.extend(read_nifti_slices(f))
    if not slices:
        raise BadInputError(f"{path}: no clean CT slices found (gt.h5, .npy, .png, .dcm, .nii)")
    _refuse_duplicates(slices, str(path))
    return sorted(slices, key=lambda s: s.slice_id)


def _refuse_duplicates(slices: Sequence[CleanSlice], where: str) -> None:
    ids = [s.slice_id for s in slices]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise BadInputError(f"{where}: duplicate slice ids {dup}; rename the files")


def export_sources(slices: Iterable[CleanSlice], out: str | os.PathLike[str]) -> Path:
    """Write ``<slice_id>.npy`` (μ float32 416²) per slice and ``sources.json`` into ``out``
    (created; existing files of the same name are replaced). About 0.7 MB per slice."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in slices:
        np.save(out / f"{s.slice_id}.npy", np.ascontiguousarray(s.image_mu, dtype=np.float32))
        entries.append({"slice_id": s.slice_id, "source": s.source, "licence": s.licence})
    (out / MANIFEST).write_text(
        json.dumps({"grid": list(GRID), "units": "mu", "slices": entries}, indent=1)
    )
    log.info("exported %d clean slices to %s", len(entries), out)
    return out
