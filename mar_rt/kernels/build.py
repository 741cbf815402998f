"""Builds of the CUDA kernel sources: the host library (CPU fast path) and cubin checks.

The same ``cuda/*.cu`` files serve three builds (DESIGN.md §11):

1. **Host build** — ``nvcc -shared -DMR_HOST_BUILD -Xcompiler -fPIC,-fopenmp,-O3,-march=native``
   compiles each kernel's ``__host__ __device__`` body into OpenMP loops (``mr_host_*``),
   loaded here with ctypes.  The library is cached under ``$MAR_RT_CACHE/kernels`` (default
   ``~/.cache/mar-rt/kernels``) in a folder named by the sha256 of the sources, the nvcc and
   host-compiler versions, the flags and the CPU's instruction-set flags, and written
   atomically (temporary folder, then rename).
2. **Device build** — :mod:`mar_rt.kernels.gpu` hands :func:`device_source` to
   ``cupy.RawModule`` (NVRTC).
3. **Cubin check** — :func:`compile_cubin` runs ``nvcc -cubin -arch=sm_XX`` so that a kernel
   that does not compile for the GPU fails a CPU-only CI run; :func:`compile_nvrtc` compiles
   :func:`device_source` with libnvrtc itself (the path CuPy takes), where the library exists.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mar_rt.errors import BackendUnavailableError

log = logging.getLogger(__name__)

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
HEADER = "common.cuh"
SOURCES = ("projector.cu", "fbp.cu", "mar.cu", "fusion.cu")
LIBRARY_NAME = "libmar_rt_kernels.so"
HOST_FLAGS = (
    "-shared",
    "-std=c++17",
    "-O3",
    "-DMR_HOST_BUILD",
    "-Xcompiler",
    "-fPIC,-fopenmp,-O3,-march=native",
    "-lgomp",
)
CUBIN_ARCHS = ("sm_80", "sm_90")
NVRTC_OPTIONS = ("-std=c++17",)  # what gpu.py passes to cupy.RawModule
SLICES_PER_THREAD = (1, 2, 4, 8)  # the NB instantiations of the batched kernels
COMPILE_TIMEOUT_S = 600

_P = ctypes.c_void_p
_I = ctypes.c_int
_LL = ctypes.c_longlong
_F = ctypes.c_float
_D = ctypes.c_double
# (name, argtypes, restype) of every host entry point.
HOST_FUNCTIONS: tuple[tuple[str, tuple, object], ...] = (
    ("mr_host_ray_table", (_P, _P, _I, _I, _I, _I, _D, _P), None),
    ("mr_host_view_coef", (_P, _I, _I, _I, _D, _D, _D, _D, _P), None),
    ("mr_host_gather_table", (_P, _I, _I, _I, _P), None),
    ("mr_host_forward", (_P, _P, _P, _I, _I, _I, _I, _I, _I, _P), _I),
    ("mr_host_adjoint_scatter", (_P, _P, _I, _I, _I, _I, _I, _P), _I),
    ("mr_host_adjoint", (_P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _P), _I),
    ("mr_host_fbp_weight", (_P, _P, _I, _I, _D, _D, _P), None),
    ("mr_host_fbp", (_P, _P, _I, _I, _I, _I, _I, _D, _I, _P), _I),
    ("mr_host_trace", (_P, _LL, _F, _P), None),
    ("mr_host_li", (_P, _P, _I, _I, _P), None),
    ("mr_host_sde_step", (_P, _P, _P, _P, _LL, _F, _F, _F, _P), None),
    ("mr_host_masked_sums", (_P, _P, _I, _LL, _P), None),
    ("mr_host_match_apply", (_P, _P, _P, _I, _LL, _P), None),
    ("mr_host_fuse", (_P, _P, _LL, _F, _F, _P), None),
)


def cache_root() -> Path:
    """``$MAR_RT_CACHE/kernels``, or ``~/.cache/mar-rt/kernels``."""
    base = os.environ.get("MAR_RT_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "mar-rt"
    return root / "kernels"


def find_nvcc() -> Path | None:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH or /usr/local/cuda; None if absent."""
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    default = Path("/usr/local/cuda/bin/nvcc")
    return default if default.is_file() else None


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, cwd=cwd
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendUnavailableError(f"{what}: could not run {cmd[0]}: {exc}") from exc
    if result.returncode != 0:
        raise BackendUnavailableError(
            f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n"
            f"{(result.stderr or result.stdout)[-4000:]}"
        )
    return result


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout + out.stderr).strip()


def _cpu_flags() -> str:
    """The instruction-set flags of this CPU (``-march=native`` depends on them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_texts() -> dict[str, str]:
    """The kernel sources by file name (header first)."""
    return {name: (CUDA_DIR / name).read_text() for name in (HEADER, *SOURCES)}


def device_source(name: str) -> str:
    """``name`` (a .cu file) with its ``#include "common.cuh"`` replaced by the header text,
    ready for NVRTC (``cupy.RawModule(code=...)``)."""
    if name not in SOURCES:
        raise ValueError(f"unknown kernel source {name!r}; expected one of {SOURCES}")
    texts = source_texts()
    include = f'#include "{HEADER}"'
    if include not in texts[name]:
        raise ValueError(f"{name} does not include {HEADER}")
    return texts[name].replace(include, texts[HEADER])


@dataclass(frozen=True)
class HostBuild:
    """Where the host library for the current sources and toolchain lives."""

    nvcc: Path
    key: str
    library: Path


def host_build_spec(nvcc: Path | None = None) -> HostBuild:
    """The cache key and library path for the current sources and toolchain."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BackendUnavailableError(
            "nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): the host build of the "
            "CUDA kernels needs it"
        )
    digest = hashlib.sha256()
    for name, text in source_texts().items():
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    for part in (
        _tool_version([str(nvcc), "--version"]),
        _tool_version(["c++", "--version"]),
        " ".join(HOST_FLAGS),
        _cpu_flags(),
    ):
        digest.update(part.encode() + b"\0")
    key = digest.hexdigest()[:24]
    return HostBuild(nvcc=nvcc, key=key, library=cache_root() / key / LIBRARY_NAME)


def build_host_library(spec: HostBuild | None = None) -> Path:
    """Compile the host library into the cache unless it is there already; return its path."""
    spec = spec or host_build_spec()
    if spec.library.is_file():
        return spec.library
    final_dir = spec.library.parent
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the host kernels with %s into %s", spec.nvcc, final_dir)
    with tempfile.TemporaryDirectory(dir=final_dir.parent, prefix=".build-") as tmp:
        tmp_dir = Path(tmp) / spec.key
        tmp_dir.mkdir()
        sources = [str(CUDA_DIR / name) for name in SOURCES]
        _run(
            [str(spec.nvcc), *HOST_FLAGS, *sources, "-o", str(tmp_dir / LIBRARY_NAME)],
            "host build of the CUDA kernels",
            cwd=tmp_dir,
        )
        try:
            os.replace(tmp_dir, final_dir)
        except OSError:
            # Another process finished the same build first: keep its copy.
            if not spec.library.is_file():
                raise
    return spec.library


@functools.cache
def load_host_library() -> ctypes.CDLL:
    """Build (once, cached on disk) and load the host library, with argument types set.

    Raises:
        BackendUnavailableError: nvcc is missing, the build failed or the library won't load.
    """
    path = build_host_library()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BackendUnavailableError(f"cannot load the host kernel library {path}: {exc}") from exc
    for name, argtypes, restype in HOST_FUNCTIONS:
        try:
            fn = getattr(lib, name)
        except AttributeError as exc:
            raise BackendUnavailableError(f"{path} lacks the entry point {name}") from exc
        fn.argtypes = list(argtypes)
        fn.restype = restype
    return lib


def host_available() -> tuple[bool, str]:
    """(True, library path) when the host build loads, else (False, the reason)."""
    try:
        lib = load_host_library()
    except BackendUnavailableError as exc:
        return False, str(exc)
    return True, str(lib._name)


def compile_cubin(arch: str, out_dir: Path | None = None) -> list[Path]:
    """Compile every kernel source with ``nvcc -cubin -arch=<arch>`` (e.g. ``sm_80``).

    Returns the cubin paths (in ``out_dir``, or a fresh temporary folder the caller owns).

    Raises:
        ValueError: ``arch`` is not of the form ``sm_NN``.
        BackendUnavailableError: nvcc is missing or a source does not compile.
    """
    if not (arch.startswith("sm_") and arch[3:].isdigit()):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    nvcc = find_nvcc()
    if nvcc is None:
        raise BackendUnavailableError("nvcc not found: cannot compile the kernels to cubin")
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="mar-rt-cubin-"))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SOURCES:
        target = out / f"{Path(name).stem}.{arch}.cubin"
        _run(
            [
                str(nvcc),
                "-cubin",
                f"-arch={arch}",
                "-std=c++17",
                "-O3",
                "-Werror",
                "all-warnings",
                str(CUDA_DIR / name),
                "-o",
                str(target),
            ],
            f"cubin build of {name} for {arch}",
        )
        paths.append(target)
    return paths


def find_nvrtc() -> Path | None:
    """libnvrtc: in the CUDA toolkit, in an ``nvidia`` pip package (torch, CuPy wheels), or on
    the loader path; None if absent."""
    candidates: list[Path] = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates += sorted((Path(os.environ[env]) / "lib64").glob("libnvrtc.so*"))
    candidates += sorted(Path("/usr/local/cuda/lib64").glob("libnvrtc.so*"))
    try:
        import nvidia  # namespace package of the CUDA pip wheels

        for root in getattr(nvidia, "__path__", []):
            candidates += sorted(Path(root).glob("*/lib/libnvrtc.so*"))
    except ImportError:
        pass
    for path in candidates:
        if "builtins" not in path.name and "alt" not in path.name:
            return path
    found = ctypes.util.find_library("nvrtc")
    return Path(found) if found else None


def compile_nvrtc(
    arch: str = "compute_90", library: Path | None = None, defines: tuple[str, ...] = ()
) -> dict[str, int]:
    """Compile every :func:`device_source` with libnvrtc (``NVRTC_OPTIONS``, as
    :mod:`mar_rt.kernels.gpu` passes to ``cupy.RawModule``, plus ``-D`` ``defines``) to PTX;
    needs no GPU.  Returns the PTX size per source.

    Raises:
        BackendUnavailableError: libnvrtc is missing, or a source does not compile (with the log).
    """
    return {name: len(nvrtc_ptx(name, arch, library, defines)) for name in SOURCES}


def nvrtc_ptx(
    name: str, arch: str = "compute_90", library: Path | None = None, defines: tuple[str, ...] = ()
) -> bytes:
    """The PTX libnvrtc makes of one :func:`device_source` (``defines``: e.g. ``"MR_NO_LDG"``)."""
    path = library or find_nvrtc()
    if path is None:
        raise BackendUnavailableError("libnvrtc not found: cannot run the NVRTC compile check")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BackendUnavailableError(f"cannot load {path}: {exc}") from exc
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    prog = ctypes.c_void_p()
    src = device_source(name).encode()
    status = lib.nvrtcCreateProgram(ctypes.byref(prog), src, name.encode(), 0, None, None)
    if status != 0:
        raise BackendUnavailableError(
            f"nvrtcCreateProgram({name}): {lib.nvrtcGetErrorString(status).decode()}"
        )
    try:
        options = (*NVRTC_OPTIONS, *(f"-D{d}" for d in defines), f"--gpu-architecture={arch}")
        opts = [o.encode() for o in options]
        argv = (ctypes.c_char_p * len(opts))(*opts)
        status = lib.nvrtcCompileProgram(prog, len(opts), argv)
        log_size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(log_size))
        log_buf = ctypes.create_string_buffer(max(1, log_size.value))
        lib.nvrtcGetProgramLog(prog, log_buf)
        if status != 0:
            raise BackendUnavailableError(
                f"NVRTC build of {name} for {arch} failed: "
                f"{lib.nvrtcGetErrorString(status).decode()}\n{log_buf.value.decode()[-4000:]}"
            )
        ptx_size = ctypes.c_size_t()
        lib.nvrtcGetPTXSize(prog, ctypes.byref(ptx_size))
        ptx = ctypes.create_string_buffer(ptx_size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.raw.rstrip(b"\0")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
