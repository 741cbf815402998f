"""`mar-rt build-engines` on the ONNX Runtime backend (no TensorRT needed): cache hits decided
by sha256s, rebuilds on changed ONNX or precision, refusal of tampered and foreign sets."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
from typer.testing import CliRunner

from mar_rt.cli import app
from mar_rt.export.build import build_engines
from mar_rt.export.cache import ENGINE_MANIFEST, EngineKey, read_engine_set, write_json_atomic
from mar_rt.export.graphs import GRAPH_NAMES
from mar_rt.export.onnx_export import ExportOptions, read_onnx_manifest
from tests.export._export_bundles import exported_micro_bundle, retrained_copy

NO_VERIFY = ExportOptions(verify=False)


@pytest.fixture()
def bundle(tmp_path, tmp_path_factory):
    """A private copy of the exported micro bundle (builds write engines/ into it)."""
    dst = tmp_path / "bundle"
    shutil.copytree(exported_micro_bundle(tmp_path_factory), dst)
    return dst


def _build(folder, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("export_options", NO_VERIFY)
    return build_engines(folder, backend="onnxruntime", **kw)


def test_second_run_is_a_cache_hit_and_touch_is_not_a_change(bundle):
    first = _build(bundle)
    assert not first.cache_hit and sorted(first.built) == sorted(GRAPH_NAMES)
    assert first.exported == ()  # the ONNX files were current
    found = read_engine_set(first.engine_dir, first.key)
    assert sorted(found.graphs) == sorted(GRAPH_NAMES)
    for graph in GRAPH_NAMES:
        assert found.read_engine(graph)  # hash-checked
    for path in (bundle / "onnx").glob("*.onnx"):
        os.utime(path, (1e9, 1e9))  # new mtimes, same bytes
    second = _build(bundle)
    assert second.cache_hit and second.engine_dir == first.engine_dir
    assert second.built == () and second.exported == ()


def test_modified_onnx_file_is_reexported_from_the_weights(bundle):
    first = _build(bundle)
    path = bundle / "onnx" / "unet_sinogram_step.onnx"
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # edited behind the manifest
    second = _build(bundle)
    assert second.exported == ("unet_sinogram_step",)
    assert path.read_bytes() == original  # export is deterministic: same weights, same bytes
    assert second.cache_hit and second.engine_dir == first.engine_dir


def test_changed_weights_rebuild_only_the_changed_graphs(bundle, tmp_path):
    first = _build(bundle)
    new = retrained_copy(
        bundle,
        tmp_path / "retrained",
        "unet_residual",
        lambda net: net.final_conv.bias.add_(0.5),
    )
    second = _build(new)
    assert sorted(second.exported) == ["unet_residual_cond", "unet_residual_step"]
    assert not second.cache_hit and second.engine_dir.name != first.engine_dir.name
    assert second.built == ("unet_residual_step",)  # its ONNX is the only one that changed
    assert sorted(second.reused) == sorted(set(GRAPH_NAMES) - {"unet_residual_step"})
    diffs = second.key.differences(first.key)
    assert diffs == ["ONNX files differ for graphs ['unet_residual_step']"]


def test_changed_precision_builds_another_set(bundle):
    fp32 = _build(bundle)
    fp16 = _build(bundle, precision="fp16")
    assert not fp16.cache_hit and fp16.engine_dir != fp32.engine_dir
    assert fp16.key.precision == "fp16" and fp16.key.options["onnx"] == "fp16"
    manifest = read_onnx_manifest(bundle / "onnx")
    assert fp16.key.onnx_sha256 == {g: e["sha256"] for g, e in manifest["fp16"].items()}
    assert _build(bundle, precision="fp16").cache_hit
    assert _build(bundle).cache_hit  # the fp32 set is still there and valid


def test_tampered_engine_is_rebuilt(bundle, caplog):
    first = _build(bundle)
    engine = first.engine_dir / "clip_image.ort.onnx"
    engine.write_bytes(engine.read_bytes() + b"plugin")
    with caplog.at_level(logging.WARNING):
        second = _build(bundle)
    assert not second.cache_hit and "does not match its manifest" in caplog.text
    assert read_engine_set(second.engine_dir, second.key).read_engine("clip_image")


def test_foreign_set_under_our_name_is_refused_and_rebuilt(bundle, caplog):
    first = _build(bundle)
    manifest = json.loads((first.engine_dir / ENGINE_MANIFEST).read_text())
    foreign = EngineKey.from_dict({**manifest["key"], "device": "Some Other CPU"})
    manifest["key"], manifest["key_sha256"] = foreign.to_dict(), foreign.digest()
    write_json_atomic(first.engine_dir / ENGINE_MANIFEST, manifest)
    with caplog.at_level(logging.WARNING):
        second = _build(bundle)
    assert "device: built 'Some Other CPU'" in caplog.text
    assert not second.cache_hit and read_engine_set(second.engine_dir).key == first.key


def test_cli_build_engines_twice(bundle):
    runner = CliRunner()
    args = ["build-engines", "--bundle", str(bundle), "--backend", "onnxruntime", "--device", "cpu"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "unet_image_step" in first.output and "built 8" in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "cache hit" in second.output


def test_cli_refuses_bad_arguments(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["build-engines", "--bundle", str(tmp_path)])
    assert result.exit_code == 1 and "not a bundle folder" in result.output
    result = runner.invoke(app, ["build-engines", "--bundle", str(tmp_path), "--backend", "tvm"])
    assert result.exit_code == 1 and "--backend must be one of" in result.output


def test_cli_default_bundle_missing_message():
    from mar_rt.runtime.bundle_access import DEMO_BUNDLE

    if (DEMO_BUNDLE / "bundle.json").is_file():
        pytest.skip("the demo bundle is installed")
    result = CliRunner().invoke(app, ["build-engines"])
    assert result.exit_code == 1 and "demo bundle is not installed" in result.output
