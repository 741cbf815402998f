"""X-ray spectrum and attenuation tables for the metal artifact simulation (DESIGN.md §5).

Notation:

    E          photon energy in keV
    S(E)       GE 120 kVp spectrum, relative photon count per 1-keV bin, E = 20..120
    μ/ρ(E)     mass attenuation, total with coherent scattering, cm²/g (XCOM column 6)
    ρ          density, g/cm³ (``DENSITY``)
    μ_m(E)     linear attenuation of material m, ρ · μ/ρ(E), cm⁻¹

Interpolation is log-log between table energies: log μ/ρ is linear in log E. The tables are on
a 1-keV grid, so the integer energies the simulation uses are table values exactly; the
interpolation only matters for non-integer energies. Energies outside a table's range raise
ValueError rather than extrapolate.

The tables ship as ``data/physics_tables.npz`` (provenance in ``data/README.md``).
"""

from __future__ import annotations

import functools
import types
from importlib import resources

import numpy as np

MATERIALS = ("water", "bone", "Ti", "Fe", "Cu", "Au")
"""Materials with a table: water, cortical bone (ICRU 44), titanium, iron, copper, gold."""

DENSITY = types.MappingProxyType(
    {"water": 1.0, "bone": 1.92, "Ti": 4.5, "Fe": 7.8, "Cu": 8.9, "Au": 19.32}
)
"""Density in g/cm³ of each material."""

METALS = ("Ti", "Fe", "Cu", "Au")
"""Materials that can be the implant in the simulation."""

SPECTRUM_RANGE_KEV = (20, 120)
"""Energies (inclusive, keV) the simulation sums over."""

REFERENCE_KEV = 70.0
"""Energy of the monochromatic images (μ at 70 keV)."""

_ALIASES = {m.lower(): m for m in MATERIALS} | {
    "h2o": "water",
    "titanium": "Ti",
    "iron": "Fe",
    "steel": "Fe",
    "copper": "Cu",
    "gold": "Au",
    "cortical_bone": "bone",
}


def material_name(material: str) -> str:
    """Canonical name of ``material`` ('titanium' → 'Ti'); ValueError if unknown."""
    key = str(material).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"material {material!r} is unknown; choose one of {', '.join(MATERIALS)}")
    return _ALIASES[key]


@functools.lru_cache(maxsize=1)
def _tables() -> dict[str, np.ndarray]:
    ref = resources.files("mar_rt.ct") / "data" / "physics_tables.npz"
    with resources.as_file(ref) as path, np.load(path) as data:
        return {k: np.array(data[k], dtype=np.float64) for k in data.files}


def mass_attenuation_table(material: str) -> np.ndarray:
    """The raw table of ``material``: float64 (N, 2), energy in MeV and μ/ρ in cm²/g."""
    return _tables()[f"mass_att_{material_name(material)}"].copy()


def spectrum(
    e_min_kev: int = SPECTRUM_RANGE_KEV[0], e_max_kev: int = SPECTRUM_RANGE_KEV[1]
) -> tuple[np.ndarray, np.ndarray]:
    """GE 120 kVp spectrum in 1-keV bins: (energies in keV, relative photon counts), float64 (n,).

    Defaults to the simulation's 20–120 keV. The counts are the table values, not normalised.
    """
    table = _tables()["spectrum_GE120"]
    keep = (table[:, 0] >= e_min_kev) & (table[:, 0] <= e_max_kev)
    if not keep.any():
        raise ValueError(
            f"spectrum: no bins between {e_min_kev} and {e_max_kev} keV "
            f"(table covers {table[0, 0]:g}–{table[-1, 0]:g} keV)"
        )
    return table[keep, 0].copy(), table[keep, 1].copy()


def mass_attenuation(material: str, energy_kev: float | np.ndarray) -> np.ndarray:
    """μ/ρ of ``material`` in cm²/g at ``energy_kev``, log-log interpolated on energy (float64)."""
    table = mass_attenuation_table(material)
    e_tab = table[:, 0] * 1000.0
    e = np.asarray(energy_kev, dtype=np.float64)
    if np.any(~np.isfinite(e)) or np.any(e < e_tab[0]) or np.any(e > e_tab[-1]):
        raise ValueError(
            f"energy_kev outside the {material_name(material)} table "
            f"({e_tab[0]:g}–{e_tab[-1]:g} keV): got {np.min(e):g}–{np.max(e):g}"
        )
    return np.exp(np.interp(np.log(e), np.log(e_tab), np.log(table[:, 1])))


def linear_attenuation(
    material: str, energy_kev: float | np.ndarray, density: float | None = None
) -> np.ndarray:
    """μ of ``material`` in cm⁻¹ at ``energy_kev`` (mass attenuation × density), float64.

    ``density`` in g/cm³ overrides the table density (``DENSITY``) when given.
    """
    rho = DENSITY[material_name(material)] if density is None else float(density)
    if not (np.isfinite(rho) and rho > 0):
        raise ValueError(f"density of {material_name(material)} must be > 0 g/cm³, got {density}")
    return mass_attenuation(material, energy_kev) * rho


def filtered_spectrum(
    material: str, thickness_cm: float, spectrum_kev: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The spectrum behind a pre-filter: S(E)·exp(−μ_material(E)·thickness), float64 (n,) each.

    Models extra beam filtration (a copper or water slab in the beam), which hardens the
    spectrum: the mean energy rises and beam hardening in the object falls. The GE 120 kVp table
    is the only tube spectrum shipped; filtration is how the simulation varies the spectrum.
    ``spectrum_kev`` defaults to :func:`spectrum`; ``thickness_cm`` 0 returns it unchanged.
    """
    energies, counts = spectrum() if spectrum_kev is None else spectrum_kev
    if not (np.isfinite(thickness_cm) and thickness_cm >= 0):
        raise ValueError(f"pre-filter thickness must be ≥ 0 cm, got {thickness_cm}")
    if thickness_cm == 0:
        return energies.copy(), counts.copy()
    return energies.copy(), counts * np.exp(-linear_attenuation(material, energies) * thickness_cm)


def mean_energy(spectrum_kev: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Photon-count-weighted mean energy of a spectrum in keV (default: :func:`spectrum`)."""
    energies, counts = spectrum() if spectrum_kev is None else spectrum_kev
    return float((energies * counts).sum() / counts.sum())


def water_bhc_coefficients(
    max_thickness_cm: float = 50.0,
    step_cm: float = 0.05,
    *,
    spectrum_kev: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[float, float, float]:
    """Water beam-hardening correction (a1, a2, a3): p_mono ≈ a1·p + a2·p² + a3·p³.

    Least-squares fit (no constant term) over water thicknesses t = 0..50 cm in 0.05 cm steps,
    where p = −ln(Σ_E S(E)·e^{−μw(E)·t} / Σ_E S(E)) and p_mono = μw(70 keV)·t. ``spectrum_kev``
    (energies, counts) defaults to :func:`spectrum`.
    """
    energies, counts = spectrum() if spectrum_kev is None else spectrum_kev
    mu_e = linear_attenuation("water", energies)
    t = np.arange(0.0, max_thickness_cm + step_cm / 2, step_cm)
    weights = counts / counts.sum()
    p_poly = -np.log(np.exp(-np.outer(t, mu_e)) @ weights)
    p_mono = linear_attenuation("water", REFERENCE_KEV) * t
    design = np.stack([p_poly, p_poly**2, p_poly**3], axis=1)
    coef, *_ = np.linalg.lstsq(design, p_mono, rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])
