"""fp16 variants: which nodes and initializers are fp16 / fp32, IO kept float32, and the graph
running in ONNX Runtime CPU close to (but not bit-equal with) its fp32 source."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from mar_rt.export.fp16 import Fp16Policy, blocked_nodes, convert_graph_to_fp16, export_fp16
from mar_rt.export.onnx_export import read_onnx_manifest
from mar_rt.export.verify import ort_cpu_session
from tests.export._export_bundles import exported_micro_bundle


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    """A private copy of the exported micro bundle's onnx/ (this module writes into it)."""
    src = exported_micro_bundle(tmp_path_factory) / "onnx"
    dst = tmp_path_factory.mktemp("fp16") / "onnx"
    shutil.copytree(src, dst)
    return dst


def _types(model) -> dict[str, int]:
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(bare)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.output})
    return types


def _scope(node) -> str:
    return next((p.value for p in node.metadata_props if p.key.endswith("class_hierarchy")), "")


@pytest.fixture(scope="module")
def step16(onnx_dir):
    src = onnx_dir / "unet_image_step.onnx"
    dst = onnx_dir / "unet_image_step.fp16.onnx"
    report = convert_graph_to_fp16(src, dst, graph="unet_image_step")
    return src, dst, report


def test_types_of_the_fp16_step_graph(step16):
    _, dst, report = step16
    model = onnx.load(str(dst))
    types = _types(model)
    out_type = {n.name: types.get(n.output[0]) for n in model.graph.node}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "InstanceNormalization", "Softmax", "Sin", "Cos"):
            assert out_type[node.name] == TensorProto.FLOAT, (node.name, node.op_type)
        if node.op_type == "MatMul" and "LinearAttention" in _scope(node):
            assert out_type[node.name] == TensorProto.FLOAT, node.name  # attention over H·W
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    half = [n for n in convs if out_type[n.name] == TensorProto.FLOAT16]
    assert len(half) >= 0.8 * len(convs), (len(half), len(convs))  # the bulk of the compute
    assert {i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]} == {
        TensorProto.FLOAT
    }
    assert report.initializers.get("FLOAT16", 0) > report.initializers.get("FLOAT", 0)
    assert report.io_types == {
        "x_t": "FLOAT",
        "mu": "FLOAT",
        "t": "FLOAT",
        "cond": "FLOAT",
        "eps": "FLOAT",
    }
    assert report.kept["time embedding"] > 0 and report.casts > 0


def test_time_embedding_selection_is_structural(step16):
    src, _, _ = step16
    model = onnx.load(str(src))
    reasons = blocked_nodes(model, Fp16Policy(keep_module_classes=()))
    time_ops = {n.op_type for n in model.graph.node if reasons.get(n.name) == "time embedding"}
    assert {"Sin", "Cos"} <= time_ops
    assert time_ops & {"Gemm", "MatMul"}  # the time MLP / scale-shift projections
    assert "Conv" not in time_ops  # nothing that touches the image


def test_fp16_runs_in_ort_cpu_close_to_fp32(step16):
    src, dst, _ = step16
    s32, s16 = ort_cpu_session(src), ort_cpu_session(dst)
    rng = np.random.default_rng(0)
    x = rng.random((1, 1, 64, 64), dtype=np.float32)
    feed = {
        "x_t": x,
        "mu": (0.5 * x + 0.1).astype(np.float32),
        "t": np.array([50.0], np.float32),
        "cond": rng.standard_normal((1, s32.get_inputs()[3].shape[1])).astype(np.float32),
    }
    ref = s32.run(None, feed)[0]
    got = s16.run(None, feed)[0]
    err = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    assert got.dtype == np.float32
    assert 1e-5 < err <= 2e-2 * scale, (err, scale)  # computed in fp16, still close


def test_export_fp16_records_reuses_and_follows_the_source(onnx_dir):
    graphs = ["unet_image_cond", "clip_image"]
    first = export_fp16(onnx_dir, graphs)
    assert sorted(first) == sorted(graphs)
    assert all(r.max_abs_err_vs_fp32 is not None for r in first.values())
    manifest = read_onnx_manifest(onnx_dir)
    assert (
        manifest["fp16"]["clip_image"]["source_sha256"]
        == manifest["graphs"]["clip_image"]["sha256"]
    )
    assert export_fp16(onnx_dir, graphs) == {}  # current: nothing converted
    # a changed fp32 source (a re-export) is reconverted
    manifest["graphs"]["clip_image"]["sha256"] = "0" * 64
    from mar_rt.export.onnx_export import _write_manifest

    _write_manifest(onnx_dir, manifest)
    assert list(export_fp16(onnx_dir, graphs)) == ["clip_image"]
