"""Fast operators: CuPy CUDA kernels (``cuda/*.cu``) and their host build (DESIGN.md §11).

- :mod:`mar_rt.kernels.host` — the kernels' ``__host__ __device__`` bodies compiled for the CPU
  (nvcc + OpenMP, loaded with ctypes): the CPU fast path, on numpy arrays / CPU tensors.
- :mod:`mar_rt.kernels.gpu` — the same sources through ``cupy.RawModule``, on CuPy arrays or
  CUDA torch tensors (DLPack).
- :mod:`mar_rt.kernels.build` — the host build, its cache, and the cubin compile check.

Both expose ``forward_project``, ``back_project``, ``fbp``, ``metal_trace``, ``li_inpaint``,
``sde_step``, ``match_stats`` and ``fuse`` with the references' signatures (``mar_rt.ct``,
``mar_rt.models.sde``, ``mar_rt.runtime.osro``), tested against them.
"""

from __future__ import annotations


def available() -> dict[str, tuple[bool, str]]:
    """Which kernel builds work here: ``{"host": (ok, why), "gpu": (ok, why)}``.

    Compiles the host library on first use (cached on disk); imports CuPy only here.
    """
    from mar_rt.kernels import build, gpu

    return {"host": build.host_available(), "gpu": gpu.gpu_available()}
