"""The study runtime on real scanner series: exact pass-through, metal corrected and kept,
a conformant derived series (checked by dciodvfy), outputs a person can find, and nothing
half-written when the writer fails."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from mar_rt.errors import OutputWriteError  # noqa: E402
from mar_rt.runtime.bundle_access import DEMO_BUNDLE  # noqa: E402
from mar_rt.runtime.study import open_pipeline, run_study  # noqa: E402
from tests.runtime._real_dicom import PANCREAS_4, TOTALSEG, need, with_metal  # noqa: E402
from tests.runtime._runtime_bundles import micro_bundle  # noqa: E402

DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    with open_pipeline(micro_bundle(tmp_path_factory), backend="torch", device="cpu") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def demo():
    with open_pipeline(DEMO_BUNDLE, backend="torch", device="cpu") as pipe:
        yield pipe


def _source_pixels(folder: Path) -> dict[str, tuple[np.ndarray, object]]:
    """SOP Instance UID (data set's, else file meta's) → (stored pixels, dataset)."""
    out = {}
    for p in folder.iterdir():
        try:
            ds = pydicom.dcmread(p)
        except pydicom.errors.InvalidDicomError:
            continue
        uid = ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID
        out[uid] = (ds.pixel_array, ds)
    return out


def _dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def _text_values(ds) -> list[str]:
    values = []
    for elem in ds.iterall():
        if elem.VR in ("LO", "LT", "ST", "UT", "SH", "PN", "UC", "UR", "AE"):
            values.append(str(elem.value))
    return values


def _check_derived(folder: Path, source: Path, bundle_sha256: str) -> list:
    """Every header check of issue 22 on each file of ``folder``; returns the datasets."""
    sources = _source_pixels(source)
    files = sorted(folder.glob("IM*.dcm"))
    assert len(files) == len(sources)
    forbidden = [str(Path.cwd()), str(source.resolve()), str(DEMO_BUNDLE), "/tmp", "/work"]
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert len(ds.SeriesDescription) <= 64 and ds.SeriesDescription.startswith("MAR")
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in sources
        _, src = sources[ref]
        assert ds.InstanceNumber == src.InstanceNumber
        assert list(ds.ImagePositionPatient) == list(src.ImagePositionPatient)
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        equipment = ds.ContributingEquipmentSequence[-1]
        assert equipment.Manufacturer == "mar-rt"
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert bundle_sha256 in ds.DerivationDescription
        for text in _text_values(ds):
            assert not any(bad in text for bad in forbidden), text
        if DCIODVFY:
            assert _dciodvfy_errors(f) == [], f
        out.append((ds, sources[ref][0]))
    return out


@pytest.mark.parametrize("series", [PANCREAS_4, TOTALSEG], ids=["pancreas_4", "totalseg"])
def test_clean_real_series_is_written_bit_for_bit_and_conformant(micro, series, tmp_path):
    need(series)
    result = run_study(series, micro, tmp_path / "out")
    assert result.n_metal_slices == 0 and not result.has_metal
    assert result.folder.parent == tmp_path / "out"
    assert result.folder.name.startswith(("PANCREAS", "CT_Body"))
    for ds, source_pixels in _check_derived(result.folder, series, micro.bundle_sha256):
        np.testing.assert_array_equal(ds.pixel_array, source_pixels)
    qa = json.loads((result.folder / "qa.json").read_text())
    assert qa["slices_passed_through"] == qa["slices_in"] == len(result.files)
    assert (result.folder / "preview.png").read_bytes()[:4] == b"\x89PNG"
    if not DCIODVFY:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed: conformance not checked")


@pytest.mark.parametrize(
    ("pipe_name", "reinsert"), [("demo", True), ("micro", False)], ids=["demo", "micro"]
)
def test_metal_in_a_real_series_is_corrected_reinserted_and_the_rest_untouched(
    pipe_name, reinsert, request, tmp_path
):
    need(PANCREAS_4)
    pipe = request.getfixturevalue(pipe_name)
    src = tmp_path / "metal"
    masks = with_metal(PANCREAS_4, src, slices=(1, 2))
    hu_of = {}
    for p in src.glob("*.dcm"):
        ds = pydicom.dcmread(p)
        hu_of[ds.SOPInstanceUID] = (p.name, ds.pixel_array * float(ds.RescaleSlope))
    result = run_study(src, pipe, tmp_path / "out", reinsert_metal=reinsert)
    assert result.n_metal_slices == 2
    derived = _check_derived(result.folder, src, pipe.bundle_sha256)
    for ds, stored in derived:
        name, _ = hu_of[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        out = ds.pixel_array.astype(float)
        if name not in masks:
            np.testing.assert_array_equal(ds.pixel_array, stored)
            continue
        m = masks[name]
        changed = np.abs(out - stored)[~m]
        assert (changed > 5).sum() > 500  # the artifact region was corrected
        if reinsert:
            np.testing.assert_array_equal(ds.pixel_array[m], stored[m])
        else:
            assert np.median(out[m]) < np.median(stored[m]) - 1000
    qa = result.qa
    assert qa["slices_corrected"] == 2 and qa["route"] == "image_only"
    assert qa["reinsert_metal"] is reinsert


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _ct_volume_slice(), id="512-int16-hu"),
        pytest.param(lambda: _spineweb_slice(), id="256-int32-hu"),
    ],
)
def test_clean_npy_slices_come_back_unchanged_through_mar_rt_run(make, tmp_path):
    from typer.testing import CliRunner

    from mar_rt.cli import app

    hu = make()
    src = tmp_path / "clean_slice.npy"
    np.save(src, hu)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["run", str(src), "--units", "hu", "--out", str(out), "--backend", "torch"]
    )
    assert res.exit_code == 0, res.output
    assert "0 with metal" in res.output
    (folder,) = out.glob("clean_slice_*")
    back = np.load(folder / "image.npy")
    assert back.dtype == hu.dtype and back.shape == hu.shape
    np.testing.assert_array_equal(back, hu)


def _ct_volume_slice() -> np.ndarray:
    path = need(PANCREAS_4.parents[1] / "ct-volumes" / "pancreas_ct_cb001.npz")
    with np.load(path) as data:
        return data["hu"][60]


def _spineweb_slice() -> np.ndarray:
    folder = need(PANCREAS_4.parents[1] / "clean-ct" / "spineweb")
    return np.load(sorted(folder.glob("*.npy"))[0])


def test_a_failing_writer_leaves_no_half_series_and_keeps_the_volume(micro, tmp_path, monkeypatch):
    need(PANCREAS_4)
    from pydicom.dataset import Dataset

    real_save = Dataset.save_as
    calls = {"n": 0}

    def failing_save(self, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, filename, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_as", failing_save)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError) as info:
        run_study(PANCREAS_4, micro, out)
    message = str(info.value)
    assert "No space left on device" in message and "kept in" in message
    kept = Path(info.value.kept)
    assert kept.parent == out and kept.suffix == ".npy"
    assert np.load(kept).shape == (4, 512, 512)
    assert [p for p in out.iterdir() if p != kept] == []  # no series, no temporary folder


def test_mar_rt_run_on_a_real_dicom_series(tmp_path, tmp_path_factory):
    from typer.testing import CliRunner

    from mar_rt.cli import app

    need(TOTALSEG)
    bundle = micro_bundle(tmp_path_factory)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["run", str(TOTALSEG), "--bundle", str(bundle), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "20 slice(s), 0 with metal" in res.output and "20 passed through" in res.output
    (folder,) = out.iterdir()
    assert folder.name.startswith("CT_Body_3_0_") and str(folder) in res.output
    assert len(list(folder.glob("IM*.dcm"))) == 20
