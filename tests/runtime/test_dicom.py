"""DICOM reading and derived-series writing, on pydicom's CT_small.dcm (128×128, HU)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.datadict import keyword_for_tag  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from mar_rt.errors import BadInputError, MarRtError  # noqa: E402
from mar_rt.runtime.io import dicom as dicom_io  # noqa: E402
from mar_rt.runtime.io import read_dicom, write_dicom_series  # noqa: E402

SLICE_GAP_MM = 5.0
# file name of the slice at position k: sorted file order is not position order
NAMES = ("c.dcm", "a.dcm", "d.dcm", "b.dcm")


def _ct_small():
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _expected_mu(hu: np.ndarray) -> np.ndarray:
    """DESIGN §3, written out: clip HU at −1000, μ = (HU/1000 + 1)·0.192."""
    return (np.maximum(hu, -1000.0) / 1000.0 + 1.0) * 0.192


def _save(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _make_series(folder: Path, n: int = 4) -> list[np.ndarray]:
    """Write n slices of CT_small at z0 + 5k with stored values + 10k; return their HU."""
    folder.mkdir(parents=True, exist_ok=True)
    base = _ct_small()
    series_uid = generate_uid()
    hus = []
    for k in range(n):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ipp = [float(v) for v in base.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + SLICE_GAP_MM * k]
        stored = base.pixel_array.astype(np.int16) + np.int16(10 * k)
        ds.PixelData = stored.tobytes()
        hus.append(stored * float(base.RescaleSlope) + float(base.RescaleIntercept))
        _save(ds, folder / NAMES[k])
    return hus


def _hash_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- reading --------------------------------------------------------------------------------------
def test_read_ct_small_gives_mu_of_rescaled_hu():
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    study = read_dicom(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert study.images.shape == (1, 128, 128) and study.images.dtype == np.float32
    np.testing.assert_allclose(study.images[0], _expected_mu(hu), rtol=1e-6)
    assert study.pixel_spacing_mm == pytest.approx((0.661468, 0.661468))
    assert study.source_kind == "dicom" and study.source_paths == (path,)


def test_series_is_sorted_by_position_not_file_order(tmp_path):
    hus = _make_series(tmp_path / "in")
    study = read_dicom(tmp_path / "in")
    assert [p.name for p in study.source_paths] == list(NAMES)
    z0 = float(_ct_small().ImagePositionPatient[2])
    np.testing.assert_allclose(study.positions_mm, z0 + SLICE_GAP_MM * np.arange(4))
    for k in range(4):
        np.testing.assert_allclose(study.images[k], _expected_mu(hus[k]), rtol=1e-6)


def test_sorting_falls_back_to_instance_number(tmp_path):
    hus = _make_series(tmp_path / "in")
    for name in NAMES:
        ds = pydicom.dcmread(tmp_path / "in" / name)
        del ds.ImagePositionPatient
        _save(ds, tmp_path / "in" / name)
    study = read_dicom(tmp_path / "in")
    assert np.isnan(study.positions_mm).all()
    for k in range(4):
        np.testing.assert_allclose(study.images[k], _expected_mu(hus[k]), rtol=1e-6)


# --- writing --------------------------------------------------------------------------------------
def test_round_trip_derived_series(tmp_path):
    _make_series(tmp_path / "in")
    before = _hash_tree(tmp_path / "in")
    study = read_dicom(tmp_path / "in")
    rng = np.random.default_rng(0)
    out_mu = (study.images * 0.9 + rng.uniform(0, 0.01, study.images.shape)).astype(np.float32)
    qa = {"bundle": "demo", "psnr": np.float32(31.5)}
    folder = write_dicom_series(study, out_mu, tmp_path / "out", bundle_name="demo", qa=qa)

    assert _hash_tree(tmp_path / "in") == before
    assert list((tmp_path / "out").iterdir()) == [folder]  # no temporary left behind
    assert sorted(p.name for p in folder.iterdir()) == [
        "IM000001.dcm", "IM000002.dcm", "IM000003.dcm", "IM000004.dcm", "qa.json",
    ]  # fmt: skip
    qa_back = json.loads((folder / "qa.json").read_text())
    assert qa_back.pop("series_instance_uid") != ""
    assert qa_back == {"bundle": "demo", "psnr": 31.5}

    sources = [pydicom.dcmread(p) for p in study.source_paths]
    outs = [pydicom.dcmread(folder / f"IM{k + 1:06d}.dcm") for k in range(4)]
    src_series = sources[0].SeriesInstanceUID
    new_series = {d.SeriesInstanceUID for d in outs}
    assert len(new_series) == 1 and src_series not in new_series
    assert folder.name == f"MAR_{outs[0].SeriesInstanceUID}"
    assert len({d.SOPInstanceUID for d in outs}) == 4
    assert not {d.SOPInstanceUID for d in outs} & {d.SOPInstanceUID for d in sources}
    mar_keyword = keyword_for_tag(0x00189391)
    for k, (src, out) in enumerate(zip(sources, outs, strict=True)):
        for tag in ("PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient"):
            assert list(out[tag].value) == list(src[tag].value), tag
        for tag in ("SliceThickness", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
            assert out[tag].value == src[tag].value, tag
        assert list(out.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert out.SourceImageSequence[0].ReferencedSOPClassUID == src.SOPClassUID
        assert out.ReferencedSeriesSequence[0].SeriesInstanceUID == src_series
        referenced = out.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        assert {r.ReferencedSOPInstanceUID for r in referenced} == {
            d.SOPInstanceUID for d in sources
        }
        assert out.InstanceNumber == src.InstanceNumber
        assert out.SeriesNumber == src.SeriesNumber + 1000
        assert out.BurnedInAnnotation == "NO"
        assert out.SeriesDescription.startswith("MAR") and len(out.SeriesDescription) <= 64
        assert "demo" in out.DerivationDescription
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        if mar_keyword:
            assert out[mar_keyword].value == "YES"
        else:
            assert 0x00189391 not in out
        hu = out.pixel_array * float(out.RescaleSlope) + float(out.RescaleIntercept)
        expected = (out_mu[k].astype(np.float64) / 0.192 - 1.0) * 1000.0
        np.testing.assert_array_less(np.abs(hu - expected), float(out.RescaleSlope) / 2 + 1e-6)

    again = read_dicom(folder)
    np.testing.assert_allclose(again.positions_mm, study.positions_mm)
    np.testing.assert_allclose(again.images, out_mu, atol=0.192 / 1000 * 0.5 + 1e-6)


def test_write_clips_unrepresentable_hu_and_says_so(tmp_path, caplog):
    study = read_dicom(get_testdata_file("CT_small.dcm"))
    out_mu = study.images.copy()
    out_mu[0, 0, 0] = 100.0  # ≈ 519 800 HU, beyond int16 storage
    with caplog.at_level(logging.WARNING, logger="mar_rt.runtime.io.dicom"):
        folder = write_dicom_series(study, out_mu, tmp_path / "out", bundle_name="demo")
    assert "1 pixels outside the representable range" in caplog.text
    out = pydicom.dcmread(folder / "IM000001.dcm")
    assert out.pixel_array[0, 0] == np.iinfo(np.int16).max


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    _make_series(tmp_path / "in")
    study = read_dicom(tmp_path / "in")
    real = dicom_io._derive

    def failing(src, **kw):
        if kw["where"].name == "IM000003.dcm":
            raise OSError("disk full")
        return real(src, **kw)

    monkeypatch.setattr(dicom_io, "_derive", failing)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_series(study, study.images, tmp_path / "out", bundle_name="demo")
    assert list((tmp_path / "out").iterdir()) == []


def test_write_refuses_wrong_shape_and_output_inside_input(tmp_path):
    _make_series(tmp_path / "in")
    study = read_dicom(tmp_path / "in")
    with pytest.raises(MarRtError, match=r"source series is \(4, 128, 128\)"):
        write_dicom_series(study, study.images[:, :64], tmp_path / "out", bundle_name="demo")
    with pytest.raises(MarRtError, match="inside the input folder"):
        write_dicom_series(study, study.images, tmp_path / "in" / "out", bundle_name="demo")
    with pytest.raises(MarRtError, match="NaN"):
        bad = study.images.copy()
        bad[1, 2, 3] = np.nan
        write_dicom_series(study, bad, tmp_path / "out", bundle_name="demo")


# --- bad input ----------------------------------------------------------------------------------
def _bad_file(tmp_path: Path, kind: str) -> Path:
    ds = _ct_small()
    path = tmp_path / f"{kind}.dcm"
    if kind == "garbage":
        path.write_bytes(b"this is not DICOM at all" * 10)
        return path
    if kind == "mr":
        ds.Modality = "MR"
    elif kind == "nopixels":
        del ds.PixelData
    elif kind == "norescale":
        del ds.RescaleIntercept
    elif kind == "nan":
        pixels = ds.pixel_array.astype(np.float32)
        pixels[5, 7] = np.nan
        del ds.PixelData
        del ds.PixelRepresentation
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
        ds.FloatPixelData = pixels.tobytes()
    return _save(ds, path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("garbage", "not a readable DICOM file"),
        ("mr", "Modality is 'MR', not CT"),
        ("nopixels", "has no pixel data"),
        ("norescale", "CT image without RescaleIntercept; cannot convert to HU"),
        ("nan", "HU values contain 1 NaN"),
    ],
)
def test_bad_file_is_refused_with_its_name(tmp_path, kind, message):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(BadInputError, match=message) as info:
        read_dicom(path)
    assert str(path) in str(info.value)


def test_mixed_series_refused_naming_both(tmp_path):
    a, b = _ct_small(), _ct_small()
    b.SeriesInstanceUID = generate_uid()
    b.SOPInstanceUID = generate_uid()
    pa, pb = _save(a, tmp_path / "a.dcm"), _save(b, tmp_path / "b.dcm")
    with pytest.raises(BadInputError, match="mixes 2 series") as info:
        read_dicom(tmp_path)
    for text in (a.SeriesInstanceUID, b.SeriesInstanceUID, str(pa), str(pb)):
        assert text in str(info.value)
    picked = read_dicom(tmp_path, series_uid=b.SeriesInstanceUID)
    assert picked.source_paths == (pb,)


def test_slices_of_different_size_refused(tmp_path):
    _make_series(tmp_path / "in", n=2)
    ds = pydicom.dcmread(tmp_path / "in" / NAMES[1])
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:64, :64]).tobytes()
    ds.Rows = ds.Columns = 64
    _save(ds, tmp_path / "in" / NAMES[1])
    with pytest.raises(BadInputError, match="slices differ in size") as info:
        read_dicom(tmp_path / "in")
    message = str(info.value)
    assert f"{tmp_path / 'in' / NAMES[1]} is 64×64" in message
    assert f"{tmp_path / 'in' / NAMES[0]} is 128×128" in message


def test_skip_bad(tmp_path, caplog):
    hus = _make_series(tmp_path / "in")
    garbage = tmp_path / "in" / "zz_broken.dcm"
    garbage.write_bytes(b"\x00" * 300)
    (tmp_path / "in" / "notes.json").write_text("{}")  # non-DICOM suffix: passed over
    with pytest.raises(BadInputError, match=r"1 of 5 DICOM files are unusable") as info:
        read_dicom(tmp_path / "in")
    assert str(garbage) in str(info.value)
    with caplog.at_level(logging.WARNING):
        study = read_dicom(tmp_path / "in", skip_bad=True)
    assert len(study) == 4 and f"skipping {garbage}" in caplog.text
    assert [p for p, _ in study.skipped] == [garbage]
    np.testing.assert_allclose(study.images[3], _expected_mu(hus[3]), rtol=1e-6)


def test_nothing_usable_even_with_skip_bad(tmp_path):
    _bad_file(tmp_path, "mr")
    with pytest.raises(BadInputError, match="no usable file left"):
        read_dicom(tmp_path, skip_bad=True)
