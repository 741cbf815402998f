"""ONNX Runtime sessions, providers and engine keys, shared by ``mar-rt build-engines`` and the
ONNX Runtime backend.

For ONNX Runtime the "engine" of a graph is its ONNX file after ORT's graph optimisations
(``<graph>.ort.onnx``, written through ``SessionOptions.optimized_model_filepath``), plus, with
the TensorRT execution provider, that provider's own engine cache (``trt_ep/``).  Optimised
models at level ``all`` may hold hardware-specific fused ops, so the key names the provider,
the device (CPU model or GPU) and the ORT version.  Loading a cached optimised model skips the
optimisation at session start; it is run with graph optimisations disabled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mar_rt.errors import BackendUnavailableError
from mar_rt.export.cache import EngineKey

__all__ = [
    "CPU_EP",
    "CUDA_EP",
    "TRT_EP",
    "create_session",
    "import_onnxruntime",
    "ort_device_identity",
    "ort_engine_key",
    "ort_providers",
    "physical_cores",
]

log = logging.getLogger(__name__)

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
OPT_LEVEL = "all"


def import_onnxruntime() -> Any:
    """``import onnxruntime`` or BackendUnavailableError with one clear message."""
    try:
        import onnxruntime
    except Exception as exc:
        raise BackendUnavailableError(
            f"ONNX Runtime is not installed (python package 'onnxruntime' not importable: {exc}); "
            f"pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA / TensorRT providers)"
        ) from exc
    return onnxruntime


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        proc = cpu = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "processor":
                proc = int(value)
            elif key == "physical id":
                cpu = value
            elif key == "core id":
                core = value
            elif not line.strip() and proc is not None:
                if proc in allowed:
                    cores.add((cpu or "0", core if core is not None else str(proc)))
                proc = cpu = core = None
    except (OSError, ValueError):
        cores = set()
    return max(1, len(cores) or len(allowed))


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (else ``platform``)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def ort_providers(device: str, *, tensorrt_ep: bool = False) -> list[str]:
    """Execution providers, in priority order, for ``device`` (``cpu`` or ``cuda``)."""
    if device == "cpu":
        return [CPU_EP]
    return ([TRT_EP] if tensorrt_ep else []) + [CUDA_EP, CPU_EP]


def ort_device_identity(provider: str, device_index: int = 0) -> tuple[str, str]:
    """(device name, compute capability) for the key: the CPU model and "" on CPU."""
    if provider == CPU_EP:
        return cpu_model(), ""
    from mar_rt.export.tensorrt import cuda_device_identity

    return cuda_device_identity(device_index)


def ort_engine_key(
    *,
    ort_version: str,
    provider: str,
    device_identity: tuple[str, str],
    precision: str,
    onnx_sha256: Mapping[str, str],
    batch: tuple[int, int, int],
) -> EngineKey:
    """The engine key of an ONNX Runtime engine set (pure)."""
    return EngineKey(
        backend="onnxruntime",
        runtime_version=ort_version,
        device=device_identity[0],
        compute_capability=device_identity[1],
        provider=provider,
        precision=precision,
        batch=batch,
        onnx_sha256=onnx_sha256,
        options={"onnx": precision, "opt_level": OPT_LEVEL},
    )


def create_session(
    model: bytes | str | os.PathLike,
    providers: Sequence[str],
    *,
    precision: str = "fp32",
    threads: int | None = None,
    optimize: bool = True,
    optimized_out: str | os.PathLike | None = None,
    trt_cache_dir: str | os.PathLike | None = None,
    cuda_stream: int | None = None,
    device_index: int = 0,
    spinning: bool = False,
) -> Any:
    """An ``onnxruntime.InferenceSession`` with mar-rt's settings.

    Args:
        model: ONNX bytes (already sha256-checked) or a path (external data).
        providers: from :func:`ort_providers`; each must be available, else
            BackendUnavailableError listing what is.
        threads: intra-op threads (default: physical cores).
        optimize: ``ORT_ENABLE_ALL`` graph optimisations (off for an already optimised model).
        optimized_out: write the optimised model there (the ORT "engine").
        trt_cache_dir: the TensorRT provider's engine cache folder (``trt_ep`` of an engine set).
        cuda_stream: raw cudaStream_t the CUDA / TensorRT providers run on.
        spinning: let idle intra-op threads spin (off: the pipeline interleaves torch work).
    """
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise BackendUnavailableError(
            f"ONNX Runtime {ort.__version__} lacks the execution providers {missing} "
            f"(available: {available}); install onnxruntime-gpu for CUDA / TensorRT"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = int(threads or physical_cores())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_out is not None:
        options.optimized_model_filepath = str(optimized_out)
    provider_options: list[dict[str, Any]] = []
    for provider in providers:
        opts: dict[str, Any] = {}
        if provider in (CUDA_EP, TRT_EP):
            opts["device_id"] = int(device_index)
            if cuda_stream:
                opts["user_compute_stream"] = str(int(cuda_stream))
                if provider == CUDA_EP:
                    opts["has_user_compute_stream"] = "1"
        if provider == TRT_EP:
            opts["trt_fp16_enable"] = precision == "fp16"
            if trt_cache_dir is not None:
                Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
                opts["trt_engine_cache_enable"] = True
                opts["trt_engine_cache_path"] = str(trt_cache_dir)
                opts["trt_timing_cache_enable"] = True
                opts["trt_timing_cache_path"] = str(trt_cache_dir)
        provider_options.append(opts)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(
        source, options, providers=list(providers), provider_options=provider_options
    )
