"""What every reader returns and every writer takes: :class:`Study`, :class:`Slice`, units,
atomic writes, and the resampling of a study to the bundle's image grid and back.

Notation (DESIGN.md §3):

    μ       images            linear attenuation, cm⁻¹ at 70 keV, float32 (N, H, W)
    μw      units.MU_WATER    0.192 cm⁻¹
    HU      Hounsfield units  HU = (μ/μw − 1)·1000, clipped at −1000 before HU → μ
    p       sinograms         line integrals, (N, V, D) = (slices, views, detector bins)
    Δ       pixel_spacing_mm  (row, col) pixel size in mm
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mar_rt.atomic import atomic_file as atomic_file  # re-exported
from mar_rt.atomic import atomic_folder as atomic_folder  # re-exported
from mar_rt.ct import units
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.resample import resample_images, resample_masks
from mar_rt.errors import BadInputError

log = logging.getLogger(__name__)

SourceKind = Literal["dicom", "nifti", "npy", "h5"]
Units = Literal["hu", "mu"]


# --- units (DESIGN §3, via mar_rt.ct.units) -----------------------------------------------------
def hu_to_mu_f32(hu: np.ndarray) -> np.ndarray:
    """HU → μ (cm⁻¹) as float32, HU clipped at −1000 (computed in float64)."""
    return units.hu_to_mu(np.asarray(hu, dtype=np.float64)).astype(np.float32)


def mu_to_hu_f64(mu: np.ndarray) -> np.ndarray:
    """μ (cm⁻¹) → HU as float64, no clipping."""
    return units.mu_to_hu(np.asarray(mu, dtype=np.float64))


def to_mu(values: np.ndarray, unit: Units, source: Path | str) -> np.ndarray:
    """Convert an array read from ``source`` in ``unit`` ('hu' or 'mu') to μ float32.

    Raises BadInputError naming ``source`` on NaN/inf.
    """
    check_finite(values, source, "pixel values")
    if unit == "hu":
        return hu_to_mu_f32(values)
    if unit == "mu":
        return np.asarray(values, dtype=np.float32)
    raise ValueError(f"units must be 'hu' or 'mu', got {unit!r}")


def from_mu(images_mu: np.ndarray, unit: Units) -> np.ndarray:
    """μ → ``unit`` ('hu' or 'mu'), float32."""
    if unit == "hu":
        return mu_to_hu_f64(images_mu).astype(np.float32)
    if unit == "mu":
        return np.asarray(images_mu, dtype=np.float32)
    raise ValueError(f"units must be 'hu' or 'mu', got {unit!r}")


def check_finite(values: np.ndarray, source: Path | str, what: str) -> None:
    """Raise BadInputError naming ``source`` when ``values`` holds NaN or ±inf."""
    values = np.asarray(values)
    if values.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(values)
    if bad.any():
        n_nan = int(np.isnan(values).sum())
        raise BadInputError(
            f"{source}: {what} contain {n_nan} NaN and {int(bad.sum()) - n_nan} inf values"
        )


# --- the study --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Slice:
    """One slice of a :class:`Study` (views into the study's arrays, not copies)."""

    index: int
    image: np.ndarray  # μ, float32 (H, W)
    position_mm: float  # along the slice normal; NaN when unknown
    source_path: Path
    sinogram: np.ndarray | None = None  # (V, D) float32
    metal_mask: np.ndarray | None = None  # (H, W) bool
    metal_trace: np.ndarray | None = None  # (V, D) bool
    target: np.ndarray | None = None  # μ, float32 (H, W)


@dataclass(frozen=True, eq=False)
class Study:
    """A stack of CT slices in μ, with what the source files said about them.

    ``images`` are sorted by position along the slice normal (ascending) for DICOM and NIfTI,
    and in file order otherwise.  ``sinograms`` (``sinogram_is_measured`` tells whether the
    scanner/file gave them or they were computed), ``metal_masks``, ``metal_traces`` and
    ``targets`` are optional and, when present, have one entry per slice.  ``stored`` holds
    the values exactly as the source stored them, (N, H, W) in the source's dtype: DICOM
    stored pixel values before rescale, ``.npy`` / NIfTI values in their units, SynDeepLesion
    μ; writers copy them bit for bit into slices that were not corrected.  ``handle`` is
    opaque and belongs to the writer of ``source_kind``; ``skipped`` lists (file, reason) for
    files left out under ``skip_bad``.  Replace fields with :func:`dataclasses.replace`.
    """

    images: np.ndarray  # μ cm⁻¹, float32 (N, H, W)
    pixel_spacing_mm: tuple[float, float] | None  # (row, col); None when the source has none
    positions_mm: np.ndarray  # float64 (N,), NaN when unknown
    source_kind: SourceKind
    source_paths: tuple[Path, ...]  # one per slice
    sinograms: np.ndarray | None = None  # float32 (N, V, D)
    sinogram_is_measured: bool = False
    metal_masks: np.ndarray | None = None  # bool (N, H, W)
    metal_traces: np.ndarray | None = None  # bool (N, V, D)
    targets: np.ndarray | None = None  # μ cm⁻¹, float32 (N, H, W)
    stored: np.ndarray | None = field(default=None, repr=False)
    handle: Any = field(default=None, repr=False, compare=False)
    skipped: tuple[tuple[Path, str], ...] = ()

    def __post_init__(self) -> None:
        images = self.images
        if not (isinstance(images, np.ndarray) and images.ndim == 3 and images.dtype == np.float32):
            raise ValueError(
                f"Study.images must be a float32 (N, H, W) array, got "
                f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}"
            )
        n = images.shape[0]
        if len(self.source_paths) != n or np.shape(self.positions_mm) != (n,):
            raise ValueError(
                f"Study: {n} images but {len(self.source_paths)} source paths and "
                f"{np.shape(self.positions_mm)} positions"
            )
        for name, shape in (
            ("metal_masks", images.shape),
            ("targets", images.shape),
            ("stored", images.shape),
        ):
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                raise ValueError(f"Study.{name} has shape {value.shape}, expected {shape}")
        for name in ("sinograms", "metal_traces"):
            value = getattr(self, name)
            if value is not None and (value.ndim != 3 or value.shape[0] != n):
                raise ValueError(f"Study.{name} has shape {value.shape}, expected ({n}, V, D)")
        if self.sinograms is not None and self.metal_traces is not None:
            if self.sinograms.shape != self.metal_traces.shape:
                raise ValueError(
                    f"Study.metal_traces {self.metal_traces.shape} differ from sinograms "
                    f"{self.sinograms.shape}"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of every slice."""
        return (int(self.images.shape[1]), int(self.images.shape[2]))

    def slice(self, i: int) -> Slice:
        """Slice ``i`` (views into this study's arrays)."""

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[i]

        return Slice(
            index=i,
            image=self.images[i],
            position_mm=float(self.positions_mm[i]),
            source_path=self.source_paths[i],
            sinogram=pick(self.sinograms),
            metal_mask=pick(self.metal_masks),
            metal_trace=pick(self.metal_traces),
            target=pick(self.targets),
        )

    def __iter__(self) -> Iterator[Slice]:
        return (self.slice(i) for i in range(len(self)))


def check_sinograms(study: Study, geometry: FanBeamGeometry) -> None:
    """Raise BadInputError naming the file when a sinogram or trace is not (views, bins)."""
    for name in ("sinograms", "metal_traces"):
        value = getattr(study, name)
        if value is not None and tuple(value.shape[1:]) != geometry.sino_shape:
            raise BadInputError(
                f"{study.source_paths[0]}: {name} have shape {tuple(value.shape[1:])} per slice, "
                f"but the geometry needs {geometry.n_views} views × {geometry.n_det} detector bins"
            )


# --- resampling to the bundle's grid -----------------------------------------------------------
@dataclass(frozen=True)
class GridMap:
    """How a study was mapped onto the bundle grid, so outputs can be mapped back."""

    source_shape: tuple[int, int]  # (H, W) of the study as read
    grid_shape: tuple[int, int]  # (h, w) the pipeline runs at
    source_spacing_mm: tuple[float, float] | None
    grid_spacing_mm: tuple[float, float] | None

    @property
    def resampled(self) -> bool:
        """True when the grid differs from the source size."""
        return self.source_shape != self.grid_shape


def _resample_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return resample_masks(masks, shape)


def to_grid(
    study: Study,
    geometry: FanBeamGeometry,
    *,
    resample: bool = True,
) -> tuple[Study, GridMap]:
    """Put ``study`` on the bundle grid ``geometry.image_shape`` and check its sinograms.

    A study already at the grid size is returned unchanged.  Otherwise, with ``resample`` the
    images, targets and masks are resampled keeping the field of view (the pixel size changes;
    that is logged); without it, BadInputError names the supported size.  Sinograms and
    traces are never resampled; their shape must match the geometry.  Map outputs back with
    :func:`from_grid`.
    """
    check_sinograms(study, geometry)
    grid = geometry.image_shape
    src = study.image_shape
    if src == grid:
        return study, GridMap(src, src, study.pixel_spacing_mm, study.pixel_spacing_mm)
    if not resample:
        raise BadInputError(
            f"{study.source_paths[0]}: image size {src[0]}×{src[1]} is not supported by the "
            f"bundle (supported: {grid[0]}×{grid[1]}); allow resampling to run it at that size"
        )
    spacing = study.pixel_spacing_mm
    new_spacing = None
    if spacing is not None:
        new_spacing = (spacing[0] * src[0] / grid[0], spacing[1] * src[1] / grid[1])
    fov = "" if spacing is None else f" field of view {spacing[1] * src[1]:.1f} mm,"
    pixel = (
        "pixel size unknown"
        if spacing is None
        else f"pixel {spacing[1]:.4g} → {new_spacing[1]:.4g} mm"  # type: ignore[index]
    )
    log.warning(
        "%s: resampling %d×%d → %d×%d keeping the%s %s (the bundle geometry assumes %.4g mm)",
        study.source_paths[0],
        src[0],
        src[1],
        grid[0],
        grid[1],
        fov,
        pixel,
        geometry.pixel_size * 10.0,
    )
    resampled = dataclasses.replace(
        study,
        images=resample_images(study.images, grid),
        targets=None if study.targets is None else resample_images(study.targets, grid),
        metal_masks=None if study.metal_masks is None else _resample_masks(study.metal_masks, grid),
        pixel_spacing_mm=new_spacing,
    )
    return resampled, GridMap(src, grid, spacing, new_spacing)


def from_grid(images: np.ndarray, grid_map: GridMap) -> np.ndarray:
    """Map (N, h, w) images computed on the grid back to the source size (float32)."""
    images = np.asarray(images, dtype=np.float32)
    if tuple(images.shape[1:]) != grid_map.grid_shape:
        raise ValueError(
            f"from_grid: images have shape {images.shape}, expected (N, {grid_map.grid_shape})"
        )
    if not grid_map.resampled:
        return images
    return resample_images(images, grid_map.source_shape)


# --- atomic writes ----------------------------------------------------------------------------
def check_inside(path: Path, out_dir: Path) -> Path:
    """Return ``path`` resolved, refusing (ValueError) any path that escapes ``out_dir``."""
    resolved = path.resolve()
    root = out_dir.resolve()
    if resolved != root and root not in resolved.parents:
        raise ValueError(f"refusing to write {path}: it lies outside the output folder {out_dir}")
    return resolved


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"qa record: {type(value).__name__} is not JSON serialisable")


def write_qa_record(path: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as indented JSON to ``path`` atomically (numpy scalars/arrays allowed)."""
    text = json.dumps(record, indent=2, default=_json_default, allow_nan=True)
    with atomic_file(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)
