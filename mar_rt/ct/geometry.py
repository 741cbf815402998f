"""Fan-beam geometry as a small value object (DESIGN.md §4).

Notation (all lengths in cm, angles in radians):

    R   source_distance      source → isocentre
    D   detector_distance    isocentre → detector (flat)
    β_k view angle           2π k / n_views, k = 0..n_views-1
    du  det_spacing          bin spacing on the physical detector
    u_j bin centre           (j − (n_det − 1)/2) · du + det_offset

Orientation (as ASTRA's ``fanflat`` with angles β − π/2, verified on SynDeepLesion):

    source  s(β) = R · (−cos β, −sin β)
    centre  d(β) = D · ( cos β,  sin β)
    e_u(β)       = (sin β, −cos β)          detector index increases along e_u
    bin j        = d(β) + u_j · e_u(β)

so view 0 has its source at (−R, 0) and bins run towards −y; view n/4 has its source at
(0, −R) and bins run towards +x.  Image x runs along columns, y up the rows (row 0 on top):

    x(col) = (col − (W − 1)/2) · pixel,     y(row) = ((H − 1)/2 − row) · pixel.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

_SDL_PIXEL = 512 / 416 * 0.03  # cm: DeepLesion's 0.03 cm at 512² resampled to 416²


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class FanBeamGeometry:
    """A flat-detector fan-beam geometry over a square-pixel image grid.

    Use :meth:`syndeeplesion` for the default SynDeepLesion / InDuDoNet protocol.
    """

    n_rows: int = 416
    n_cols: int = 416
    pixel_size: float = _SDL_PIXEL
    n_views: int = 640
    n_det: int = 641
    det_spacing: float = 2 * math.sqrt(2) * 416 * _SDL_PIXEL / 641
    source_distance: float = 1075 * _SDL_PIXEL
    detector_distance: float = 1075 * _SDL_PIXEL
    det_offset: float = 0.0
    angle_offset: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n_rows", "n_cols", "n_views", "n_det"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(
                    f"FanBeamGeometry: {name} must be a positive integer, got {value!r}"
                )
        for name in ("pixel_size", "det_spacing", "source_distance", "detector_distance"):
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"FanBeamGeometry: {name} must be positive and finite, got {value!r}"
                )
        for name in ("det_offset", "angle_offset"):
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value)):
                raise ValueError(f"FanBeamGeometry: {name} must be finite, got {value!r}")
        half_diag = 0.5 * math.hypot(self.n_rows, self.n_cols) * self.pixel_size
        if self.source_distance <= half_diag:
            raise ValueError(
                f"FanBeamGeometry: source_distance {self.source_distance:.4g} cm lies inside the "
                f"image circle (radius {half_diag:.4g} cm)"
            )

    @classmethod
    def syndeeplesion(cls, **overrides: float | int) -> FanBeamGeometry:
        """The SynDeepLesion protocol: 416², 640 views, 641 flat bins, magnification 2."""
        return cls(**overrides)

    # --- derived quantities -------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int]:
        """(rows, cols) of the image."""
        return (self.n_rows, self.n_cols)

    @property
    def sino_shape(self) -> tuple[int, int]:
        """(views, detector bins) of the sinogram."""
        return (self.n_views, self.n_det)

    @property
    def magnification(self) -> float:
        """(R + D) / R."""
        return (self.source_distance + self.detector_distance) / self.source_distance

    def angles(self) -> np.ndarray:
        """View angles β_k in radians, float64 (n_views,)."""
        k = np.arange(self.n_views, dtype=np.float64)
        return 2 * np.pi * k / self.n_views + self.angle_offset

    def det_positions(self) -> np.ndarray:
        """Bin centres u_j on the physical detector in cm, float64 (n_det,)."""
        j = np.arange(self.n_det, dtype=np.float64)
        return (j - (self.n_det - 1) / 2) * self.det_spacing + self.det_offset

    def source_positions(self) -> np.ndarray:
        """Source positions s(β) in cm, float64 (n_views, 2) as (x, y)."""
        b = self.angles()
        return self.source_distance * np.stack([-np.cos(b), -np.sin(b)], axis=1)

    def detector_points(self) -> np.ndarray:
        """Bin centre positions in cm, float64 (n_views, n_det, 2) as (x, y)."""
        b = self.angles()
        centre = self.detector_distance * np.stack([np.cos(b), np.sin(b)], axis=1)
        e_u = np.stack([np.sin(b), -np.cos(b)], axis=1)
        u = self.det_positions()
        return centre[:, None, :] + u[None, :, None] * e_u[:, None, :]

    def pixel_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """x of each column and y of each row in cm, float64 ((n_cols,), (n_rows,))."""
        x = (np.arange(self.n_cols) - (self.n_cols - 1) / 2) * self.pixel_size
        y = ((self.n_rows - 1) / 2 - np.arange(self.n_rows)) * self.pixel_size
        return x, y

    def with_image_size(self, n_rows: int, n_cols: int | None = None) -> FanBeamGeometry:
        """Same field of view at another matrix size (pixel size scales)."""
        n_cols = n_rows if n_cols is None else n_cols
        return dataclasses.replace(
            self, n_rows=n_rows, n_cols=n_cols, pixel_size=self.pixel_size * self.n_cols / n_cols
        )

    def to_dict(self) -> dict[str, float | int]:
        """Plain JSON-able dict; ``FanBeamGeometry(**d)`` rebuilds it exactly."""
        return dataclasses.asdict(self)

    # --- validation helpers used by the operators ----------------------------------------
    def check_image(self, image_shape: tuple[int, ...], name: str = "image") -> None:
        """Raise ValueError unless the trailing two dims equal (n_rows, n_cols)."""
        if len(image_shape) < 2 or tuple(image_shape[-2:]) != self.image_shape:
            raise ValueError(
                f"{name} has shape {tuple(image_shape)}, expected "
                f"(..., {self.n_rows}, {self.n_cols}) for this geometry"
            )

    def check_sinogram(self, sino_shape: tuple[int, ...], name: str = "sinogram") -> None:
        """Raise ValueError unless the trailing two dims equal (n_views, n_det)."""
        if len(sino_shape) < 2 or tuple(sino_shape[-2:]) != self.sino_shape:
            raise ValueError(
                f"{name} has shape {tuple(sino_shape)}, expected "
                f"(..., {self.n_views}, {self.n_det}) (views × detector bins) for this geometry"
            )
