"""`mar-rt eval` on the official SynDeepLesion training files and on a small simulated set."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mar_rt.cli import app
from mar_rt.ct import metrics
from mar_rt.ct.mar import segment_metal
from mar_rt.ct.projector import get_projector
from mar_rt.ct.simulate import simulate_metal_artifact
from mar_rt.ct.syndeeplesion import write_case
from mar_rt.runtime.demo import small_geometry
from mar_rt.runtime.evaluate import find_cases, group_key, resize_mask
from tests.runtime._runtime_bundles import SMALL, micro_bundle, micro_bundle_sdl
from tests.runtime.test_pipeline import _slice

SHAPE_KEYS = {"methods", "cases", "bundle", "backend", "steps", "seconds", "route"}


def _check_shape(result, methods):
    assert set(result) == SHAPE_KEYS
    assert result["route"] in ("sinogram", "image_only")
    assert list(result["methods"]) == list(methods)
    for m in methods:
        s = result["methods"][m]
        assert set(s) == {"psnr", "ssim", "groups"}
        for g, v in s["groups"].items():
            assert set(v) == {"psnr", "ssim", "n"} and v["n"] >= 1
            assert g == group_key(_group_lo(g))
        assert sum(v["n"] for v in s["groups"].values()) == len(result["cases"])
    for row in result["cases"]:
        assert set(row) == {"case", "metal_px", *methods}
        for m in methods:
            assert set(row[m]) == {"psnr", "ssim"}


def _group_lo(key):
    return int(key.rstrip("+").split("-")[0])


def test_group_keys_cover_the_published_sizes():
    assert group_key(2061) == "886+"
    assert group_key(35) == "0-76" and group_key(53) == "0-76"
    assert group_key(881) == group_key(451) == "339-885"
    assert group_key(112) == group_key(118) == "77-120"


def _eval_official(root, tmp_path, methods, *extra):
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(
        app,
        ["eval", str(root), "--json", str(out), "--methods", ",".join(methods), *map(str, extra)],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    _check_shape(result, methods)
    return res, result


OFFICIAL_METHODS = ["input", "li", "li_official", "nmar"]


@pytest.fixture(scope="module")
def official_measured(sdl_case_129, tmp_path_factory):
    """``mar-rt eval`` of the classic methods on the official cases (measured sinograms)."""
    root = sdl_case_129.parents[1]  # .../syndeeplesion/train
    return _eval_official(root, tmp_path_factory.mktemp("eval"), OFFICIAL_METHODS)


def test_eval_official_files(sdl_case_129, official_measured):
    root = sdl_case_129.parents[1]
    res, result = official_measured
    assert result["route"] == "sinogram" and "sinogram route" in res.output
    assert result["bundle"] is None and result["steps"] is None and result["seconds"] > 0
    names = [row["case"] for row in result["cases"]]
    assert names == ["000129_03_01/115/80", "000195_02_02/202/0"]  # 000321 has no <k>.h5
    for row in result["cases"]:
        # independent figures: the official LI_CT against the gt image, computed here
        with h5py.File(root / f"{row['case']}.h5") as f:
            li_ct, ma_ct = f["LI_CT"][()], f["ma_CT"][()]
        with h5py.File(root / row["case"].rsplit("/", 1)[0] / "gt.h5") as f:
            gt = f["image"][()]
        seg = segment_metal(torch.from_numpy(ma_ct)).numpy()
        assert row["metal_px"] == int(seg.sum())
        assert abs(int(seg.sum()) - int((ma_ct > 0.672).sum())) < 10
        assert row["li_official"]["psnr"] == pytest.approx(metrics.psnr(li_ct, gt, seg), abs=1e-9)
        assert row["li_official"]["ssim"] == pytest.approx(metrics.ssim(li_ct, gt, seg), abs=1e-9)
        # LI and NMAR remove most of the artifact (DESIGN §9: LI is about +7 dB over X_ma)
        assert row["li"]["psnr"] > row["input"]["psnr"] + 3
        assert row["nmar"]["psnr"] > row["input"]["psnr"] + 3
    mean_li_official = np.mean([row["li_official"]["psnr"] for row in result["cases"]])
    assert result["methods"]["li_official"]["psnr"] == pytest.approx(mean_li_official)
    assert "li_official" in res.output and "PSNR dB / SSIM" in res.output


@pytest.mark.slow
def test_eval_official_files_dudocrop(sdl_case_129, tmp_path_factory, tmp_path):
    """DuDoCROP (micro untrained bundle, 1 step) at the full SynDeepLesion size."""
    bundle = micro_bundle_sdl(tmp_path_factory)
    methods = ["li_official", "dudocrop"]
    _, result = _eval_official(
        sdl_case_129.parents[1], tmp_path, methods, "--bundle", bundle, "--steps", 1,
        "--backend", "torch", "--device", "cpu",
    )  # fmt: skip
    assert (result["steps"], result["backend"], result["bundle"]) == (1, "torch", str(bundle))
    assert len(result["cases"]) == 2


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """Two simulated cases at 64² in the SynDeepLesion layout, plus testmask.npy (128², K=2)."""
    root = tmp_path_factory.mktemp("sdl-small")
    geometry = small_geometry(SMALL)
    proj = get_projector(geometry, "cpu", torch.float32)
    big = np.zeros((128, 128, 2), np.uint8)
    big[60:70, 76:84, 0] = 1  # 80 px at 128² → 20 px at 64²
    big[40:46, 30:50, 1] = 1
    image = _slice(metal=False)
    for k in range(2):
        mask = torch.from_numpy(resize_mask(big[..., k], (SMALL, SMALL)))
        sim = simulate_metal_artifact(image, mask, geometry=geometry, seed=k, projector=proj)
        write_case(root / "case_a" / f"s{k}", sim, k=k)
    np.save(root / "testmask.npy", big)
    return root


def test_eval_small_set_with_test_masks_and_ablations(small_set, tmp_path_factory, tmp_path):
    bundle = micro_bundle(tmp_path_factory)
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(
        app,
        ["eval", str(small_set), "--json", str(out), "--bundle", str(bundle),
         "--backend", "torch", "--methods", "input,li", "--ablations"],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    methods = ["input", "li", "dudocrop", "sde_only", "dapg_only"]
    _check_shape(result, methods)
    assert result["steps"] == 2  # the bundle's default
    assert result["route"] == "sinogram"
    assert [c.name for c in find_cases(small_set)] == ["case_a/s0/0", "case_a/s1/1"]
    for k, row in enumerate(result["cases"]):
        want = resize_mask(np.load(small_set / "testmask.npy")[..., k], (SMALL, SMALL)).sum()
        assert row["metal_px"] == int(want)
    # the three network variants differ from each other (different switches)
    a, b, c = (result["cases"][0][m]["psnr"] for m in ("dudocrop", "sde_only", "dapg_only"))
    assert len({a, b, c}) == 3


def test_find_cases_through_a_link_to_a_case_folder(small_set, tmp_path):
    """A validation set made of links to case folders lists the same cases as the folders."""
    (tmp_path / "linked").symlink_to(small_set / "case_a", target_is_directory=True)
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["linked/s0/0", "linked/s1/1"]
    assert [c.case_path.read_bytes() for c in cases] == [
        c.case_path.read_bytes() for c in find_cases(small_set)
    ]


def test_eval_takes_the_case_files_own_mask(small_set, tmp_path_factory, tmp_path):
    """Without testmask.npy, cases that carry their mask (ours) are scored on that mask, not
    on a segmentation of ma_CT."""
    import shutil

    from mar_rt.ct.syndeeplesion import read_case

    root = tmp_path / "set"
    shutil.copytree(small_set / "case_a", root / "case_a")
    for case in find_cases(root):  # a mask segmentation could never give: one more row
        with h5py.File(case.case_path, "r+") as f:
            m = f["mask"][()]
            del f["mask"]
            f["mask"] = np.maximum(m, np.roll(m, 1, axis=0))
    out = tmp_path / "eval.json"
    bundle = micro_bundle(tmp_path_factory)  # its 64² geometry
    args = ["eval", str(root), "--json", str(out), "--bundle", str(bundle), "--backend", "torch",
            "--methods", "input,dudocrop"]  # fmt: skip
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for case, row in zip(find_cases(root), json.loads(out.read_text())["cases"], strict=True):
        data = read_case(case.case_path)
        assert row["metal_px"] == int((data["mask"] > 0.5).sum())
        assert row["metal_px"] > int(segment_metal(torch.from_numpy(data["ma_CT"]), 0.672).sum())


def test_eval_refuses_bad_requests(small_set, tmp_path):
    res = CliRunner().invoke(app, ["eval", str(tmp_path), "--methods", "input"])
    assert res.exit_code == 1 and "no SynDeepLesion cases" in res.output
    res = CliRunner().invoke(app, ["eval", str(small_set), "--methods", "input,bogus"])
    assert res.exit_code == 1 and "unknown method" in res.output
    res = CliRunner().invoke(
        app, ["eval", str(small_set), "--methods", "dudocrop", "--bundle", str(tmp_path / "x")]
    )
    assert res.exit_code == 2 and "does not exist" in res.output


# --- the image-only route (DESIGN §8): every method from ma_CT alone ---------------------------
def test_eval_image_only_official_files(sdl_case_129, official_measured, tmp_path):
    """On the official cases, image-only LI is LI of the reprojected ma_CT across the segmented
    trace (computed here from the operators); the references stay the same in both routes."""
    from mar_rt.ct.fbp import fbp
    from mar_rt.ct.geometry import FanBeamGeometry
    from mar_rt.ct.mar import li_inpaint
    from mar_rt.ct.projector import forward_project

    root = sdl_case_129.parents[1]
    res, image_only = _eval_official(root, tmp_path, OFFICIAL_METHODS, "--image-only")
    _, measured = official_measured
    assert image_only["route"] == "image_only" and "image-only route" in res.output
    g = FanBeamGeometry.syndeeplesion()
    for row, ref in zip(image_only["cases"], measured["cases"], strict=True):
        assert row["case"] == ref["case"] and row["metal_px"] == ref["metal_px"]
        for m in ("input", "li_official"):
            assert row[m] == ref[m]  # the same image scored the same way
        with h5py.File(root / f"{row['case']}.h5") as f:
            ma_ct = torch.from_numpy(f["ma_CT"][()])
        with h5py.File(root / row["case"].rsplit("/", 1)[0] / "gt.h5") as f:
            gt = f["image"][()]
        seg = segment_metal(ma_ct)
        y = forward_project(ma_ct, g)
        trace = forward_project(seg.float(), g) > 0
        li = fbp(li_inpaint(y, trace), g)
        assert row["li"]["psnr"] == pytest.approx(metrics.psnr(li, gt, seg), abs=1e-4)
        # DESIGN §8: the reprojection's streaks spread beyond the trace, so both classic methods
        # lose against their measured-sinogram selves, yet still beat the input
        for m in ("li", "nmar"):
            assert row["input"]["psnr"] + 1 < row[m]["psnr"] < ref[m]["psnr"]


def test_eval_image_only_with_a_bundle(small_set, tmp_path_factory, tmp_path):
    """The network methods run from ma_CT alone (synthetic sinogram in their QA records) and
    differ from the measured-sinogram route; scores keep the test masks."""
    from mar_rt.runtime.evaluate import evaluate

    bundle = micro_bundle(tmp_path_factory)
    methods = ["input", "li", "nmar", "dudocrop", "sde_only", "dapg_only"]
    kw = dict(methods=methods, bundle=bundle, backend="torch", device="cpu", steps=1)
    image_only = evaluate(small_set, image_only=True, **kw)
    measured = evaluate(small_set, **kw)
    _check_shape(image_only, methods)
    assert (image_only["route"], measured["route"]) == ("image_only", "sinogram")
    for row, ref in zip(image_only["cases"], measured["cases"], strict=True):
        assert row["metal_px"] == ref["metal_px"]
        assert row["input"] == ref["input"]
        for m in ("li", "nmar", "dudocrop", "sde_only", "dapg_only"):
            assert row[m]["psnr"] != ref[m]["psnr"], m
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(
        app,
        ["eval", str(small_set), "--json", str(out), "--bundle", str(bundle), "--backend",
         "torch", "--methods", "input,dudocrop", "--steps", "1", "--image-only"],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["route"] == "image_only"
