"""`mar-rt run` through typer's CliRunner: npy in → npy out with qa.json, the demo, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mar_rt.cli import app
from mar_rt.ct.units import mu_to_hu
from tests.runtime._runtime_bundles import SMALL, micro_bundle
from tests.runtime.test_pipeline import _slice


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return micro_bundle(tmp_path_factory)


def _invoke(*args):
    return CliRunner().invoke(app, ["run", *map(str, args)], catch_exceptions=False)


def test_run_npy_in_npy_out(bundle, tmp_path):
    hu = mu_to_hu(torch.stack([_slice(), _slice(metal=False)])).numpy().astype(np.float32)
    hu[1, 0, :4] = -1024.0  # below the −1000 HU clip of HU → μ: must come back as is
    src = tmp_path / "in.npy"
    np.save(src, hu)
    out = tmp_path / "out"
    res = _invoke(
        src, "--units", "hu", "--bundle", bundle, "--steps", "1", "--out", out,
        "--backend", "tensorrt",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "backend: torch on" in res.output
    if not torch.cuda.is_available():
        assert "tensorrt: " in res.output and "falling back" in res.output
    for stage in ("prepare", "image_sde", "sinogram_sde", "osro", "total"):
        assert stage in res.output
    (folder,) = out.glob("in_*")
    result = np.load(folder / "image.npy")
    assert result.shape == (2, SMALL, SMALL) and result.dtype == hu.dtype
    # slice 1 has no metal: the input values, bit for bit
    np.testing.assert_array_equal(result[1], hu[1])
    assert np.abs(result[0] - hu[0]).max() > 1.0
    qa = json.loads((folder / "qa.json").read_text())
    assert [s["passed_through"] for s in qa["slices"]] == [False, True]
    assert qa["slices"][0]["source"] == "in.npy" and qa["route"] == "image_only"
    assert set(qa["timings_s"]) >= {"clip", "image_sde", "sinogram_sde", "osro", "total"}
    assert (folder / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_without_input_runs_the_demo(bundle, tmp_path):
    out = tmp_path / "demo"
    res = _invoke("--bundle", bundle, "--steps", "2", "--out", out, "--backend", "torch")
    assert res.exit_code == 0, res.output
    png, metrics = out / "demo.png", out / "metrics.json"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = json.loads(metrics.read_text())
    assert set(rec["methods"]) == {"input", "li", "nmar", "dudocrop"}
    assert rec["steps"] == 2 and rec["metal_px"] > 0
    # LI and NMAR remove most of the simulated artifact, whatever the untrained networks do
    assert rec["methods"]["li"]["psnr"] > rec["methods"]["input"]["psnr"] + 3
    assert str(png) in res.output and str(metrics) in res.output
    assert not list(out.glob(".tmp-*"))  # atomic writes left nothing behind


def test_missing_bundle_and_bad_input_fail_clearly(bundle, tmp_path):
    res = _invoke("--bundle", tmp_path / "nope", "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert "does not exist" in res.output
    bad = _slice().numpy()
    bad[3, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    res = _invoke(
        tmp_path / "nan.npy", "--units", "mu", "--bundle", bundle, "--out", tmp_path / "o"
    )
    assert res.exit_code == 1
    assert "nan.npy" in res.output and "NaN" in res.output
    assert not (tmp_path / "o").exists()  # nothing written


def test_run_with_a_measured_sinogram(bundle, tmp_path):
    from mar_rt.ct.projector import Projector
    from mar_rt.runtime.demo import small_geometry

    x = _slice()
    src, sino = tmp_path / "x.npy", tmp_path / "sino.npy"
    np.save(src, x.numpy())
    np.save(sino, Projector(small_geometry(SMALL)).forward(x).numpy())
    out = tmp_path / "out"
    res = _invoke(src, "--units", "mu", "--sinogram", sino, "--bundle", bundle, "--out", out)
    assert res.exit_code == 0, res.output
    (folder,) = out.glob("x_*")
    qa = json.loads((folder / "qa.json").read_text())
    assert qa["route"] == "sinogram"
    assert qa["slices"][0]["pipeline"]["sinogram_synthetic"] is False
    np.save(sino, np.zeros((90, 97), np.float32))
    res = _invoke(src, "--units", "mu", "--sinogram", sino, "--bundle", bundle, "--out", out)
    assert res.exit_code == 1 and "96 views × 97 detector bins" in res.output
