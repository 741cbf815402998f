"""Spectrum and attenuation tables (DESIGN §5) vs the shared .mat files and published values."""

from __future__ import annotations

import numpy as np
import pytest

from mar_rt.ct import physics

MAT = {
    "water": "MiuofH2O",
    "bone": "MiuofBONE_Cortical_ICRU44",
    "Ti": "MiuofTi",
    "Fe": "MiuofFe",
    "Cu": "MiuofCu",
    "Au": "MiuofAu",
}


def test_published_checks_at_70_kev() -> None:
    assert physics.linear_attenuation("water", 70.0) == pytest.approx(0.1929, abs=1e-6)
    assert physics.linear_attenuation("Ti", 70.0) == pytest.approx(2.412, abs=1e-3)


def test_npz_matches_the_mat_tables(shared_data) -> None:
    sio = pytest.importorskip("scipy.io")
    folder = shared_data / "physics"
    spec = sio.loadmat(folder / "GE14Spectrum120KVP.mat")["GE14Spectrum120KVP"]
    energies, counts = physics.spectrum(1, 200)
    np.testing.assert_array_equal(np.stack([energies, counts], 1), spec)
    for name, var in MAT.items():
        table = sio.loadmat(folder / f"{var}.mat")[var]
        np.testing.assert_array_equal(physics.mass_attenuation_table(name), table[:, [0, 6]])


def test_interpolation_is_on_energy_not_row(shared_data) -> None:
    """Tables have different row counts: look each energy up by value in the .mat file."""
    sio = pytest.importorskip("scipy.io")
    energies = np.arange(20, 121)
    for name, var in MAT.items():
        table = sio.loadmat(shared_data / "physics" / f"{var}.mat")[var]
        rows = [int(np.flatnonzero(np.isclose(table[:, 0] * 1000, e))[0]) for e in energies]
        expected = table[rows, 6] * physics.DENSITY[name]
        np.testing.assert_allclose(physics.linear_attenuation(name, energies), expected, rtol=1e-12)


def test_log_log_interpolation_between_table_energies() -> None:
    table = physics.mass_attenuation_table("Cu")
    e1, e2 = table[60, 0] * 1000, table[61, 0] * 1000
    mid = np.sqrt(e1 * e2)  # log-log: the geometric-mean energy gets the geometric-mean value
    expected = np.sqrt(table[60, 1] * table[61, 1])
    assert physics.mass_attenuation("Cu", mid) == pytest.approx(expected, rel=1e-12)


def test_spectrum_range() -> None:
    energies, counts = physics.spectrum()
    np.testing.assert_array_equal(energies, np.arange(20, 121))
    assert (counts > 0).all()


def test_water_bhc_maps_water_back_to_monochromatic() -> None:
    energies, counts = physics.spectrum()
    w = counts / counts.sum()
    mu_e = physics.linear_attenuation("water", energies)
    t = np.array([1.0, 5.0, 10.0, 20.0, 30.0, 49.95])
    p_poly = -np.log(np.exp(-np.outer(t, mu_e)) @ w)
    # beam hardening: the effective attenuation per cm falls with thickness
    assert np.all(np.diff(p_poly / t) < 0)
    a1, a2, a3 = physics.water_bhc_coefficients()
    mono = a1 * p_poly + a2 * p_poly**2 + a3 * p_poly**3
    truth = 0.1929 * t
    np.testing.assert_allclose(mono, truth, atol=0.015)
    assert np.all(np.abs(mono - truth)[1:] < np.abs(p_poly - truth)[1:] / 5)


def test_bad_material_and_energy() -> None:
    with pytest.raises(ValueError, match="unobtainium.*unknown"):
        physics.linear_attenuation("unobtainium", 70)
    with pytest.raises(ValueError, match="outside the Au table"):
        physics.linear_attenuation("Au", 500)
    assert physics.material_name("titanium") == "Ti"
