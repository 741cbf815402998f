"""TensorRT builder without TensorRT: version dispatch (10.x vs 11.x), profile shapes, the
missing-library message, and the builder's control flow against a recording stand-in for the
``tensorrt`` module (every None/False return must raise a named error)."""

from __future__ import annotations

import enum
import sys
import types

import onnx
import pytest
from onnx import TensorProto, helper

from mar_rt.errors import BackendUnavailableError
from mar_rt.export.graphs import graph_specs
from mar_rt.export.tensorrt import (
    MISSING_TENSORRT,
    EngineBuildError,
    TrtBuildOptions,
    build_engine,
    build_plan,
    import_tensorrt,
    parse_version,
    profile_shapes,
    trt_engine_key,
)

SPECS = graph_specs(
    image_shape=(416, 416),
    sino_shape=(640, 641),
    embed_dims={"image": 256, "sinogram": 256},
    cond_dims={"image": 224, "sinogram": 224, "residual": 224},
)


# --------------------------------------------------------------------------- pure dispatch
def test_parse_version():
    assert parse_version("10.8.0.43") == (10, 8, 0)
    assert parse_version("11.4") == (11, 4, 0)
    with pytest.raises(ValueError, match="not a TensorRT version"):
        parse_version("ten")


def test_tensorrt_10_fp16_uses_the_fp16_flag_and_pins_norms():
    plan = build_plan("10.8.0.43", TrtBuildOptions(precision="fp16"))
    assert plan.builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert plan.network_flags == () and plan.onnx_precision == "fp32" and plan.pin_fp32_layers


def test_tensorrt_10_strongly_typed_fp16_parses_the_fp16_onnx():
    plan = build_plan("10.3.0", TrtBuildOptions(precision="fp16", strongly_typed=True))
    assert plan.network_flags == ("STRONGLY_TYPED",)
    assert "FP16" not in plan.builder_flags and plan.onnx_precision == "fp16"
    assert not plan.pin_fp32_layers


def test_tensorrt_11_has_no_precision_flags():
    for precision in ("fp16", "fp32"):
        plan = build_plan("11.4.0.106", TrtBuildOptions(precision=precision))
        assert plan.network_flags == ()  # STRONGLY_TYPED is implied (and deprecated) in 11
        assert not {"FP16", "OBEY_PRECISION_CONSTRAINTS"} & set(plan.builder_flags)
        assert plan.onnx_precision == precision and not plan.pin_fp32_layers
    # strongly_typed is what 11.x always does: same plan
    assert build_plan("11.0.0", TrtBuildOptions(strongly_typed=True)) == build_plan(
        "11.0.0", TrtBuildOptions()
    )


def test_fp32_clears_tf32_unless_asked_and_optional_flags():
    assert build_plan("10.8.0", TrtBuildOptions(precision="fp32")).cleared_flags == ("TF32",)
    assert build_plan("11.1.0", TrtBuildOptions(precision="fp32", tf32=True)).cleared_flags == ()
    plan = build_plan("11.1.0", TrtBuildOptions(version_compatible=True, refit=True))
    assert plan.builder_flags == ("VERSION_COMPATIBLE", "REFIT")


def test_unsupported_and_future_versions():
    with pytest.raises(BackendUnavailableError, match="TensorRT 8.6.1 is too old"):
        build_plan("8.6.1", TrtBuildOptions())
    plan = build_plan("12.0.1", TrtBuildOptions())
    assert plan.onnx_precision == "fp16" and plan.notes


def test_profile_shapes_fix_everything_but_the_batch():
    shapes = profile_shapes(SPECS["unet_sinogram_step"], (1, 2, 4))
    assert shapes["x_t"] == ((1, 1, 640, 641), (2, 1, 640, 641), (4, 1, 640, 641))
    assert shapes["t"] == ((1,), (2,), (4,))
    assert shapes["cond"] == ((1, 224), (2, 224), (4, 224))
    assert profile_shapes(SPECS["clip_image"], (1, 1, 1))["image"][1] == (1, 1, 416, 416)


def test_engine_key_records_which_onnx_the_build_parses():
    gpu = ("NVIDIA H100", "9.0")
    onnx = {"clip_image": "a" * 64}
    k10 = trt_engine_key(trt_version="10.8.0", gpu=gpu, options=TrtBuildOptions(), onnx_sha256=onnx)
    k11 = trt_engine_key(trt_version="11.4.0", gpu=gpu, options=TrtBuildOptions(), onnx_sha256=onnx)
    assert (k10.options["onnx"], k11.options["onnx"]) == ("fp32", "fp16")
    assert k10.dirname() != k11.dirname()


def test_options_validation():
    with pytest.raises(ValueError, match="precision"):
        TrtBuildOptions(precision="int8")
    with pytest.raises(ValueError, match="batch"):
        TrtBuildOptions(batch=(2, 1, 4))


# --------------------------------------------------------------------------- missing library
def test_missing_tensorrt_gives_one_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    with pytest.raises(BackendUnavailableError) as err:
        import_tensorrt()
    assert str(err.value).startswith(MISSING_TENSORRT)
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        build_engine(b"", "x.onnx", "x.plan", SPECS["clip_image"], TrtBuildOptions())


def test_tensorrt_backend_without_tensorrt(monkeypatch, tmp_path):
    from mar_rt.runtime.backends.tensorrt_backend import TensorRTBackend

    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        TensorRTBackend(SPECS["clip_image"], tmp_path, tmp_path, device="cpu")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    backend = TensorRTBackend(SPECS["clip_image"], tmp_path, tmp_path, device="cuda")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        backend.activate()


# --------------------------------------------------------------------------- builder control flow
def _onnx_bytes(spec) -> bytes:
    """A one-node ONNX model with the spec's IO names (what the fake parser reads)."""
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, list(t.shape))
        for n, t in spec.inputs.items()
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, list(t.shape))
        for n, t in spec.outputs.items()
    ]
    nodes = [
        helper.make_node("Identity", [next(iter(spec.inputs))], [name]) for name in spec.outputs
    ]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph).SerializeToString()


def _fake_tensorrt(version: str, fail: str = "") -> types.ModuleType:
    """A stand-in for ``tensorrt`` that records what the builder asks for; ``fail`` names the
    call that returns None / False."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = {"flags": [], "cleared": [], "profiles": {}, "pinned": 0}
    trt.float32 = "float32"
    trt.BuilderFlag = enum.IntEnum(
        "BuilderFlag", "FP16 TF32 OBEY_PRECISION_CONSTRAINTS VERSION_COMPATIBLE REFIT"
    )
    trt.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0}
    )
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", "WORKSPACE")
    trt.LayerType = enum.IntEnum("LayerType", "CONVOLUTION NORMALIZATION SOFTMAX")

    class ILogger:
        """Base class of the builder's logger; the fake needs no state."""

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Layer:
        def __init__(self, kind):
            self.type = kind
            self.num_outputs = 1
            self.precision = None

        def set_output_type(self, i, dtype):
            trt.calls["pinned"] += 1

    class Network:
        def __init__(self, flags):
            trt.calls["network_flags"] = flags
            self.inputs, self.outputs = [], []
            self.layers = [Layer(t) for t in trt.LayerType]

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))
        num_layers = property(lambda self: len(self.layers))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

        def get_layer(self, i):
            return self.layers[i]

    class Parser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0 if fail != "parse" else 1

        def parse(self, data, path):
            if fail == "parse":
                return False
            model = onnx.load_from_string(data)
            self.network.inputs = [Tensor(i.name) for i in model.graph.input]
            self.network.outputs = [Tensor(o.name) for o in model.graph.output]
            return True

        def get_error(self, i):
            return types.SimpleNamespace(
                desc=lambda: "Unsupported operator FancyOp",
                node_name=lambda: "node_fancy",
                node_operator=lambda: "FancyOp",
            )

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            trt.calls["profiles"][name] = (lo, opt, hi)

    class TimingCache:
        def serialize(self):
            return b"timing-cache-v2"

    class Config:
        builder_optimization_level = 3

        def set_memory_pool_limit(self, pool, size):
            trt.calls["workspace"] = size

        def set_flag(self, flag):
            trt.calls["flags"].append(flag.name)

        def clear_flag(self, flag):
            trt.calls["cleared"].append(flag.name)

        def add_optimization_profile(self, profile):
            return -1 if fail == "profile" else 0

        def create_timing_cache(self, blob):
            trt.calls["timing_in"] = blob
            return TimingCache()

        def set_timing_cache(self, cache, ignore_mismatch):
            return fail != "timing"

        def get_timing_cache(self):
            return TimingCache()

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if fail == "build":
                self.logger.log(types.SimpleNamespace(name="ERROR"), "out of workspace")
                return None
            return b"serialized-engine"

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            return None if fail == "deserialize" else object()

    trt.ILogger, trt.Builder, trt.OnnxParser, trt.Runtime = ILogger, Builder, Parser, Runtime
    return trt


@pytest.mark.parametrize(
    ("version", "precision", "flags", "cleared", "pinned", "network_flags"),
    [
        ("10.8.0.43", "fp16", ["FP16", "OBEY_PRECISION_CONSTRAINTS"], [], 2, 0),
        ("10.8.0.43", "fp32", [], ["TF32"], 0, 0),
        ("11.4.0.106", "fp16", [], [], 0, 0),
    ],
)
def test_builder_sets_what_the_plan_says(
    monkeypatch, tmp_path, version, precision, flags, cleared, pinned, network_flags
):
    trt = _fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    spec = SPECS["unet_image_step"]
    timing = tmp_path / "timing" / "h100.cache"
    options = TrtBuildOptions(precision=precision, batch=(1, 2, 4), workspace_gib=2)
    result = build_engine(
        _onnx_bytes(spec),
        tmp_path / "m.onnx",
        tmp_path / "e.plan",
        spec,
        options,
        timing_cache=timing,
    )
    assert (tmp_path / "e.plan").read_bytes() == b"serialized-engine" == result["plan_bytes"]
    assert timing.read_bytes() == b"timing-cache-v2" and trt.calls["timing_in"] == b""
    assert trt.calls["flags"] == flags and trt.calls["cleared"] == cleared
    assert trt.calls["pinned"] == pinned and trt.calls["network_flags"] == network_flags
    assert trt.calls["workspace"] == 2 * 2**30
    assert trt.calls["profiles"] == profile_shapes(spec, (1, 2, 4))


@pytest.mark.parametrize(
    ("fail", "message"),
    [
        ("parse", r"unet_image_step: TensorRT's ONNX parser rejected .*node_fancy \(FancyOp\)"),
        ("profile", r"unet_image_step: the optimisation profile .* was rejected"),
        ("timing", r"unet_image_step: timing cache .* was refused"),
        ("build", r"(?s)unet_image_step: build_serialized_network failed .*out of workspace"),
        ("deserialize", r"unet_image_step: the engine just built does not deserialise"),
    ],
)
def test_every_failed_step_raises_naming_the_graph(monkeypatch, tmp_path, fail, message):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.8.0", fail))
    spec = SPECS["unet_image_step"]
    with pytest.raises(EngineBuildError, match=message):
        build_engine(
            _onnx_bytes(spec),
            tmp_path / "m.onnx",
            tmp_path / "e.plan",
            spec,
            TrtBuildOptions(),
            timing_cache=tmp_path / "t.cache",
        )
    assert not (tmp_path / "e.plan").exists()  # nothing half-written


def test_builder_refuses_onnx_with_other_io(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("11.0.0"))
    with pytest.raises(EngineBuildError, match=r"has IO \['image'\].*expected \['x_t'"):
        build_engine(
            _onnx_bytes(SPECS["clip_image"]),
            tmp_path / "m.onnx",
            tmp_path / "e.plan",
            SPECS["unet_image_step"],
            TrtBuildOptions(),
        )
