"""Environment probing, the backend choice, and `mar-rt doctor`."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest

from mar_rt.errors import BackendUnavailableError
from mar_rt.runtime.environment import (
    BACKENDS,
    EnvInfo,
    GpuInfo,
    backend_and_device,
    pick_backend,
    probe_environment,
)

H100 = GpuInfo("NVIDIA H100", (9, 0), 79.0, "torch")
CPU_ONLY = EnvInfo(
    python="3.11",
    platform="linux",
    cpu_model="test cpu",
    cpu_cores=2,
    torch_version="2.5",
    onnxruntime_version="1.20",
    onnxruntime_providers=("CPUExecutionProvider",),
)
FULL_GPU = dataclasses.replace(
    CPU_ONLY,
    torch_cuda=True,
    gpus=(H100,),
    cupy_version="13.3",
    cupy_device="NVIDIA H100 (sm_90)",
    onnxruntime_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    tensorrt_version="10.7.0",
)


def test_auto_prefers_tensorrt_on_a_full_gpu_machine():
    name, reason = pick_backend(FULL_GPU)
    assert name == "tensorrt" and "NVIDIA H100" in reason


def test_missing_tensorrt_falls_back_to_onnxruntime_cuda_with_a_message():
    env = dataclasses.replace(FULL_GPU, tensorrt_version=None)
    name, reason = pick_backend(env, "tensorrt")
    assert name == "onnxruntime-cuda"
    assert "tensorrt is not installed" in reason and "falling back to onnxruntime-cuda" in reason


def test_tensorrt_without_a_gpu_is_not_picked():
    env = dataclasses.replace(CPU_ONLY, tensorrt_version="10.7.0")
    name, reason = pick_backend(env)
    assert name == "torch-cpu" and "none was found" in reason


def test_no_cuda_provider_falls_back_to_torch_cuda():
    env = dataclasses.replace(
        FULL_GPU, tensorrt_version=None, onnxruntime_providers=("CPUExecutionProvider",)
    )
    name, reason = pick_backend(env)
    assert name == "torch-cuda" and "no CUDAExecutionProvider" in reason


def test_cpu_choices():
    assert pick_backend(CPU_ONLY)[0] == "torch-cpu"
    assert pick_backend(CPU_ONLY, "onnxruntime")[0] == "onnxruntime-cpu"
    assert pick_backend(dataclasses.replace(CPU_ONLY, torch_version=None))[0] == "onnxruntime-cpu"
    name, reason = pick_backend(CPU_ONLY, "torch-cuda")
    assert name == "torch-cpu" and "torch sees no CUDA device" in reason


def test_bundle_without_onnx_uses_torch():
    name, reason = pick_backend(FULL_GPU, onnx_available=False)
    assert name == "torch-cuda" and "no ONNX export" in reason


def test_nothing_available_and_unknown_names_raise():
    empty = dataclasses.replace(CPU_ONLY, torch_version=None, onnxruntime_version=None)
    with pytest.raises(BackendUnavailableError, match="no backend can run.*torch is not installed"):
        pick_backend(empty)
    with pytest.raises(BackendUnavailableError, match="unknown backend 'cuda'"):
        pick_backend(CPU_ONLY, "cuda")


def test_backend_names_split_into_runtime_and_device():
    pairs = {backend_and_device(b) for b in BACKENDS}
    assert pairs == {
        ("tensorrt", "cuda"),
        ("onnxruntime", "cuda"),
        ("onnxruntime", "cpu"),
        ("torch", "cuda"),
        ("torch", "cpu"),
    }
    with pytest.raises(BackendUnavailableError, match="unknown backend 'torch-gpu'"):
        backend_and_device("torch-gpu")


def test_probe_matches_the_libraries_here():
    torch = pytest.importorskip("torch")
    env = probe_environment()
    assert env.torch_version == torch.__version__
    assert env.torch_cuda == torch.cuda.is_available()
    assert env.cpu_cores >= 1 and env.cpu_model
    try:
        import onnxruntime as ort
    except ImportError:
        assert env.onnxruntime_version is None
    else:
        assert env.onnxruntime_providers == tuple(ort.get_available_providers())
    if shutil.which("nvcc"):
        assert env.nvcc_path == shutil.which("nvcc")
        assert re.fullmatch(r"\d+\.\d+", env.nvcc_version or "")
    if not torch.cuda.is_available() and env.tensorrt_version is None:
        assert pick_backend(env)[0] in ("torch-cpu", "onnxruntime-cuda")


def test_doctor_cli_json_and_table():
    from typer.testing import CliRunner

    from mar_rt.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    expected = pick_backend(probe_environment())
    assert (report["backend"], report["reason"]) == expected
    assert {
        "torch_version",
        "gpus",
        "onnxruntime_providers",
        "tensorrt_version",
        "nvcc_path",
    } <= set(report)
    table = runner.invoke(app, ["doctor"])
    assert table.exit_code == 0
    assert re.search(rf"^backend\s+{re.escape(expected[0])}$", table.output, re.MULTILINE)
