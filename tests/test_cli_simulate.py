"""`mar-rt simulate`: SynDeepLesion-layout output from h5/npy/PNG/DICOM slices; bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mar_rt.cli import app
from mar_rt.cli.simulate import read_slice
from mar_rt.ct import syndeeplesion as sdl
from mar_rt.ct.masks import body_outline
from mar_rt.ct.metrics import SIZE_GROUPS
from mar_rt.ct.units import deeplesion_png_to_hu, hu_to_mu

runner = CliRunner()


def _bilinear(image: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(image.astype(np.float32))[None, None]
    big = image.shape[0] > 416
    out = torch.nn.functional.interpolate(
        t, size=(416, 416), mode="bilinear", align_corners=False, antialias=big
    )
    return out[0, 0].numpy()


def test_simulate_writes_the_official_layout(tmp_path, shared_data) -> None:
    npy = shared_data / "clean-ct" / "000372_05_01_030_gt.npy"
    gt_h5 = shared_data / "syndeeplesion" / "train" / "000321_03_01" / "011" / "gt.h5"
    bad = tmp_path / "broken.npy"
    np.save(bad, np.full((256, 256), np.nan, np.float32))
    out = tmp_path / "out"
    args = [
        "simulate", str(npy), str(bad), str(gt_h5), "--out", str(out), "--masks", "2",
        "--seed", "7", "--size-groups", "large,small", "--skip-bad",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "broken.npy" in result.output and "NaN" in result.output
    cases = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert cases == ["0000_000372_05_01_030_gt", "0001_000321_03_01_011"]
    manifest = json.loads((out / "simulate.json").read_text())
    assert len(manifest["records"]) == 4
    ranges = {g.label: (g.lo, g.hi) for g in SIZE_GROUPS}
    for case in cases:
        folder = out / case
        assert sorted(p.name for p in folder.iterdir()) == ["0.h5", "1.h5", "gt.h5"]
        gt = sdl.read_gt(folder / "gt.h5")
        body = body_outline(gt["image"])
        for k, group in enumerate(("large", "small")):
            fields = sdl.read_case(folder / f"{k}.h5")
            mask = fields["mask"] > 0
            lo, hi = ranges[group]
            assert 0.9 * max(lo, 30) <= mask.sum() <= 1.1 * min(hi, 2500)
            assert not (mask & ~body).any()
            assert fields["ma_CT"][mask].mean() > 0.672  # the metal shows up in the image
    # an h5 input keeps its image exactly; an HU .npy is converted and resampled bilinearly
    with_h5 = sdl.read_gt(out / cases[1] / "gt.h5")["image"]
    np.testing.assert_array_equal(with_h5, sdl.read_image(gt_h5))
    with_npy = sdl.read_gt(out / cases[0] / "gt.h5")["image"]
    np.testing.assert_allclose(with_npy, _bilinear(hu_to_mu(np.load(npy))), atol=1e-6)


def test_png_and_dicom_readers(shared_data) -> None:
    from PIL import Image
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    png = shared_data / "clean-ct" / "deeplesion_000001_01_01_103.png"
    with Image.open(png) as im:
        hu = deeplesion_png_to_hu(np.asarray(im).astype(np.int32))
    np.testing.assert_allclose(read_slice(png, "hu"), _bilinear(hu_to_mu(hu)), atol=1e-6)
    dcm = get_testdata_file("CT_small.dcm")
    ds = dcmread(dcm)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    from pathlib import Path

    np.testing.assert_allclose(read_slice(Path(dcm), "hu"), _bilinear(hu_to_mu(hu)), atol=1e-6)


def _bad_files(tmp_path):
    from PIL import Image
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    files = {}
    files["mr.dcm"] = get_testdata_file("MR_small.dcm")
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    del ds.RescaleSlope
    ds.save_as(tmp_path / "norescale.dcm")
    files["norescale.dcm"] = tmp_path / "norescale.dcm"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "gray.png")
    files["gray.png"] = tmp_path / "gray.png"
    np.save(tmp_path / "rect.npy", np.full((100, 200), -1000.0, np.float32))
    files["rect.npy"] = tmp_path / "rect.npy"
    np.save(tmp_path / "mu.npy", np.full((256, 256), 0.19, np.float32))
    files["mu.npy"] = tmp_path / "mu.npy"
    (tmp_path / "notes.txt").write_text("hello")
    files["notes.txt"] = tmp_path / "notes.txt"
    return files


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("mr.dcm", "Modality is 'MR', not CT"),
        ("norescale.dcm", "without RescaleSlope"),
        ("gray.png", "not a 16-bit DeepLesion slice"),
        ("rect.npy", r"shape \(100, 200\) is not supported"),
        ("mu.npy", "values look like μ"),
        ("notes.txt", "unsupported file type '.txt'"),
    ],
)
def test_bad_inputs_are_refused_by_name(tmp_path, name, message) -> None:
    from pathlib import Path

    path = Path(_bad_files(tmp_path)[name])
    with pytest.raises(ValueError, match=message) as err:
        read_slice(path, "hu")
    assert path.name in str(err.value)


def test_bad_input_stops_before_writing(tmp_path, shared_data) -> None:
    npy = shared_data / "clean-ct" / "000372_05_01_030_gt.npy"
    bad = tmp_path / "broken.npy"
    np.save(bad, np.full((256, 256), np.inf, np.float32))
    out = tmp_path / "out"
    result = runner.invoke(app, ["simulate", str(npy), str(bad), "--out", str(out)])
    assert result.exit_code == 2
    assert "broken.npy" in result.output and "nothing written" in result.output
    assert not out.exists()
    # an existing case folder is not overwritten without --overwrite
    (out / "0000_000372_05_01_030_gt").mkdir(parents=True)
    (out / "0000_000372_05_01_030_gt" / "gt.h5").write_bytes(b"old")
    result = runner.invoke(app, ["simulate", str(npy), "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    assert (out / "0000_000372_05_01_030_gt" / "gt.h5").read_bytes() == b"old"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--material", "bone"], "must be one of Ti, Fe, Cu, Au"),
        (["--size-groups", "huge"], "unknown size group 'huge'"),
        (["--kinds", "spoon"], "unknown mask kind 'spoon'"),
        (["--units", "kelvin"], "--units must be hu or mu"),
    ],
)
def test_bad_options(tmp_path, option, message) -> None:
    result = runner.invoke(app, ["simulate", "x.npy", "--out", str(tmp_path), *option])
    assert result.exit_code == 2
    assert message in result.output
