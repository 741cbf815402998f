"""`mar-rt import`: reference-layout checkpoints → bundle → `mar-rt run` (demo) → `mar-rt
build-engines --backend onnxruntime` verifies the exported graphs."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mar_rt.cli import app
from mar_rt.models.bundle import load_bundle, sha256_file
from mar_rt.runtime.demo import small_geometry
from tests.cli._reference_files import (
    DACLIP_OPTIONS,
    save_daclip_like_trainer,
    save_unet_like_irsde,
    unet_state,
)
from tests.models._irsde_reference import reference_forward


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    files = {
        "daclip": save_daclip_like_trainer(d / "daclip_micro.pt", seed=1),
        "daclip_sinogram": save_daclip_like_trainer(d / "daclip_sino.pt", seed=2),
        "unet_image": save_unet_like_irsde(d / "image_G.pth", seed=3),
        "unet_sinogram": save_unet_like_irsde(d / "sino_G.pth", seed=4),
        "unet_residual": save_unet_like_irsde(d / "res_G.pth", seed=5),
    }
    (d / "options.yml").write_text(DACLIP_OPTIONS)
    files["options"] = d / "options.yml"
    return files


@pytest.fixture(scope="module")
def small_geometry_json(tmp_path_factory):
    """64² image, 96 views × 97 bins: the fast test geometry of tests/runtime."""
    path = tmp_path_factory.mktemp("geometry") / "small.json"
    path.write_text(json.dumps(small_geometry(64).to_dict()))
    return path


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _import(sources, tmp_path, geometry):
    bundle = tmp_path / "bundle"
    flags = [f"--{k.replace('_', '-')}" for k in sources]
    args = [x for flag, path in zip(flags, sources.values(), strict=True) for x in (flag, path)]
    res = _invoke("import", *args, "--geometry", geometry, "--out", bundle)
    assert res.exit_code == 0, res.output
    assert "nf 8, ch_mult (1, 2, 4, 8), context 16" in res.output
    assert "reference PreNorm wrapping, pad to ×16" in res.output
    assert "max_sigma 10, T 100, cosine, eps 0.005" in res.output
    return bundle


def _run_demo(bundle, tmp_path):
    demo = tmp_path / "demo"
    res = _invoke("run", "--bundle", bundle, "--out", demo, "--steps", "1", "--backend", "torch")
    assert res.exit_code == 0, res.output
    metrics = json.loads((demo / "metrics.json").read_text())
    assert metrics["steps"] == 1 and "dudocrop" in metrics["methods"]


def _build_engines(bundle, tmp_path):
    res = _invoke(
        "build-engines", "--bundle", bundle, "--backend", "onnxruntime", "--device", "cpu",
        "--out", tmp_path / "engines",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "built 8" in res.output and "FAILED" not in res.output


def test_import_then_run_the_demo(sources, small_geometry_json, tmp_path):
    bundle = _import(sources, tmp_path, small_geometry_json)

    # the manifest: sources with their sha256, the SDE from the options, all stages on
    b = load_bundle(bundle, verify=True)
    record = b.config["import"]
    for name in ("clip_image", "clip_sinogram", "unet_image", "unet_sinogram", "unet_residual"):
        key = name.replace("clip_image", "daclip").replace("clip_sinogram", "daclip_sinogram")
        assert record["sources"][name]["sha256"] == sha256_file(sources[key])
    assert record["options"]["sha256"] == sha256_file(sources["options"])
    assert record["geometry"]["sha256"] == sha256_file(small_geometry_json)
    assert b.config["geometry"]["n_rows"] == 64 and b.config["pipeline"]["image_size"] == 64
    assert b.sde.max_sigma == 10 and b.sde.lam == pytest.approx(10 / 255)
    pipe = b.config["pipeline"]
    assert pipe["steps"] == 100 and pipe["mu_source"] == "ma"
    assert all(pipe[k] for k in ("run_image_sde", "run_sinogram_sde", "run_osro", "osro_residual"))

    # the bundle's U-Net computes what the reference computes
    net = b.build("unet_sinogram")
    g = torch.Generator().manual_seed(0)
    x, mu = torch.rand(1, 1, 40, 41, generator=g), torch.rand(1, 1, 40, 41, generator=g)
    c, a = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    t = torch.tensor([50.0])
    ref = reference_forward(unet_state(4), x, mu, t, a, c)
    with torch.no_grad():
        torch.testing.assert_close(net.predict(x, mu, t, c, a), ref, rtol=1e-5, atol=2e-5)

    _run_demo(bundle, tmp_path)


@pytest.mark.slow
def test_imported_bundle_builds_verified_engines(sources, small_geometry_json, tmp_path):
    """Export + ORT verification of all 8 graphs (minutes of export on one CPU thread; the
    reference-structured step graph's ORT parity is also checked fast in
    tests/models/test_unet_reference.py, and build-engines itself in tests/export)."""
    _build_engines(_import(sources, tmp_path, small_geometry_json), tmp_path)


@pytest.mark.slow
def test_import_run_and_build_engines_syndeeplesion(sources, tmp_path):
    """The same on the SynDeepLesion geometry (416², 640 × 641)."""
    bundle = _import(sources, tmp_path, "syndeeplesion")
    assert load_bundle(bundle).config["import"]["geometry"] == "syndeeplesion"
    _run_demo(bundle, tmp_path)
    _build_engines(bundle, tmp_path)


def test_missing_stages_are_switched_off(sources, tmp_path):
    bundle = tmp_path / "partial"
    res = _invoke(
        "import", "--daclip", sources["daclip"], "--unet-image", sources["unet_image"],
        "--out", bundle,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "no --daclip-sinogram" in res.output and "no --unet-residual" in res.output
    b = load_bundle(bundle)
    pipe = b.config["pipeline"]
    assert pipe["run_image_sde"] and not pipe["run_sinogram_sde"]
    assert not pipe["run_osro"] and not pipe["osro_residual"]
    assert b.sde.max_sigma == 50 and pipe["steps"] == 100  # DA-CLIP's options
    assert set(b.config["import"]["sources"]) == {"clip_image", "clip_sinogram", "unet_image"}


def test_bad_inputs_fail_clearly(sources, tmp_path):
    res = _invoke("import", "--daclip", sources["daclip"], "--out", tmp_path / "b")
    assert res.exit_code == 1 and "at least one U-Net" in res.output
    res = _invoke(
        "import", "--daclip", sources["unet_image"], "--unet-image", sources["unet_image"],
        "--out", tmp_path / "b",
    )  # fmt: skip
    assert res.exit_code == 1 and "clip.visual.conv1.weight" in res.output
    res = _invoke(
        "import", "--daclip", sources["daclip"], "--unet-image", sources["daclip"],
        "--out", tmp_path / "b",
    )  # fmt: skip
    assert res.exit_code == 1 and "daclip_micro.pt" in res.output
    assert not (tmp_path / "b").exists()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_daclip_preprocessed_clip_exports_and_the_pipeline_feeds_it_host_pixels(
    sources, small_geometry_json, tmp_path
):
    """preprocess="daclip": the CLIP graph takes S×S host pixels (export.graphs), exports to
    ONNX and matches torch there, and the pipeline's embeddings equal the CLIP's own forward
    on the domain image (which runs the PIL step itself)."""
    from mar_rt.ct import units
    from mar_rt.export.graphs import bundle_graph_specs, clip_graph
    from mar_rt.export.onnx_export import export_graph
    from mar_rt.export.verify import ort_cpu_session
    from mar_rt.models.dudoclip import daclip_pixels
    from mar_rt.runtime.pipeline import DuDoCROPPipeline

    bundle = tmp_path / "bundle"
    res = _invoke(
        "import", "--daclip", sources["daclip"], "--unet-image", sources["unet_image"],
        "--clip-preprocess", "daclip", "--geometry", small_geometry_json, "--out", bundle,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    loaded = load_bundle(bundle)
    clip = loaded.build("clip_image").eval()
    size = int(clip.cfg.image_size)
    spec = bundle_graph_specs(loaded)[clip_graph("image")]
    assert spec.inputs["image"].shape[-2:] == (size, size) and size != 64  # not the grid

    x = torch.rand(2, 64, 64) * 0.4
    pixels = daclip_pixels(units.image_to_net(x)[:, None], size)
    (onnx_path, *_) = export_graph(clip, spec, tmp_path / "clip_image.onnx")
    got = ort_cpu_session(onnx_path).run(None, {"image": pixels.numpy()})
    with torch.no_grad():
        want = clip(pixels)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w.numpy()).max() < 1e-4

    with DuDoCROPPipeline.from_bundle(bundle, backend="torch", device="cpu") as pipe:
        emb = pipe.embed(pipe.graphs, x, pipe.projector.forward(x))
        with torch.no_grad():
            own = clip(units.image_to_net(x)[:, None])
    torch.testing.assert_close(emb["image"][0], own[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(emb["image"][1], own[1], rtol=0, atol=1e-5)
