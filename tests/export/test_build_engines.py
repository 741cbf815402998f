"""`mar-rt build-engines` on the ONNX Runtime backend (no TensorRT needed): cache hits decided
by sha256s, rebuilds on changed ONNX or precision, refusal of tampered and foreign sets, and
the per-user cache: nothing is written into the bundle, a read-only bundle gets its engines
built and used."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat

import pytest
from typer.testing import CliRunner

from mar_rt.cli import app
from mar_rt.export.build import build_engines, find_artifacts
from mar_rt.export.cache import (
    ENGINE_MANIFEST,
    EngineKey,
    artifacts_dir,
    cache_root,
    read_engine_set,
    write_json_atomic,
)
from mar_rt.export.graphs import GRAPH_NAMES
from mar_rt.export.onnx_export import ExportOptions, read_onnx_manifest
from tests.export._export_bundles import exported_micro_bundle, retrained_copy

NO_VERIFY = ExportOptions(verify=False)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """An empty per-user cache for each test (``$MAR_RT_CACHE``)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MAR_RT_CACHE", str(folder))
    return folder


@pytest.fixture()
def bundle(tmp_path, tmp_path_factory):
    """A private copy of the exported micro bundle (it ships its ``onnx/``)."""
    dst = tmp_path / "bundle"
    shutil.copytree(exported_micro_bundle(tmp_path_factory), dst)
    return dst


def _snapshot(folder):
    """relative path → (size, mtime_ns) of every file and folder under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def _build(folder, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("export_options", NO_VERIFY)
    return build_engines(folder, backend="onnxruntime", **kw)


def test_artefacts_go_to_the_cache_and_never_into_the_bundle(bundle, cache, monkeypatch):
    before = _snapshot(bundle)
    first = _build(bundle)
    assert _snapshot(bundle) == before
    root = artifacts_dir(bundle)
    assert cache_root() == cache and root.parent.parent == cache
    assert root.name.startswith("bundle-") and len(root.name) == len("bundle-") + 16
    assert first.engine_dir.parent == root / "engines"
    assert find_artifacts(bundle) == root  # where the runtime reads them
    # the key is bundle.json's sha256: another bundle gets another folder
    other = bundle.parent / "other"
    shutil.copytree(bundle, other)
    assert artifacts_dir(other).name.startswith("other-")
    assert artifacts_dir(other).name[-16:] == root.name[-16:]  # same bytes, same key
    manifest = json.loads((other / "bundle.json").read_text())
    manifest["pipeline"]["alpha"] = 0.25
    (other / "bundle.json").write_text(json.dumps(manifest))
    assert artifacts_dir(other).name[-16:] != root.name[-16:]
    # XDG_CACHE_HOME when MAR_RT_CACHE is not set
    monkeypatch.delenv("MAR_RT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache.parent / "xdg"))
    assert cache_root() == cache.parent / "xdg" / "mar-rt"


def test_second_run_is_a_cache_hit_and_touch_is_not_a_change(bundle):
    first = _build(bundle)
    assert not first.cache_hit and sorted(first.built) == sorted(GRAPH_NAMES)
    assert first.exported == ()  # the ONNX files the bundle ships were current
    found = read_engine_set(first.engine_dir, first.key)
    assert sorted(found.graphs) == sorted(GRAPH_NAMES)
    for graph in GRAPH_NAMES:
        assert found.read_engine(graph)  # hash-checked
    for path in (artifacts_dir(bundle) / "onnx").glob("*.onnx"):
        os.utime(path, (1e9, 1e9))  # new mtimes, same bytes
    second = _build(bundle)
    assert second.cache_hit and second.engine_dir == first.engine_dir
    assert second.built == () and second.exported == ()


def test_modified_onnx_file_is_reexported_from_the_weights(bundle):
    first = _build(bundle)
    path = artifacts_dir(bundle) / "onnx" / "unet_sinogram_step.onnx"
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
    manifest = read_onnx_manifest(artifacts_dir(bundle) / "onnx")
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


def test_cli_default_bundle_missing_message(tmp_path, monkeypatch):
    monkeypatch.setattr("mar_rt.runtime.bundle_access.DEMO_BUNDLE", tmp_path / "absent")
    result = CliRunner().invoke(app, ["build-engines"])
    assert result.exit_code == 1 and "demo bundle is not installed" in result.output


def test_read_only_default_bundle_gets_engines_built_and_used(bundle, cache, monkeypatch):
    """The default bundle, read-only as an installed package is → ``mar-rt build-engines``
    without --bundle builds into $MAR_RT_CACHE (its ONNX export copied from the bundle's); the
    backends and ``resolve_backend`` then find the export and the engine set there.  The
    bundle's files are checked unchanged too, since root ignores the permission bits."""
    import torch

    from mar_rt.models.bundle import load_bundle
    from mar_rt.runtime.backends import GraphSet, resolve_backend

    monkeypatch.setattr("mar_rt.runtime.bundle_access.DEMO_BUNDLE", bundle)
    for path in [bundle, *bundle.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _snapshot(bundle)
    try:
        args = ["build-engines", "--backend", "onnxruntime", "--device", "cpu"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert str(artifacts_dir(bundle) / "engines") in result.output
        assert _snapshot(bundle) == before  # nothing written into the bundle
        assert resolve_backend("onnxruntime", device="cpu", bundle=bundle).backend == (
            "onnxruntime"
        )
        with GraphSet.from_bundle(load_bundle(bundle), "onnxruntime", threads=1) as graphs:
            for graph in GRAPH_NAMES:
                folder = graphs[graph].engine_folder
                assert folder is not None and folder.parent == artifacts_dir(bundle) / "engines"
            spec = graphs["unet_image_step"].spec
            feed = {
                name: torch.rand(tuple(1 if d == "B" else d for d in t.shape))
                for name, t in spec.inputs.items()
            }
            assert torch.isfinite(graphs["unet_image_step"].infer(feed)["eps"]).all()
    finally:
        for path in [bundle, *bundle.rglob("*")]:
            path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)


def test_without_an_export_only_torch_can_run(tmp_path, tmp_path_factory):
    """A bundle with no ONNX export (not in the cache, not in the bundle) rules out the ONNX
    backends, and ``resolve_backend`` says why."""
    from mar_rt.runtime.backends import resolve_backend

    bare = tmp_path / "bare"
    source = exported_micro_bundle(tmp_path_factory)
    shutil.copytree(source, bare, ignore=shutil.ignore_patterns("onnx"))
    assert find_artifacts(bare) is None
    choice = resolve_backend("onnxruntime", device="cpu", bundle=bare)
    assert choice.backend == "torch" and "no ONNX export" in choice.reason
