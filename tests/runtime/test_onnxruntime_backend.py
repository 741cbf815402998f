"""The ONNX Runtime backend against the torch backend (the reference), per graph and for the
whole DuDoCROP pipeline, plus its refusals (changed ONNX, missing export, foreign engines)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from mar_rt.errors import BundleError, EngineMismatchError
from mar_rt.export.build import build_engines
from mar_rt.export.graphs import GRAPH_NAMES
from mar_rt.export.onnx_export import ExportOptions
from mar_rt.export.verify import random_feed
from mar_rt.models.bundle import load_bundle
from mar_rt.runtime.backends import GraphSet
from mar_rt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from tests.export._export_bundles import SMALL, exported_micro_bundle


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A copy of the exported micro bundle with an ONNX Runtime CPU engine set, fp32 + fp16,
    built into the bundle folder itself (``out=``), so each test can copy and edit it."""
    dst = tmp_path_factory.mktemp("ort-backend") / "bundle"
    shutil.copytree(exported_micro_bundle(tmp_path_factory), dst)
    for precision in ("fp32", "fp16"):
        build_engines(
            dst,
            backend="onnxruntime",
            precision=precision,
            device="cpu",
            out=dst,
            export_options=ExportOptions(verify=False),
        )
    return dst


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    """An empty per-user cache: the backends read what the bundle folder holds."""
    monkeypatch.setenv("MAR_RT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("batch", [1, 2])
def test_every_graph_matches_torch(built, batch):
    bundle = load_bundle(built)
    ort_set = GraphSet.from_bundle(bundle, "onnxruntime", threads=1)
    ref_set = GraphSet.from_bundle(bundle, "torch")
    with ort_set, ref_set:
        for graph in GRAPH_NAMES:
            backend = ort_set[graph]
            assert backend.engine_folder is not None  # the optimised model from the set
            feed = random_feed(backend.spec, batch, seed=batch)
            got = backend.infer(feed, copy_outputs=True)
            ref = ref_set[graph].infer(feed, copy_outputs=True)
            for name in ref:
                assert got[name].shape == ref[name].shape
                err = (got[name] - ref[name]).abs().max().item()
                assert err <= 1e-4, (graph, name, err)


def test_outputs_are_written_into_the_backend_buffers(built):
    backend = OnnxRuntimeBackend.from_bundle(load_bundle(built), "unet_image_step", threads=1)
    with backend:
        a = backend.infer(random_feed(backend.spec, 1, seed=1))["eps"]
        a_copy = a.clone()
        b = backend.infer(random_feed(backend.spec, 1, seed=2))["eps"]
        assert b.data_ptr() == a.data_ptr()  # IO binding wrote into the same buffer
        assert not torch.equal(b, a_copy)


def test_fp16_variant_runs_close_to_fp32(built):
    bundle = load_bundle(built)
    feed = random_feed(OnnxRuntimeBackend.from_bundle(bundle, "unet_image_step").spec, 1, seed=3)
    outs = {}
    for precision in ("fp32", "fp16"):
        backend = OnnxRuntimeBackend.from_bundle(
            bundle, "unet_image_step", precision=precision, threads=1
        )
        with backend:
            assert backend.engine_folder is not None and precision in backend.engine_folder.name
            outs[precision] = backend.infer(feed, copy_outputs=True)["eps"]
    err = (outs["fp16"] - outs["fp32"]).abs().max().item()
    assert 1e-5 < err < 2e-2 * outs["fp32"].abs().max().item()


def test_changed_onnx_is_refused_at_load(built, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(built, copy)
    shutil.rmtree(copy / "engines")  # no optimised models: the ONNX itself is loaded
    path = copy / "onnx" / "clip_image.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    backend = OnnxRuntimeBackend.from_bundle(load_bundle(copy), "clip_image")
    with pytest.raises(EngineMismatchError, match=r"clip_image.onnx: sha256 .* does not match"):
        backend.activate()


def test_missing_export_names_the_command(tmp_path, tmp_path_factory):
    from tests.export._export_bundles import live_micro_bundle

    copy = tmp_path / "b"
    shutil.copytree(live_micro_bundle(tmp_path_factory), copy)
    shutil.rmtree(copy / "onnx", ignore_errors=True)
    with pytest.raises(BundleError, match="no fp32 ONNX export .* mar-rt build-engines"):
        OnnxRuntimeBackend.from_bundle(load_bundle(copy), "unet_image_step")


def test_foreign_engine_set_is_not_used(built, tmp_path, caplog):
    """An engine set built on another machine (its key names another CPU) is never loaded:
    the backend optimises the verified ONNX itself and says why."""
    import json

    from mar_rt.export.cache import ENGINE_MANIFEST, EngineKey, write_json_atomic

    copy = tmp_path / "b"
    shutil.copytree(built, copy)
    for folder in (copy / "engines").iterdir():
        manifest = json.loads((folder / ENGINE_MANIFEST).read_text())
        key = EngineKey.from_dict({**manifest["key"], "device": "Another CPU"})
        manifest["key"], manifest["key_sha256"] = key.to_dict(), key.digest()
        write_json_atomic(folder / ENGINE_MANIFEST, manifest)
    backend = OnnxRuntimeBackend.from_bundle(load_bundle(copy), "unet_image_cond")
    with caplog.at_level(logging.INFO), backend:
        assert backend.engine_folder is None
        backend.infer(random_feed(backend.spec, 1, seed=0))
    assert "device: built 'Another CPU'" in caplog.text


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) at the image network scale clip(μ, 0, 0.5)/0.5, peak 1 (DESIGN §3)."""
    x = (a.clamp(0, 0.5) / 0.5).double()
    y = (b.clamp(0, 0.5) / 0.5).double()
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def test_pipeline_on_onnxruntime_matches_torch(built):
    from mar_rt.runtime.demo import load_demo_slice
    from mar_rt.runtime.pipeline import DuDoCROPPipeline

    x = torch.from_numpy(load_demo_slice())[None, None]
    x = torch.nn.functional.interpolate(x, size=(SMALL, SMALL), mode="area")[0, 0]
    r, c = np.ogrid[:SMALL, :SMALL]
    x[torch.from_numpy((r - 35) ** 2 + (c - 40) ** 2 <= 5)] = 2.4  # a small titanium disc
    outputs = {}
    for backend in ("torch", "onnxruntime"):
        with DuDoCROPPipeline.from_bundle(built, backend=backend) as pipe:
            outputs[backend] = pipe(x, steps=2, seed=11).output
    psnr = _psnr(outputs["onnxruntime"], outputs["torch"])
    assert psnr >= 60.0, psnr
    assert not torch.equal(outputs["onnxruntime"], x)  # the pipeline did change the slice
