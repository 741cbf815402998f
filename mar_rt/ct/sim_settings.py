"""Settings of the metal artifact simulator, and random draws of them for training (DESIGN §5).

``SimulationSettings()`` is the SynDeepLesion protocol exactly as ``simulate_metal_artifact``
ran it before these settings existed: projection on the reconstruction grid, no detector or
view blur, GE 120 kVp with no extra filtration, water-only beam-hardening correction, 2e7
photons and 20 scatter photons per bin, partial volume on, Ram-Lak FBP, titanium at 4.5 g/cm³.

The other values model what real scanners and other simulators do differently (issue 21):

    upsample            project a finer grid (image bilinearly upsampled, mask and materials on
                        that grid) than the one reconstructed, so the data are not made by the
                        reconstructor's own projector ("inverse crime")
    detector_aperture   width, in detector bins, of the blur each bin integrates over (a box:
                        the detector cell; or the FWHM of a Gaussian); 0 = none
    view_aperture       width, in views, of a box blur along the rotation (the gantry turns
                        while a view integrates); 0 = none
    aperture_on_metal   whether the two blurs also apply to the metal path length. Off by
                        default: the official files' trace is as narrow as the unblurred
                        projection's, and blurring the metal path widens the trace by a fifth
                        and halves the artifact strength (0.55× the official's; 1.11× without)
    prefilter_*         extra beam filtration: the spectrum is S(E)·exp(−μ_f(E)·t). Only the
                        GE 120 kVp spectrum ships, so filtration is how the spectrum varies
                        (more filtration → harder beam → less beam hardening)
    bhc                 "none", "water" (the protocol's cubic), or "water+bone" (a first-pass
                        image is split into water and bone, and their reprojections give the
                        residual polychromatic error, Joseph & Spital 1978)
    photons, scatter    photons per bin (N0), constant scatter photons per bin (N_s)
    scatter_fraction    extra scatter per view: this fraction of the view's mean primary counts,
                        spread evenly over the bins (a scatter-to-primary ratio model)
    partial_volume      metal path ÷ 4 on the trace edge (step 3 of the protocol) or not
    filter              FBP window (``mar_rt.ct.fbp.check_filter``)
    material, metal_density   implant metal and its density (g/cm³; None = table density)

``OFFICIAL_MATCH`` is the resolution at which our metal-free figure matches the official
SynDeepLesion files' (38.9 dB far from metal, about 90% of the error on edges): 2× grid, 1-bin
detector box, 2-view box, metal path unblurred. ``benchmarks/sim_resolution.py`` measures it:
38.75 / 39.37 dB against the official 38.94 / 38.96 dB (the protocol's 43.05 / 44.90 dB).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mar_rt.ct import physics
from mar_rt.ct.fbp import check_filter

BHC_CHOICES = ("none", "water", "water+bone")
"""Beam-hardening corrections the simulator can apply."""

KERNELS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")
"""FBP windows that training draws from, sharpest to smoothest (Ram-Lak to Hann)."""

APERTURE_SHAPES = ("box", "gaussian")
"""Detector aperture profiles: a box ``detector_aperture`` bins wide, or a Gaussian of that FWHM."""


def _real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _positive(value: object) -> bool:
    return _real(value) and math.isfinite(float(value)) and float(value) > 0  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class SimulationSettings:
    """One simulator configuration (see the module docstring for each field)."""

    material: str = "Ti"
    metal_density: float | None = None
    photons: float = 2e7
    scatter: float = 20.0
    scatter_fraction: float = 0.0
    prefilter_material: str = "Cu"
    prefilter_cm: float = 0.0
    bhc: str = "water"
    partial_volume: bool = True
    filter: str = "ram-lak"
    upsample: int = 1
    detector_aperture: float = 0.0
    aperture_shape: str = "box"
    view_aperture: float = 0.0
    aperture_on_metal: bool = False

    def __post_init__(self) -> None:
        metal = physics.material_name(self.material)
        if metal not in physics.METALS:
            raise ValueError(
                f"SimulationSettings: material {self.material!r} is not an implant metal; "
                f"choose one of {', '.join(physics.METALS)}"
            )
        object.__setattr__(self, "material", metal)
        object.__setattr__(
            self, "prefilter_material", physics.material_name(self.prefilter_material)
        )
        if self.metal_density is not None and not _positive(self.metal_density):
            raise ValueError(
                f"SimulationSettings: metal_density must be > 0 g/cm³, got {self.metal_density!r}"
            )
        if not _positive(self.photons):
            raise ValueError(f"SimulationSettings: photons must be > 0, got {self.photons!r}")
        for name in ("scatter", "scatter_fraction", "prefilter_cm", "detector_aperture"):
            value = getattr(self, name)
            if not (_real(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"SimulationSettings: {name} must be ≥ 0, got {value!r}")
        if not (_real(self.view_aperture) and 0 <= self.view_aperture <= 16):
            raise ValueError(
                f"SimulationSettings: view_aperture must be in [0, 16] views, "
                f"got {self.view_aperture!r}"
            )
        if self.bhc not in BHC_CHOICES:
            raise ValueError(
                f"SimulationSettings: bhc must be one of {', '.join(BHC_CHOICES)}, got {self.bhc!r}"
            )
        try:
            check_filter(self.filter)
        except ValueError as err:
            raise ValueError(f"SimulationSettings: {err}") from None
        if self.aperture_shape not in APERTURE_SHAPES:
            raise ValueError(
                f"SimulationSettings: aperture_shape must be one of {', '.join(APERTURE_SHAPES)}, "
                f"got {self.aperture_shape!r}"
            )
        up = self.upsample
        if isinstance(up, bool) or not isinstance(up, (int, np.integer)) or not 1 <= up <= 4:
            raise ValueError(f"SimulationSettings: upsample must be an integer 1–4, got {up!r}")
        for name in ("partial_volume", "aperture_on_metal"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(
                    f"SimulationSettings: {name} must be a bool, got {getattr(self, name)!r}"
                )

    @property
    def is_protocol_resolution(self) -> bool:
        """True when data are projected on the reconstruction grid with no blur (the default)."""
        return self.upsample == 1 and self.detector_aperture == 0 and self.view_aperture == 0

    def metal_mu_70kev(self) -> float:
        """μ of the implant at 70 keV in cm⁻¹ (with ``metal_density`` when set)."""
        return float(
            physics.linear_attenuation(self.material, physics.REFERENCE_KEV, self.metal_density)
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``SimulationSettings.from_dict(d)`` rebuilds it exactly."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulationSettings:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"SimulationSettings: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def sample(
        cls, rng: np.random.Generator, ranges: SimulationRanges | None = None
    ) -> SimulationSettings:
        """One random draw from ``ranges`` (default :data:`TRAINING_RANGES`); see
        :meth:`SimulationRanges.sample`."""
        return (TRAINING_RANGES if ranges is None else ranges).sample(rng)


@dataclass(frozen=True, kw_only=True)
class SimulationRanges:
    """Where random settings are drawn from: (low, high) intervals and choice tuples.

    Intervals are uniform, except ``photons`` (log-uniform). ``density_scale`` multiplies the
    metal's table density. A (v, v) interval or a one-element tuple fixes that setting.
    """

    materials: tuple[str, ...] = physics.METALS
    density_scale: tuple[float, float] = (0.9, 1.1)
    photons: tuple[float, float] = (1e6, 5e7)
    scatter: tuple[float, float] = (0.0, 50.0)
    scatter_fraction: tuple[float, float] = (0.0, 0.03)
    prefilter_material: str = "Cu"
    prefilter_cm: tuple[float, float] = (0.0, 0.04)
    bhc: tuple[str, ...] = BHC_CHOICES
    partial_volume: tuple[bool, ...] = (True, False)
    filters: tuple[str, ...] = KERNELS
    upsample: tuple[int, ...] = (2,)
    detector_aperture: tuple[float, float] = (0.5, 1.5)
    aperture_shape: tuple[str, ...] = APERTURE_SHAPES
    view_aperture: tuple[float, float] = (0.0, 3.0)
    aperture_on_metal: tuple[bool, ...] = (False,)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and f.type.startswith("tuple[float"):
                if len(value) != 2 or not value[0] <= value[1]:
                    raise ValueError(
                        f"SimulationRanges: {f.name} must be (low, high) with low ≤ high, "
                        f"got {value!r}"
                    )
            elif isinstance(value, tuple) and not value:
                raise ValueError(f"SimulationRanges: {f.name} has no choices")
        low = self._at(0)  # both ends of every interval must be valid settings
        self._at(1)
        choices = {
            "material": self.materials,
            "bhc": self.bhc,
            "partial_volume": self.partial_volume,
            "filter": self.filters,
            "upsample": self.upsample,
            "aperture_shape": self.aperture_shape,
            "aperture_on_metal": self.aperture_on_metal,
        }
        for name, values in choices.items():
            for value in values:  # each choice must be a valid setting
                dataclasses.replace(low, **{name: value, "metal_density": None})

    def _at(self, end: int) -> SimulationSettings:
        """The settings at the low (0) or high (1) end of every interval, first choices."""
        m = self.materials[0]
        return SimulationSettings(
            material=m,
            metal_density=physics.DENSITY[physics.material_name(m)] * self.density_scale[end],
            photons=self.photons[end],
            scatter=self.scatter[end],
            scatter_fraction=self.scatter_fraction[end],
            prefilter_material=self.prefilter_material,
            prefilter_cm=self.prefilter_cm[end],
            bhc=self.bhc[0],
            partial_volume=self.partial_volume[0],
            filter=self.filters[0],
            upsample=self.upsample[0],
            detector_aperture=self.detector_aperture[end],
            aperture_shape=self.aperture_shape[0],
            view_aperture=self.view_aperture[end],
            aperture_on_metal=self.aperture_on_metal[0],
        )

    def sample(self, rng: np.random.Generator) -> SimulationSettings:
        """One draw: every field in a fixed order from ``rng`` (so a seed gives one sequence)."""

        def pick(choices: tuple[Any, ...]) -> Any:
            return choices[int(rng.integers(len(choices)))]

        def uniform(bounds: tuple[float, float]) -> float:
            return float(rng.uniform(bounds[0], bounds[1]))

        material = physics.material_name(pick(self.materials))
        lo, hi = np.log(self.photons[0]), np.log(self.photons[1])
        return SimulationSettings(
            material=material,
            metal_density=physics.DENSITY[material] * uniform(self.density_scale),
            photons=float(np.exp(rng.uniform(lo, hi))),
            scatter=uniform(self.scatter),
            scatter_fraction=uniform(self.scatter_fraction),
            prefilter_material=self.prefilter_material,
            prefilter_cm=uniform(self.prefilter_cm),
            bhc=pick(self.bhc),
            partial_volume=bool(pick(self.partial_volume)),
            filter=pick(self.filters),
            upsample=int(pick(self.upsample)),
            detector_aperture=uniform(self.detector_aperture),
            aperture_shape=pick(self.aperture_shape),
            view_aperture=uniform(self.view_aperture),
            aperture_on_metal=bool(pick(self.aperture_on_metal)),
        )


PROTOCOL = SimulationSettings()
"""The SynDeepLesion protocol as first implemented (projection on the reconstruction grid)."""

OFFICIAL_MATCH = SimulationSettings(upsample=2, detector_aperture=1.0, view_aperture=2.0)
"""The protocol at the official files' resolution (benchmarks/sim_resolution.py)."""

TRAINING_RANGES = SimulationRanges()
"""Default ranges for training draws; they contain OFFICIAL_MATCH's resolution."""

HELD_OUT_RANGES = SimulationRanges(
    density_scale=(1.1, 1.25),
    photons=(3e5, 1e6),
    scatter=(50.0, 100.0),
    scatter_fraction=(0.03, 0.06),
    prefilter_cm=(0.04, 0.08),
    upsample=(3,),
    detector_aperture=(1.5, 2.5),
    view_aperture=(3.0, 5.0),
)
"""Settings outside :data:`TRAINING_RANGES` wherever an interval can be (denser metal, fewer
photons, more scatter and filtration, a 3× grid, wider apertures): evaluation cases that test
whether a network learnt the artifact or the training simulator's signature. The choices
(metal, BHC, kernel) cannot lie outside and are the training ones."""


# --- the resolution check (benchmarks/sim_resolution.py, issue 21) ---------------------------
FAR_MARGIN_PX = 25
"""Pixels within this distance of the metal are left out of the resolution figure."""

EDGE_QUANTILE = 0.8
"""Edges: pixels whose target-image gradient is in the top 20% of the scored region."""


def far_from_metal(metal: np.ndarray, margin_px: float = FAR_MARGIN_PX) -> np.ndarray:
    """bool (H, W): pixels more than ``margin_px`` from every metal pixel (Euclidean)."""
    import scipy.ndimage as ndi

    metal = np.asarray(metal, dtype=bool)
    if not metal.any():
        return np.ones(metal.shape, dtype=bool)
    return ndi.distance_transform_edt(~metal) > margin_px


def resolution_figure(
    recon_mu: np.ndarray, image_mu: np.ndarray, metal: np.ndarray
) -> tuple[float, float]:
    """(PSNR dB, edge fraction) of a metal-free reconstruction against its target image.

    Both (H, W) μ images in cm⁻¹ are scaled as the SynDeepLesion metrics do (clip to [0, 0.5],
    ÷ 0.5); the PSNR is 10·log10(1/MSE) over the pixels more than ``FAR_MARGIN_PX`` from
    ``metal``. The edge fraction is the share of that squared error on pixels whose
    ``image_mu`` gradient magnitude (numpy central differences) is in the region's top 20%
    (and not zero).
    """
    rec = np.clip(np.asarray(recon_mu, dtype=np.float64), 0, 0.5) / 0.5
    img64 = np.asarray(image_mu, dtype=np.float64)
    err = (rec - np.clip(img64, 0, 0.5) / 0.5) ** 2
    roi = far_from_metal(metal)
    gy, gx = np.gradient(img64)
    grad = np.hypot(gx, gy)
    edge = (grad >= np.quantile(grad[roi], EDGE_QUANTILE)) & (grad > 0)  # flat is never edge
    total = float(err[roi].sum())
    psnr = float(10 * np.log10(roi.sum() / total)) if total > 0 else math.inf
    return psnr, float(err[roi & edge].sum() / total) if total > 0 else 0.0
