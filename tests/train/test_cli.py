"""`mar-rt train` end to end on the ``smoke`` preset: toy networks, one pair, a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mar_rt.ct import metrics
from mar_rt.train.phantoms import ellipse_phantom
from mar_rt.train.sources import CleanSlice, export_sources
from mar_rt.train.split import RESERVED_VAL_ID


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    pytest.importorskip("open_clip")
    from mar_rt.cli import app

    root = tmp_path_factory.mktemp("train")
    # two clean slices from two sources (--data twice); one carries the reserved validation
    # id, so it must stay out of training
    toy = CleanSlice("toy_a", ellipse_phantom(1, region="abdomen"), "phantom", "generated")
    export_sources([toy], root / "src")
    val = CleanSlice(RESERVED_VAL_ID, ellipse_phantom(2, region="pelvis"), "phantom", "generated")
    export_sources([val], root / "src_val")
    args = ["train", "bundle", "--config", "smoke", "--data", str(root / "src"),
            "--data", str(root / "src_val"), "--out", str(root / "bundle"), "--quiet",
            "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root, result.output


def test_bundle_is_complete_and_loadable(smoke_run):
    from mar_rt.models.bundle import load_bundle
    from mar_rt.runtime.config import PipelineConfig

    root, output = smoke_run
    bundle = load_bundle(root / "bundle", verify=True)
    assert sorted(bundle.network_names) == sorted(
        ["clip_image", "clip_sinogram", "unet_image", "unet_sinogram", "unet_residual"]
    )
    for name in bundle.network_names:
        bundle.build(name)  # fp16-stored weights load into the fp32 networks
    PipelineConfig.from_dict(bundle.config["pipeline"])
    assert "bundle:" in output


def test_reserved_slice_only_validates(smoke_run):
    root, _ = smoke_run
    report = json.loads((root / "bundle" / "train_report.json").read_text())
    data = report["stages"]["data"]
    assert data["train_slices"] == ["toy_a"]
    assert data["val_slices"] == [RESERVED_VAL_ID]
    index = json.loads((root / "bundle.work" / "cache" / "train" / "pairs.json").read_text())
    assert {p["slice_id"] for p in index["pairs"]} == {"toy_a"}
    # DuDoCLIP's own set (2 masks of the training slice and its metal-free scan) and its
    # zero-shot cases (1 mask of the validation slice): it trained and was scored on those,
    # not on the U-Net pairs
    assert (data["train_pairs"], data["clip_pairs"], data["clip_val_cases"]) == (1, 3, 1)
    for domain in ("image", "sinogram"):
        zero_shot = report["stages"][f"clip_{domain}"]["zero_shot"]
        assert (zero_shot["train"]["n"], zero_shot["after"]["n"]) == (3, 1)


def test_validation_set_reads_with_eval_layout(smoke_run):
    from mar_rt.runtime.evaluate import find_cases

    root, _ = smoke_run
    val = root / "bundle.work" / "val"
    cases = find_cases(val)
    assert [c.name for c in cases] == [f"{RESERVED_VAL_ID}/0"]
    masks = np.load(val / "testmask.npy")
    assert masks.shape == (416, 416, 1) and 400 < masks.sum() < 500


def test_losses_recorded_for_every_network(smoke_run):
    root, _ = smoke_run
    report = json.loads((root / "bundle" / "train_report.json").read_text())
    assert set(report["trained"]) == {"unet_image", "unet_sinogram", "unet_residual"}
    for name in ("unet_image", "unet_sinogram", "unet_residual"):
        stage = report["stages"][name]
        assert stage["steps"] == 3 and all(np.isfinite(stage["loss_first"]))
        # validation ran through the real pipeline (every 2 steps and at the end)
        assert [v["step"] for v in stage["val"]] == [2, 3]
        assert all("psnr" in v for v in stage["val"]), stage["val"]
    assert report["stages"]["clip_image"]["zero_shot"]["after"]["n"] == 1


def test_clip_without_own_set_trains_on_the_unet_pairs(smoke_run, tmp_path):
    import dataclasses

    from mar_rt.train.presets import recipe_config
    from mar_rt.train.recipe import train_bundle
    from mar_rt.train.sources import load_clean_slices

    root, _ = smoke_run
    slices = load_clean_slices([root / "src", root / "src_val"])
    recipe = recipe_config("smoke")
    recipe = dataclasses.replace(
        recipe, clip_image=dataclasses.replace(recipe.clip_image, own_set=False)
    )
    report = train_bundle(
        slices, tmp_path / "b", recipe=recipe, work_dir=tmp_path / "w", progress=False,
        stages=("data", "clip_image", "clip_sinogram"),
    )  # fmt: skip
    image, sinogram = report["stages"]["clip_image"], report["stages"]["clip_sinogram"]
    # the image controller saw the one U-Net pair; the sinogram one DuDoCLIP's own 3 pairs
    assert (image["pairs"], image["zero_shot"]["train"]["n"]) == (1, 1)
    assert (sinogram["pairs"], sinogram["zero_shot"]["train"]["n"]) == (3, 3)
    # the image stage alone does not simulate a set it does not train on, only its PI_s cases
    report = train_bundle(
        slices, tmp_path / "b2", recipe=recipe, work_dir=tmp_path / "w2", progress=False,
        stages=("clip_image",),
    )  # fmt: skip
    assert "clip_pairs" not in report["stages"]["data"]
    assert report["stages"]["data"]["clip_val_cases"] == 1
    assert not (tmp_path / "w2" / "cache" / "clip_train.pt").exists()
    assert report["stages"]["clip_image"]["pairs"] == 1


def _fine_tune_args(root, out: str, work: str, init: str) -> list[str]:
    """`mar-rt train sde --domain image` (smoke) from bundle ``root/init`` into ``root/out``."""
    return ["train", "sde", "--domain", "image", "--config", "smoke", "--data", str(root / "src"),
            "--data", str(root / "src_val"), "--out", str(root / out), "--work", str(root / work),
            "--init-from", str(root / init), "--quiet", "--threads", "1"]  # fmt: skip


def test_init_from_starts_the_unets_at_the_bundle_weights(smoke_run):
    import torch

    from mar_rt.cli import app
    from mar_rt.models.bundle import load_bundle, save_bundle

    root, _ = smoke_run
    trained = load_bundle(root / "bundle")
    # a start bundle whose image U-Net is visibly not the one the smoke run would give
    nets = {n: trained.build(n) for n in trained.network_names}
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in nets["unet_image"].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    keys = ("sde", "geometry", "normalisation", "pipeline", "prompt_version")
    save_bundle(root / "start", {k: trained.config[k] for k in keys}, nets)
    args = _fine_tune_args(root, "tuned", "bundle.work", "start")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    start, tuned = load_bundle(root / "start"), load_bundle(root / "tuned")
    report = json.loads((root / "tuned" / "train_report.json").read_text())
    assert (
        report["init_from"]["sha256"]["unet_image"]
        == (start.config["networks"]["unet_image"]["sha256"])
    )
    assert report["stages"]["unet_image"]["steps"] == 3

    def weights(bundle):
        return {k: v.float() for k, v in bundle.state_dict("unet_image").items()}

    def distance(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    before, after, smoke = weights(start), weights(tuned), weights(trained)
    moved = distance(after, before)
    assert 0 < moved < 0.01  # three AdamW steps (lr 2e-4) plus fp16 storage rounding
    assert distance(after, smoke) > 0.1  # not the identity-initialised run of the fixture


def test_init_from_refuses_a_bundle_of_another_config(smoke_run):
    from mar_rt.cli import app

    root, _ = smoke_run
    args = ["train", "sde", "--domain", "image", "--config", "tiny", "--data", str(root / "src"),
            "--data", str(root / "src_val"), "--out", str(root / "other"),
            "--init-from", str(root / "bundle")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "bundle.json" in result.output and "differs from the recipe" in result.output
    assert not (root / "other").exists()


def test_init_from_a_bundle_of_another_sde_only_starts_the_unets(smoke_run):
    """The same networks under another SDE (T = 1 against smoke's T = 2): the image U-Net
    starts at those weights, but the U-Nets not retrained are not trained under this SDE, so
    their loops are off in the written bundle."""
    from mar_rt.cli import app
    from mar_rt.models.bundle import load_bundle, save_bundle

    root, _ = smoke_run
    trained = load_bundle(root / "bundle")
    assert trained.config["sde"]["T"] == 2
    config = {k: trained.config[k] for k in ("geometry", "normalisation", "pipeline")}
    config |= {"prompt_version": trained.config["prompt_version"]}
    config["sde"] = dict(trained.config["sde"], T=1)
    save_bundle(root / "t1", config, {n: trained.build(n) for n in trained.network_names})
    result = CliRunner().invoke(app, _fine_tune_args(root, "from_t1", "from_t1.work", "t1"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    tuned = load_bundle(root / "from_t1")
    assert tuned.config["sde"]["T"] == 2
    report = json.loads((root / "from_t1" / "train_report.json").read_text())
    assert report["init_from"]["same_sde"] is False
    assert report["trained"] == ["unet_image"]
    pipe = tuned.config["pipeline"]
    assert pipe["run_image_sde"]
    assert not (pipe["run_sinogram_sde"] or pipe["run_osro"])
    a, b = trained.state_dict("unet_image"), tuned.state_dict("unet_image")
    moved = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert 0 < moved < 0.01  # three steps from the T = 1 weights, not a fresh start


def test_init_from_in_a_fresh_work_folder_takes_the_bundle_clip(smoke_run):
    """No CLIP checkpoint and no CLIP stage: the init bundle's DuDoCLIP networks serve, and the
    fine-tuned bundle carries them unchanged; its U-Nets not retrained keep their loops on."""
    import torch

    from mar_rt.cli import app
    from mar_rt.models.bundle import load_bundle

    root, _ = smoke_run
    args = _fine_tune_args(root, "fresh", "fresh.work", "bundle")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert not (root / "fresh.work" / "ckpt" / "clip_image.pt").exists()
    start, tuned = load_bundle(root / "bundle"), load_bundle(root / "fresh")
    for name in ("clip_image", "clip_sinogram"):
        a, b = start.state_dict(name), tuned.state_dict(name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the U-Nets not retrained are the init bundle's trained ones: their loops stay on
    pipe = tuned.config["pipeline"]
    assert pipe["run_sinogram_sde"] and pipe["run_osro"] and pipe["osro_residual"]
    report = json.loads((root / "fresh" / "train_report.json").read_text())
    assert report["trained"] == ["unet_image", "unet_residual", "unet_sinogram"]


def test_residual_trains_on_the_route_that_runs_it(smoke_run, monkeypatch):
    """A recipe whose residual loop runs on the image-only route only: the residual U-Net's
    data come from that route (the runtime pipeline on ma_CT alone) and its target is the
    route's scanner image; a bundle cut short never runs an untrained loop on any route."""
    import dataclasses

    import torch

    from mar_rt.models.bundle import load_bundle
    from mar_rt.runtime.pipeline import DuDoCROPPipeline
    from mar_rt.train import recipe as recipe_mod
    from mar_rt.train.presets import recipe_config
    from mar_rt.train.sources import load_clean_slices

    root, _ = smoke_run
    smoke = recipe_config("smoke")
    recipe = dataclasses.replace(
        smoke,
        data=dataclasses.replace(smoke.data, image_target="scanner", image_inputs="both"),
        pipeline=smoke.pipeline.replace(osro_residual=False, image_only={"osro_residual": True}),
    )
    assert recipe_mod.residual_routes(recipe) == ("image_only",)
    measured_only = dataclasses.replace(
        recipe, data=dataclasses.replace(recipe.data, image_inputs="measured")
    )
    assert recipe_mod.residual_routes(measured_only) == ("sinogram",)

    # nothing trained: no route of the shipped config runs a loop
    cut = recipe_mod.stage_pipeline(recipe.pipeline, set())
    for route in ("sinogram", "image_only"):
        on = cut.for_route(route)
        assert not (on.run_image_sde or on.run_sinogram_sde or on.run_osro or on.osro_residual)

    seen = {}
    real_run, real_domain = recipe_mod.run_pipeline, recipe_mod.residual_domain

    def spy_run(bundle, pairs, config, **kw):
        out = real_run(bundle, pairs, config, **kw)
        route = kw.get("route", "sinogram")  # run_pipeline's default
        if config.for_route(route).osro_residual:  # the residual U-Net's validation
            seen.setdefault("val", []).append((route, pairs, out[0]))
        elif kw.get("intermediates") and "residual" in out[1]:
            seen.setdefault("calls", []).append((route, pairs, config, bundle))
        return out

    def spy_domain(image, x_p_prime, residual, mask, *args, **kw):
        seen["domain"] = (image, x_p_prime, residual)
        return real_domain(image, x_p_prime, residual, mask, *args, **kw)

    monkeypatch.setattr(recipe_mod, "run_pipeline", spy_run)
    monkeypatch.setattr(recipe_mod, "residual_domain", spy_domain)
    report = recipe_mod.train_bundle(
        load_clean_slices([root / "src", root / "src_val"]), root / "res_io", recipe=recipe,
        work_dir=root / "res_io.work", progress=False,
        stages=("data", "residual_data", "unet_residual"), init_from=root / "bundle",
    )  # fmt: skip
    assert report["stages"]["residual_data"]["pairs"] == {"image_only": 1}
    routes = {c[0] for c in seen["calls"]}
    assert routes == {"image_only"}
    route, pairs, config, bundle = seen["calls"][0]
    assert not config.osro_residual

    # the same X'_p from the runtime's own image-only entry: ma_CT alone, no sinogram
    with DuDoCROPPipeline.from_bundle(bundle, device="cpu", config=config) as pipe:
        res = pipe(pairs.fields["ma_CT"], mask=pairs.fields["mask"], seed=recipe.data.seed,
                   steps=recipe.residual_loop_steps, return_intermediates=True)  # fmt: skip
    assert res.qa.route == "image_only"
    image, x_p_prime, residual = seen["domain"]
    torch.testing.assert_close(x_p_prime, res.intermediates["x_p_prime"])
    torch.testing.assert_close(residual, res.intermediates["residual"])
    # the target is the route's own scanner image (the pair's kernel), not the clean slice
    assert "scanner_CT_own" in pairs.fields
    torch.testing.assert_close(image, pairs.fields["scanner_CT_own"])
    assert not torch.equal(image, pairs.fields["image"])
    assert load_bundle(root / "res_io").config["pipeline"]["image_only"]["osro_residual"]

    # its validation runs that route too and is scored against the cases' own scans (the
    # validation set's protocol settings), not against the clean slice
    val = report["stages"]["unet_residual"]["val"][-1]
    assert (val["route"], val["target"]) == ("image_only", "scanner_CT_own")
    v_route, v_pairs, v_out = seen["val"][-1]
    assert v_route == "image_only"
    f = v_pairs.fields
    against = {
        k: float(np.mean(metrics.psnr(v_out, f[k], f["mask"]))) for k in ("scanner_CT_own", "image")
    }
    assert val["psnr"] == pytest.approx(against["scanner_CT_own"], abs=1e-6)
    assert abs(val["psnr"] - against["image"]) > 0.01
