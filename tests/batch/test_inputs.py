"""Finding series: folder scans (DICOM grouped by SeriesInstanceUID), manifests, fingerprints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mar_rt.batch.inputs import SeriesOptions, input_sha256, read_manifest, scan_inputs
from mar_rt.errors import BadInputError
from tests.batch._inputs import make_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_inputs(tmp_path_factory.mktemp("scan"))


def _uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path).SeriesInstanceUID)  # full read: independent of the scan


def test_scan_finds_six_series_and_groups_dicom_by_uid(inputs: dict[str, Path]) -> None:
    root = inputs["metal"].parents[1]
    (root / "notes.txt").write_text("not CT")
    (root / ".hidden.npy").write_bytes(b"x")
    scan = scan_inputs([root], options=SeriesOptions(units="mu"))
    by_kind: dict[str, int] = {}
    for s in scan.series:
        by_kind[s.kind] = by_kind.get(s.kind, 0) + 1
    assert by_kind == {"npy": 3, "nifti": 1, "dicom": 2}
    dicom = {s.key: s for s in scan.series if s.kind == "dicom"}
    pancreas = sorted(inputs["pancreas"].iterdir())
    metal = sorted(inputs["dicom_metal"].iterdir())
    assert dicom[f"dicom:{_uid(pancreas[0])}"].files == tuple(pancreas)
    assert dicom[f"dicom:{_uid(metal[0])}"].files == tuple(metal)
    assert scan.ignored["not a CT input (suffix)"] == 1
    assert scan.ignored["hidden file or DICOMDIR"] == 1
    assert all(s.options.units == "mu" for s in scan.series)


def test_scan_groups_a_series_across_folders(tmp_path: Path, inputs: dict[str, Path]) -> None:
    files = sorted(inputs["pancreas"].iterdir())
    for i, f in enumerate(files):
        target = tmp_path / f"part{i % 2}" / f.name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(f.read_bytes())
    scan = scan_inputs([tmp_path])
    assert len(scan.series) == 1
    assert len(scan.series[0].files) == 4


def test_scan_leaves_out_the_output_folder_and_mar_rt_series(
    tmp_path: Path, inputs: dict[str, Path]
) -> None:
    import pydicom
    from pydicom.dataset import Dataset

    src = sorted(inputs["pancreas"].iterdir())[0]
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "result.npy", np.zeros((4, 4), np.float32))
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = "1.2.3.4"
    equipment = Dataset()
    equipment.Manufacturer = "mar-rt"
    ds.ContributingEquipmentSequence = [equipment]
    ds.save_as(tmp_path / "derived.dcm")
    (tmp_path / "original.dcm").write_bytes(src.read_bytes())
    scan = scan_inputs([tmp_path], exclude=out)
    assert [s.files for s in scan.series] == [(tmp_path / "original.dcm",)]
    assert scan.ignored == {"a series mar-rt derived": 1}


def test_manifest_rows_carry_their_options(tmp_path: Path, inputs: dict[str, Path]) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "path,units,steps,seed\n"
        f"{inputs['metal']},mu,3,\n"
        f"{inputs['pancreas']},,,7\n"
        "missing.npy,hu,,\n"
    )
    rows = read_manifest(manifest, options=SeriesOptions(units="hu", steps=1))
    assert [s.kind for s in rows] == ["npy", "dicom", "unknown"]
    assert rows[0].options == SeriesOptions(units="mu", steps=3, seed=0)
    assert rows[1].options == SeriesOptions(units="hu", steps=1, seed=7)
    assert len(rows[1].files) == 4
    assert rows[2].problem is not None and "missing.npy: no such file" in rows[2].problem
    assert rows[2].files == (tmp_path / "missing.npy",)  # relative to the manifest


def test_jsonl_manifest_and_bad_rows(tmp_path: Path, inputs: dict[str, Path]) -> None:
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"path": str(inputs["nifti"]), "units": "mu", "skip_bad": 1}))
    (series,) = scan_inputs([good]).series
    assert series.kind == "nifti" and series.options.skip_bad is True
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"path": str(inputs["nifti"]), "step": 2}) + "\n")
    with pytest.raises(BadInputError, match=r"bad\.jsonl:1: unknown column\(s\) \['step'\]"):
        scan_inputs([bad])
    bad.write_text(json.dumps({"path": str(inputs["nifti"]), "units": "kelvin"}) + "\n")
    with pytest.raises(BadInputError, match="bad.jsonl:1: units must be 'hu' or 'mu'"):
        scan_inputs([bad])
    with pytest.raises(BadInputError, match="no such file or folder"):
        scan_inputs([tmp_path / "nowhere"])


def test_fingerprint_follows_files_and_options(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((8, 8), np.float32))
    (series,) = scan_inputs([path], options=SeriesOptions(units="mu")).series
    before = series.fingerprint()
    assert scan_inputs([path], options=SeriesOptions(units="mu")).series[0].fingerprint() == before
    assert scan_inputs([path], options=SeriesOptions(units="hu")).series[0].fingerprint() != before
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert series.fingerprint() != before


def test_input_sha256_is_sha256_of_name_size_and_bytes(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert input_sha256([path]) == hashlib.sha256(b"x.bin\x003\nabc").hexdigest()
