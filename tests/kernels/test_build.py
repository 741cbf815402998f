"""The kernel builds: cubin compile check for the GPUs we ship to, the host library's cache,
and the source layout rules of DESIGN §11 (bodies shared, wrappers only index)."""

from __future__ import annotations

import re

import pytest

from mar_rt.kernels import build

KERNEL_RE = re.compile(r'extern "C" __global__ void (mr_\w+)\(|MR_\w+_KERNEL\((mr_\w+), (\d+)\)')


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", build.CUBIN_ARCHS)
def test_kernels_compile_to_cubin(arch, tmp_path):
    """A device-side syntax or type error fails here, on a CPU-only machine."""
    if build.find_nvcc() is None:
        pytest.skip("nvcc not found: cannot compile the kernels to cubin")
    paths = build.compile_cubin(arch, tmp_path)
    assert [p.name for p in paths] == [f"{s.split('.')[0]}.{arch}.cubin" for s in build.SOURCES]
    for path in paths:
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:4] == b"\x7fELF"


def test_compile_cubin_refuses_a_bad_arch():
    with pytest.raises(ValueError, match="sm_90"):
        build.compile_cubin("hopper")


def test_every_kernel_has_a_host_entry_point():
    """Each ``__global__ mr_X`` has an ``mr_host_X`` registered for ctypes, and vice versa."""
    kernels, batched = set(), {}
    for name in build.SOURCES:
        for plain, macro_name, nb in KERNEL_RE.findall((build.CUDA_DIR / name).read_text()):
            if plain:
                kernels.add(plain)
            else:  # mr_forward_4 → mr_forward, one kernel per slices-per-thread instantiation
                base = macro_name.rsplit("_", 1)[0]
                assert macro_name == f"{base}_{nb}"
                batched.setdefault(base, set()).add(int(nb))
    assert batched, "no batched kernels found"
    for base, nbs in batched.items():
        assert nbs == set(build.SLICES_PER_THREAD), base
    host = {name for name, _, _ in build.HOST_FUNCTIONS}
    assert {k.replace("mr_", "mr_host_", 1) for k in kernels | set(batched)} == host


def test_device_source_inlines_the_header():
    for name in build.SOURCES:
        text = build.device_source(name)
        assert f'#include "{build.HEADER}"' not in text
        assert "#define MR_HD" in text
    with pytest.raises(ValueError, match="unknown kernel source"):
        build.device_source("nope.cu")


def test_cache_location_and_key(monkeypatch, tmp_path):
    """The library lives under $MAR_RT_CACHE/kernels/<key>/, keyed by sources and toolchain."""
    if build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    monkeypatch.setenv("MAR_RT_CACHE", str(tmp_path))
    spec = build.host_build_spec()
    assert spec.library.parent.parent == tmp_path / "kernels"
    assert spec.library.parent.name == spec.key
    assert build.host_build_spec().key == spec.key  # deterministic
    monkeypatch.setattr(build, "HOST_FLAGS", (*build.HOST_FLAGS, "-DEXTRA"))
    assert build.host_build_spec().key != spec.key


def test_missing_nvcc_is_reported(monkeypatch):
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    build.load_host_library.cache_clear()
    try:
        ok, reason = build.host_available()
    finally:
        build.load_host_library.cache_clear()
    assert not ok and "nvcc not found" in reason


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernels_compile_with_nvrtc(arch):
    """The exact source and options cupy.RawModule gets, through libnvrtc (no GPU needed)."""
    if build.find_nvrtc() is None:
        pytest.skip("libnvrtc not found (no CUDA toolkit or nvidia-cuda-nvrtc wheel)")
    sizes = build.compile_nvrtc(arch)
    assert set(sizes) == set(build.SOURCES)
    assert all(size > 1000 for size in sizes.values())


def _ptx_entries(ptx: bytes) -> dict[str, str]:
    """Kernel name → its PTX text."""
    parts = re.split(r"(?=\.visible \.entry )", ptx.decode())[1:]
    return {re.match(r"\.visible \.entry (\w+)\(", p).group(1): p for p in parts}


def test_benchmark_baseline_switches_and_the_read_only_cache_policy():
    """MR_NO_LDG / MR_PLANE_INDEX64 (the baseline device_check.py times) compile and change the
    build; in the default build only the multi-slice forward kernels read the image through
    the read-only cache (the policy the H200 timings chose, projector.cu)."""
    if build.find_nvrtc() is None:
        pytest.skip("libnvrtc not found (no CUDA toolkit or nvidia-cuda-nvrtc wheel)")
    default = build.nvrtc_ptx("projector.cu")
    baseline = build.nvrtc_ptx("projector.cu", defines=("MR_NO_LDG", "MR_PLANE_INDEX64"))
    assert b"ld.global.nc.f32" not in baseline
    assert default != build.nvrtc_ptx("projector.cu", defines=("MR_PLANE_INDEX64",))
    uses_ldg = {k: "ld.global.nc.f32" in v for k, v in _ptx_entries(default).items()}
    assert {k for k, v in uses_ldg.items() if v} == {"mr_forward_2", "mr_forward_4", "mr_forward_8"}
