"""ONNX export: every graph of a bundle exports with the fixed IO, verifies against torch in
ONNX Runtime CPU to ≤ 1e-4 on random and real feeds, and is re-exported only when stale."""

from __future__ import annotations

import h5py
import numpy as np
import onnx
import pytest
import torch

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.export.cache import sha256_file
from mar_rt.export.graphs import (
    GRAPH_NAMES,
    bundle_graph_module,
    bundle_graph_specs,
    graph_specs,
)
from mar_rt.export.onnx_export import (
    OPSET,
    ExportError,
    ExportOptions,
    check_onnx_structure,
    export_bundle,
    export_graph,
    read_onnx_manifest,
)
from mar_rt.export.verify import (
    FP32_ATOL,
    ort_cpu_session,
    random_feed,
    real_feeds,
    verify_graph,
)
from mar_rt.models.bundle import load_bundle
from mar_rt.runtime.demo import small_geometry
from tests.export._export_bundles import (
    exported_micro_bundle,
    live_micro_bundle,
    make_live_bundle,
    retrained_copy,
)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return exported_micro_bundle(tmp_path_factory)


def _sdl_real(case) -> tuple[torch.Tensor, torch.Tensor]:
    """(ma_CT, ma_sinogram) of a SynDeepLesion case at network scale (DESIGN §3)."""
    with h5py.File(case / "80.h5") as f:
        image = np.clip(f["ma_CT"][()], 0.0, 0.5) / 0.5
        sino = np.clip(f["ma_sinogram"][()], 0.0, 4.0) / 4.0
    return (
        torch.from_numpy(image.astype(np.float32))[None, None],
        torch.from_numpy(sino.astype(np.float32))[None, None],
    )


def test_every_graph_of_a_bundle_exports_and_verifies(micro):
    manifest = read_onnx_manifest(micro / "onnx")
    assert sorted(manifest["graphs"]) == sorted(GRAPH_NAMES)
    specs = bundle_graph_specs(load_bundle(micro))
    for graph, entry in manifest["graphs"].items():
        path = micro / "onnx" / entry["file"]
        assert sha256_file(path) == entry["sha256"]
        report = entry["verify"]
        assert report["passed"], (graph, report)
        labels = {c["label"]: c for c in report["cases"]}
        assert set(labels) == {"random", "real"}
        assert labels["random"]["batch"] == 2 and labels["real"]["batch"] == 1
        for case in report["cases"]:
            for out, err in case["errors"].items():
                assert err["max_abs_err"] <= FP32_ATOL, (graph, out, err)
                assert err["max_ref"] > 0, (graph, out)  # the feed reached the output
        # structure: fixed IO, opset, static H/W, symbolic batch, single-op norms
        ops = check_onnx_structure(path, specs[graph], OPSET)
        model = onnx.load(str(path), load_external_data=False)
        assert [i.name for i in model.graph.input] == list(specs[graph].inputs)
        assert [o.name for o in model.graph.output] == list(specs[graph].outputs)
        assert "ReduceMean" not in ops, (graph, ops)  # LayerNorm/GroupNorm not decomposed
        if not graph.endswith("_cond"):
            assert ops.get("LayerNormalization", 0) > 0, (graph, ops)
            assert ops.get("Softmax", 0) > 0, (graph, ops)
        for node in model.graph.node:
            keys = {p.key for p in node.metadata_props}
            assert "pkg.torch.onnx.stack_trace" not in keys  # no build-machine paths


def test_onnx_and_torch_agree_at_other_batch_sizes(micro):
    bundle = load_bundle(micro)
    specs = bundle_graph_specs(bundle)
    for graph in ("clip_sinogram", "unet_sinogram_step"):
        session = ort_cpu_session(micro / "onnx" / f"{graph}.onnx")
        feeds = {f"B{b}": random_feed(specs[graph], b, seed=b) for b in (1, 3, 8)}
        report = verify_graph(bundle_graph_module(bundle, graph), specs[graph], session, feeds)
        assert report.passed, report.summary()


def test_second_export_reuses_and_changed_weights_reexport(micro, tmp_path):
    bundle = load_bundle(micro)
    again = export_bundle(bundle)
    assert again.exported == () and sorted(again.reused) == sorted(GRAPH_NAMES)

    # A copy of the bundle whose unet_image weights changed, carrying the old onnx/ along.
    changed = retrained_copy(
        micro, tmp_path / "changed", "unet_image", lambda net: net.final_conv.bias.add_(0.25)
    )
    old = read_onnx_manifest(changed / "onnx")["graphs"]
    result = export_bundle(load_bundle(changed), options=ExportOptions(verify=False))
    assert sorted(result.exported) == ["unet_image_cond", "unet_image_step"]
    new = read_onnx_manifest(changed / "onnx")["graphs"]
    assert new["unet_image_step"]["sha256"] != old["unet_image_step"]["sha256"]
    # the cond graph does not use final_conv: re-exported to the very same bytes
    assert new["unet_image_cond"]["sha256"] == old["unet_image_cond"]["sha256"]

    # A file modified behind the manifest's back is re-exported (and restored: export is
    # deterministic for the same weights and settings).
    path = changed / "onnx" / "unet_sinogram_cond.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    result = export_bundle(load_bundle(changed), options=ExportOptions(verify=False))
    assert result.exported == ("unet_sinogram_cond",)
    assert sha256_file(path) == old["unet_sinogram_cond"]["sha256"]


def test_structure_check_catches_an_unconsumed_input(tmp_path, tmp_path_factory):
    """Feeding the exporter one tensor for two inputs leaves one of them unconsumed; the
    structural check refuses such a file."""
    bundle = load_bundle(live_micro_bundle(tmp_path_factory))
    spec = bundle_graph_specs(bundle)["unet_image_cond"]
    module = bundle_graph_module(bundle, "unet_image_cond")
    e = torch.randn(2, spec.inputs["content_emb"].shape[1])
    path = tmp_path / "aliased.onnx"
    torch.onnx.export(
        module,
        (e, e),
        str(path),
        dynamo=True,
        input_names=list(spec.inputs),
        output_names=list(spec.outputs),
        opset_version=OPSET,
        dynamic_shapes=({0: torch.export.Dim("B", min=1, max=8)},) * 2,
        external_data=False,
        verbose=False,
    )
    with pytest.raises(ExportError, match="feed no node"):
        check_onnx_structure(path, spec, OPSET)


def test_tiny_sinogram_step_at_the_syndeeplesion_shape(tmp_path, sdl_case_129):
    """The tiny U-Net's step graph at 640 × 641 (odd width: reflect-pad to 648 inside, crop on
    exit) exports with static shapes and matches torch on the official metal-affected
    sinogram of a SynDeepLesion case."""
    from mar_rt.models.unet import ConditionalUNet, UNetConfig
    from tests.export._export_bundles import perturb_zero_init

    torch.manual_seed(0)
    net = ConditionalUNet(UNetConfig.tiny()).eval()
    perturb_zero_init(net, 1)
    specs = graph_specs(
        image_shape=(416, 416),
        sino_shape=(640, 641),
        embed_dims={"image": 256, "sinogram": 256},
        cond_dims=dict.fromkeys(("image", "sinogram", "residual"), net.cfg.cond_dim),
    )
    spec = specs["unet_sinogram_step"]
    path = tmp_path / "unet_sinogram_step.onnx"
    export_graph(net, spec, path)
    check_onnx_structure(path, spec)
    _, sino = _sdl_real(sdl_case_129)
    gen = torch.Generator().manual_seed(5)
    real = {
        "x_t": sino + 0.2 * torch.randn(sino.shape, generator=gen),
        "mu": sino,
        "t": torch.tensor([50.0]),
        "cond": torch.randn(1, net.cfg.cond_dim, generator=gen),
    }
    report = verify_graph(net, spec, ort_cpu_session(path), {"real": real})
    assert report.passed, report.summary()


def test_real_feeds_chain_through_the_networks(tmp_path_factory):
    """The real feed of a ``_cond`` graph is the CLIP output on the slice, and the step
    graph's ``cond`` is the torch ``_cond`` output (so verification sees deployed values)."""
    bundle = load_bundle(live_micro_bundle(tmp_path_factory))
    specs = bundle_graph_specs(bundle)
    shared: dict = {}

    def module(graph):
        return bundle_graph_module(bundle, graph, shared=shared).eval()

    image = torch.rand(1, 1, 64, 64)
    sino = torch.rand(1, 1, 96, 97)
    feeds = real_feeds(specs, module, image, sino)
    with torch.no_grad():
        content, artifact = module("clip_image")(image)
        cond = module("unet_residual_cond")(content, artifact)
    torch.testing.assert_close(feeds["unet_residual_cond"]["content_emb"], content)
    torch.testing.assert_close(feeds["unet_residual_step"]["cond"], cond)
    assert torch.equal(feeds["clip_sinogram"]["image"], sino)
    assert torch.equal(feeds["unet_sinogram_step"]["mu"], sino)


@pytest.mark.slow
def test_full_tiny_bundle_at_the_syndeeplesion_geometry(tmp_path, sdl_case_129):
    """All eight graphs of a (perturbed) tiny bundle at 416² / 640 × 641 (~4 min on 2 cores)."""
    folder = make_live_bundle(
        tmp_path / "tiny", config="tiny", geometry=FanBeamGeometry.syndeeplesion()
    )
    result = export_bundle(load_bundle(folder), real_inputs=_sdl_real(sdl_case_129))
    assert sorted(result.exported) == sorted(GRAPH_NAMES)
    for report in result.reports.values():
        assert report.passed, report.summary()


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["unet_image_step", "clip_image"])
def test_paper_networks_export(tmp_path, graph):
    """The untrained paper U-Net (49 M parameters) and ViT-B/32 DuDoCLIP export and verify
    (at a 64² grid: the ONNX graph is the same, its shapes smaller)."""
    from mar_rt.models.dudoclip import DuDoCLIP, DuDoCLIPConfig
    from mar_rt.models.unet import ConditionalUNet, UNetConfig
    from tests.export._export_bundles import perturb_zero_init

    torch.manual_seed(0)
    net = (
        ConditionalUNet(UNetConfig.paper())
        if graph.startswith("unet")
        else DuDoCLIP(DuDoCLIPConfig.paper())
    )
    perturb_zero_init(net, 3)
    net.eval()
    geometry = small_geometry(64)
    specs = graph_specs(
        image_shape=geometry.image_shape,
        sino_shape=geometry.sino_shape,
        embed_dims={"image": 512, "sinogram": 512},
        cond_dims=dict.fromkeys(("image", "sinogram", "residual"), UNetConfig.paper().cond_dim),
    )
    from mar_rt.export.graphs import graph_module

    module = graph_module(net, graph)
    path = tmp_path / f"{graph}.onnx"
    export_graph(module, specs[graph], path)
    check_onnx_structure(path, specs[graph])
    feeds = {"random": random_feed(specs[graph], 2, seed=4)}
    report = verify_graph(module, specs[graph], ort_cpu_session(path), feeds)
    print(report.summary())
    assert report.passed, report.summary()
