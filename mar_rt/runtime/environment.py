"""What this machine offers (CPU, GPU, torch, cupy, onnxruntime, tensorrt, nvcc) and which
inference backend ``auto`` picks from it.

:func:`probe_environment` imports the optional libraries lazily and never raises: a library
that is missing or fails to load is recorded as absent with the reason in ``notes``.
:func:`pick_backend` is pure: it decides from an :class:`EnvInfo`, so it is tested with
fabricated ones.

Backend names: ``tensorrt``, ``onnxruntime-cuda``, ``torch-cuda``, ``torch-cpu``,
``onnxruntime-cpu``.  ``auto`` prefers them in that order (DESIGN §12: tensorrt →
onnxruntime → torch); an explicit request falls back along its own chain with a message.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mar_rt.errors import BackendUnavailableError
from mar_rt.export.ort import cpu_model

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "onnxruntime-cuda", "torch-cuda", "torch-cpu", "onnxruntime-cpu")
# For each request, the backends to try in order (the first is what was asked for).
FALLBACKS: dict[str, tuple[str, ...]] = {
    "auto": BACKENDS,
    "tensorrt": BACKENDS,
    "onnxruntime": ("onnxruntime-cuda", "onnxruntime-cpu", "torch-cuda", "torch-cpu"),
    "onnxruntime-cuda": ("onnxruntime-cuda", "torch-cuda", "onnxruntime-cpu", "torch-cpu"),
    "onnxruntime-cpu": ("onnxruntime-cpu", "torch-cpu"),
    "torch": ("torch-cuda", "torch-cpu"),
    "torch-cuda": ("torch-cuda", "torch-cpu"),
    "torch-cpu": ("torch-cpu",),
}


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as seen by torch, cupy or nvidia-smi (``source``)."""

    name: str
    compute_capability: tuple[int, int] | None
    memory_gib: float | None
    source: str


@dataclass(frozen=True)
class EnvInfo:
    """A snapshot of the machine and libraries; ``None`` means absent or unusable."""

    python: str
    platform: str
    cpu_model: str
    cpu_cores: int
    torch_version: str | None = None
    torch_cuda: bool = False
    torch_cuda_version: str | None = None
    gpus: tuple[GpuInfo, ...] = ()
    cupy_version: str | None = None
    cupy_device: str | None = None
    onnxruntime_version: str | None = None
    onnxruntime_providers: tuple[str, ...] = ()
    tensorrt_version: str | None = None
    nvcc_path: str | None = None
    nvcc_version: str | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return dataclasses.asdict(self)


# --- probes (each returns a partial dict and notes; none raises) -------------------------------
def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _probe_torch(notes: list[str]) -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:
        notes.append(f"torch: not importable ({exc})")
        return {}
    info: dict[str, Any] = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
    }
    try:
        info["torch_cuda"] = bool(torch.cuda.is_available())
        if info["torch_cuda"]:
            gpus = []
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpus.append(
                    GpuInfo(
                        props.name, (props.major, props.minor), props.total_memory / 2**30, "torch"
                    )
                )
            info["gpus"] = tuple(gpus)
    except Exception as exc:
        notes.append(f"torch CUDA: {exc}")
        info["torch_cuda"] = False
    return info


def _probe_cupy(notes: list[str]) -> dict[str, Any]:
    try:
        import cupy
    except Exception as exc:
        notes.append(f"cupy: not importable ({type(exc).__name__})")
        return {}
    info: dict[str, Any] = {"cupy_version": cupy.__version__}
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            props = cupy.cuda.runtime.getDeviceProperties(0)
            name = props["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            cc = (int(props["major"]), int(props["minor"]))
            info["cupy_device"] = f"{name} (sm_{cc[0]}{cc[1]})"
            info["gpus"] = (GpuInfo(name, cc, props["totalGlobalMem"] / 2**30, "cupy"),)
    except Exception as exc:
        notes.append(f"cupy: no usable CUDA device ({type(exc).__name__}: {exc})")
    return info


def _probe_onnxruntime(notes: list[str]) -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except Exception as exc:
        notes.append(f"onnxruntime: not importable ({type(exc).__name__})")
        return {}
    return {
        "onnxruntime_version": ort.__version__,
        "onnxruntime_providers": tuple(ort.get_available_providers()),
    }


def _probe_tensorrt(notes: list[str]) -> dict[str, Any]:
    try:
        import tensorrt
    except Exception as exc:
        notes.append(f"tensorrt: not importable ({type(exc).__name__})")
        return {}
    return {"tensorrt_version": str(tensorrt.__version__)}


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def _probe_nvcc() -> dict[str, Any]:
    path = shutil.which("nvcc")
    if path is None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        candidate = Path(cuda_home or "/usr/local/cuda") / "bin" / "nvcc"
        path = str(candidate) if candidate.is_file() else None
    if path is None:
        return {}
    text = _run([path, "--version"]) or ""
    match = re.search(r"release\s+([\d.]+)", text)
    return {"nvcc_path": path, "nvcc_version": match.group(1) if match else None}


def _probe_nvidia_smi() -> tuple[GpuInfo, ...]:
    text = _run(
        ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"]
    )
    gpus = []
    for line in (text or "").strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        cc = (
            tuple(int(v) for v in parts[1].split("."))
            if re.fullmatch(r"\d+\.\d+", parts[1])
            else None
        )
        mem = float(parts[2]) / 1024 if re.fullmatch(r"[\d.]+", parts[2]) else None
        gpus.append(GpuInfo(parts[0], cc, mem, "nvidia-smi"))  # type: ignore[arg-type]
    return tuple(gpus)


def probe_environment() -> EnvInfo:
    """Probe this machine; missing libraries become ``None`` with a note, never an error."""
    notes: list[str] = []
    info: dict[str, Any] = {}
    for probe in (_probe_torch, _probe_cupy, _probe_onnxruntime, _probe_tensorrt):
        found = probe(notes)
        if "gpus" in found and info.get("gpus"):
            found.pop("gpus")  # the first library that saw the devices describes them
        info.update(found)
    info.update(_probe_nvcc())
    if not info.get("gpus"):
        info["gpus"] = _probe_nvidia_smi()
    return EnvInfo(
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_model=cpu_model(),
        cpu_cores=_cpu_cores(),
        notes=tuple(notes),
        **info,
    )


# --- the choice ---------------------------------------------------------------------------------
def backend_and_device(name: str) -> tuple[str, str]:
    """Split a backend name from :func:`pick_backend` into (runtime, device).

    ``"tensorrt"`` → ``("tensorrt", "cuda")``; ``"onnxruntime-cpu"`` → ``("onnxruntime", "cpu")``.
    """
    if name == "tensorrt":
        return "tensorrt", "cuda"
    runtime, _, device = name.partition("-")
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; one of {', '.join(BACKENDS)}")
    return runtime, device


def _unavailable(env: EnvInfo, backend: str, onnx_available: bool) -> str | None:
    """Why ``backend`` cannot run here, or None when it can."""
    needs_onnx = backend in ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
    if needs_onnx and not onnx_available:
        return "the bundle has no ONNX export (mar-rt build-engines writes one to the cache)"
    if backend == "tensorrt":
        if env.tensorrt_version is None:
            return "tensorrt is not installed"
        if not env.gpus:
            return "tensorrt needs a CUDA GPU and none was found"
        if env.cupy_device is None and not env.torch_cuda:
            return "tensorrt needs device buffers from cupy or torch CUDA; neither sees the GPU"
        return None
    if backend == "onnxruntime-cuda":
        if env.onnxruntime_version is None:
            return "onnxruntime is not installed"
        if "CUDAExecutionProvider" not in env.onnxruntime_providers:
            return "onnxruntime has no CUDAExecutionProvider"
        if not env.gpus:
            return "onnxruntime-cuda needs a CUDA GPU and none was found"
        return None
    if backend == "torch-cuda":
        if env.torch_version is None:
            return "torch is not installed"
        return None if env.torch_cuda else "torch sees no CUDA device"
    if backend == "torch-cpu":
        return None if env.torch_version is not None else "torch is not installed"
    if backend == "onnxruntime-cpu":
        return None if env.onnxruntime_version is not None else "onnxruntime is not installed"
    raise AssertionError(backend)


def pick_backend(
    env: EnvInfo, requested: str = "auto", *, onnx_available: bool = True
) -> tuple[str, str]:
    """Choose a backend for ``requested`` on ``env``; return ``(name, reason)``.

    ``requested`` is ``auto`` or a name from ``FALLBACKS``.  A requested backend that cannot
    run falls back along its chain, and ``reason`` says why each earlier one was passed over.
    ``onnx_available=False`` (a bundle without ONNX files) rules out tensorrt and onnxruntime.
    Raises BackendUnavailableError for an unknown name or when nothing in the chain can run.
    """
    if requested not in FALLBACKS:
        raise BackendUnavailableError(
            f"unknown backend {requested!r}; choose one of {', '.join(FALLBACKS)}"
        )
    skipped: list[str] = []
    for backend in FALLBACKS[requested]:
        why = _unavailable(env, backend, onnx_available)
        if why is None:
            if backend.endswith("cuda") or backend == "tensorrt":
                where = f"on {env.gpus[0].name}" if env.gpus else "on CUDA"
            else:
                where = f"on CPU ({env.cpu_cores} cores)"
            picked = f"{backend} {where}"
            if not skipped:
                return (
                    backend,
                    f"{picked} ({'requested' if requested != 'auto' else 'best available'})",
                )
            return backend, "; ".join(skipped) + f" → falling back to {picked}"
        skipped.append(f"{backend}: {why}")
    raise BackendUnavailableError(
        f"no backend can run for request {requested!r}: " + "; ".join(skipped)
    )
