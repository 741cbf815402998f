"""One-shot check of the CUDA kernels on a lent GPU machine (H100 / H200).

Runs with the machine's own ``python3`` and the repository on PYTHONPATH (no venv, no install):

    PYTHONPATH=$PWD python3 benchmarks/device_check.py --out $OUT

and writes ``$OUT/device_check.log`` and ``$OUT/device_check.json`` (rewritten after every
section, so a killed run still leaves what it measured).  Needs torch, numpy and — for the GPU
sections — CuPy and a CUDA device; the host-build sections need nvcc.  The kernel sections
import nothing else; ``pipeline``, ``gpu_tests`` and ``train_gpu`` build DuDoCLIP, which needs
open_clip (``open_clip_torch``), and record an ImportError where it is missing.  Without CUDA
every GPU section records ``skipped: no CUDA``.

Sections (each a function with its own time budget; an error is recorded, never fatal):

    environment    GPU, driver, CUDA runtime, torch / CuPy / nvcc versions
    build          host build (nvcc + OpenMP), NVRTC compile of every .cu, RawModule load
    host_parity    host build vs the torch CPU reference (416², 641 bins, 40 views)
    gpu_parity     CuPy vs torch-CUDA reference vs host build, every kernel, 416² / 640 × 641
    adjoint        ⟨Ax, y⟩ = ⟨x, Aᵀy⟩ on the GPU, gather and scatter
    kernel_timings forward / back / FBP, batch 1 and 16, CUDA events, median of ≥ 20
    kernel_variants forward / gather back-projection per compile-time switch, block sizes
    sde_step       the fused SDE update against torch's three-op update
    unet_step      U-Net step fp32 / fp16 / CUDA graph      (if mar_rt.models.unet imports)
    pipeline       full DuDoCROP latency per stage: the demo bundle, untrained tiny and paper
                   bundles at 416² (the per-stage timings ``test_pipeline_gpu`` used to print)
    gpu_tests      pytest -m gpu, one run per file of GPU_TEST_FILES
    train_gpu      ``train_bundle`` on CUDA: smoke preset, then tiny-gpu under a time budget
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_kernels import (  # noqa: E402
    gpu_benchmark,
    rel_diff,
    summary,
    test_image,
    time_cpu,
    time_cuda,
)

log = logging.getLogger("device_check")
TOTAL_BUDGET_S = 450.0
TOLERANCE = 1e-5


class Budget:
    """Seconds a section may still spend; sections check it between their steps."""

    def __init__(self, seconds: float, deadline: float) -> None:
        self.end = min(time.monotonic() + seconds, deadline)

    def left(self) -> float:
        return self.end - time.monotonic()

    def ok(self, need: float = 0.0) -> bool:
        return self.left() > need


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _cupy_ok() -> tuple[bool, str]:
    try:
        from mar_rt.kernels import gpu

        return gpu.gpu_available()
    except Exception as exc:  # noqa: BLE001 - recorded, never fatal
        return False, f"{type(exc).__name__}: {exc}"


def _need_gpu() -> str | None:
    """None when the GPU sections can run, else the 'skipped: ...' reason."""
    if not _cuda():
        return "skipped: no CUDA"
    ok, why = _cupy_ok()
    return None if ok else f"skipped: no CuPy kernels ({why})"


def _run(cmd: list[str], timeout: float = 60) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"


# --------------------------------------------------------------------------- sections
def environment(budget: Budget) -> dict:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "nvidia_smi": _run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm",
                "--format=csv,noheader",
            ]
        )
        if shutil.which("nvidia-smi")
        else "absent",
        "nvcc": _run(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else "absent",
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["capability"] = f"{props.major}.{props.minor}"
            info["sm_count"] = props.multi_processor_count
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    except ImportError as exc:
        info["torch"] = f"absent: {exc}"
    try:
        import cupy as cp

        info["cupy"] = cp.__version__
        info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
        info["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
    except Exception as exc:  # noqa: BLE001
        info["cupy"] = f"absent: {type(exc).__name__}: {exc}"
    info["cuda"] = _cuda()
    return info


def build_section(budget: Budget) -> dict:
    from mar_rt.kernels import build

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    ok, why = build.host_available()
    out["host_build"] = {"ok": ok, "detail": why, "seconds": time.perf_counter() - t0}
    if build.find_nvrtc() is not None:
        t0 = time.perf_counter()
        try:
            out["nvrtc_ptx_bytes"] = build.compile_nvrtc("compute_90")
        except Exception as exc:  # noqa: BLE001
            out["nvrtc_ptx_bytes"] = f"error: {exc}"
        out["nvrtc_seconds"] = time.perf_counter() - t0
    reason = _need_gpu() if _cuda() else "skipped: no CUDA"
    if reason is None:
        import cupy as cp

        from mar_rt.kernels import gpu

        t0 = time.perf_counter()
        for name in build.SOURCES:
            gpu._module(name, cp.cuda.Device().id)
        out["rawmodule_seconds"] = time.perf_counter() - t0
    else:
        out["rawmodule"] = reason
    return out


def host_parity(budget: Budget) -> dict:
    import torch

    from mar_rt.ct import projector as ref
    from mar_rt.ct.geometry import FanBeamGeometry
    from mar_rt.kernels import build, host

    ok, why = build.host_available()
    if not ok:
        return {"status": f"skipped: {why}"}
    g = FanBeamGeometry.syndeeplesion(n_views=40)
    image, _ = test_image()
    x = torch.from_numpy(image)
    y = ref.forward_project(x, g)
    out = {
        "geometry": "416² / 40 × 641",
        "forward": rel_diff(host.forward_project(x, g), y),
        "back_scatter": rel_diff(host.back_project(y, g), ref.back_project(y, g)),
        "back_gather": rel_diff(host.back_project(y, g, method="gather"), ref.back_project(y, g)),
        "fbp": rel_diff(host.fbp(y, g), ref.get_projector(g).fbp(y)),
    }
    out["pass"] = all(v < TOLERANCE for k, v in out.items() if k != "geometry")
    return out


def gpu_parity(budget: Budget) -> dict:
    reason = _need_gpu()
    if reason:
        return {"status": reason}
    import torch

    from mar_rt.ct import mar as ref_mar
    from mar_rt.ct import projector as ref
    from mar_rt.ct.geometry import FanBeamGeometry
    from mar_rt.ct.ramp import filter_sinogram
    from mar_rt.kernels import build, gpu
    from mar_rt.runtime import osro

    g = FanBeamGeometry.syndeeplesion()
    image, source = test_image()
    rng = np.random.default_rng(0)
    batch = np.stack([image, np.roll(image, 17, axis=1) + 0.01 * rng.random(image.shape)])
    x = torch.from_numpy(batch.astype(np.float32)).cuda()
    cpu = lambda t: t.detach().cpu().numpy()  # noqa: E731
    res: dict[str, Any] = {"image": source, "tolerance": TOLERANCE}
    t0 = time.perf_counter()
    proj = ref.get_projector(g, "cuda", torch.float32)
    y_ref = proj.forward(x)
    res["torch_table_build_s"] = time.perf_counter() - t0
    y = gpu.forward_project(x, g)
    res["forward"] = rel_diff(cpu(y), cpu(y_ref))
    bp_ref = proj.adjoint(y_ref)
    res["back_gather"] = rel_diff(cpu(gpu.back_project(y_ref, g)), cpu(bp_ref))
    res["back_scatter"] = rel_diff(cpu(gpu.back_project(y_ref, g, method="scatter")), cpu(bp_ref))
    fbp_ref = proj.fbp(y_ref)
    res["fbp"] = rel_diff(cpu(gpu.fbp(y_ref, g)), cpu(fbp_ref))
    q = filter_sinogram(y_ref, g)
    res["fbp_backprojection_step"] = rel_diff(
        cpu(gpu.get_gpu_projector(g).backproject_filtered(q)), cpu(fbp_ref)
    )
    yy, xx = torch.meshgrid(torch.arange(416), torch.arange(416), indexing="ij")
    disc = ((yy - 150) ** 2 + (xx - 240) ** 2 < 12**2) | ((yy - 300) ** 2 + (xx - 120) ** 2 < 36)
    mask = disc.cuda().expand(2, -1, -1).contiguous()
    tr_ref = ref_mar.metal_trace(mask, g)
    tr = gpu.metal_trace(mask, g)
    differ = tr != tr_ref
    fp_mask = proj.forward(mask.float())
    res["trace_bins"] = int(tr_ref.sum())
    res["trace_mismatch"] = int(differ.sum())
    res["trace_mismatch_max_fp"] = float(fp_mask[differ].abs().max()) if bool(differ.any()) else 0.0
    li_ref = ref_mar.li_inpaint(y_ref, tr_ref)
    res["li"] = rel_diff(cpu(gpu.li_inpaint(y_ref, tr_ref)), cpu(li_ref))
    eps, z = torch.randn_like(x), torch.randn_like(x)
    step_ref = 0.5 * x + 0.9 * (x - 0.5 * x) - 0.05 * eps + 0.01 * z
    res["sde_step"] = rel_diff(
        cpu(gpu.sde_step(x, eps, 0.5 * x, 0.9, 0.05, 0.01, z)), cpu(step_ref)
    )
    valid = ~mask
    res["match_stats"] = rel_diff(
        cpu(gpu.match_stats(x, 0.5 * x + 0.1, valid)),
        cpu(osro.match_stats(x, 0.5 * x + 0.1, valid)),
    )
    res["fuse"] = rel_diff(cpu(gpu.fuse(x, 2 * x, 0.3)), cpu(osro.fuse(x, 2 * x, 0.3)))
    if build.host_available()[0] and budget.ok(20):
        from mar_rt.kernels import host

        xc = x.cpu()
        res["host_vs_cupy"] = {
            "forward": rel_diff(host.forward_project(xc, g), cpu(y)),
            "back": rel_diff(host.back_project(y_ref.cpu(), g), cpu(bp_ref)),
            "fbp": rel_diff(host.fbp(y_ref.cpu(), g), cpu(fbp_ref)),
        }
    checks = (
        "forward",
        "back_gather",
        "back_scatter",
        "fbp",
        "fbp_backprojection_step",
        "li",
        "sde_step",
        "match_stats",
        "fuse",
    )
    res["failed"] = [k for k in checks if not res[k] < TOLERANCE]
    if res["trace_mismatch"] and res["trace_mismatch_max_fp"] >= 1e-4:
        res["failed"].append("trace")
    res["pass"] = not res["failed"]
    return res


def adjoint(budget: Budget) -> dict:
    reason = _need_gpu()
    if reason:
        return {"status": reason}
    import cupy as cp

    from mar_rt.ct.geometry import FanBeamGeometry
    from mar_rt.kernels import gpu

    g = FanBeamGeometry.syndeeplesion()
    rng = cp.random.default_rng(1)
    out: dict[str, Any] = {}
    for trial in range(3):
        x = rng.random((2, *g.image_shape), dtype=cp.float32)
        y = rng.random((2, *g.sino_shape), dtype=cp.float32)
        lhs = float(cp.vdot(gpu.forward_project(x, g).astype(cp.float64), y.astype(cp.float64)))
        for method in ("gather", "scatter"):
            aty = gpu.back_project(y, g, method=method)
            rhs = float(cp.vdot(x.astype(cp.float64), aty.astype(cp.float64)))
            out[f"trial{trial}_{method}_rel"] = abs(lhs - rhs) / abs(lhs)
        out[f"trial{trial}_gather_vs_scatter"] = rel_diff(
            gpu.back_project(y, g).get(), gpu.back_project(y, g, method="scatter").get()
        )
    out["pass"] = all(v < 1e-4 for k, v in out.items() if k.endswith("_rel"))
    return out


def kernel_timings(budget: Budget, repeats: int) -> dict:
    reason = _need_gpu()
    if reason:
        return {"status": reason}
    res = gpu_benchmark(repeats, batches=(1, 16))
    from mar_rt.ct.geometry import FanBeamGeometry
    from mar_rt.kernels import build, host

    if build.host_available()[0] and budget.ok(15):
        g = FanBeamGeometry.syndeeplesion()
        image, _ = test_image()
        p = host.get_host_projector(g)
        sino = p.forward(image)
        res["host_cpu_batch1"] = {
            "threads": os.cpu_count(),
            "forward": time_cpu(lambda: p.forward(image), 5),
            "back_scatter": time_cpu(lambda: p.adjoint(sino), 5),
            "fbp": time_cpu(lambda: p.fbp(sino), 5),
        }
    return res


# Compile-time switches of projector.cu, each the previous state of one optimisation.  The
# read-only cache is used by the multi-slice forward kernels only (projector.cu).
KERNEL_VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline (64-bit index, plain loads)": ("MR_PLANE_INDEX64", "MR_NO_LDG"),
    "32-bit index, plain loads": ("MR_NO_LDG",),
    "64-bit index, read-only cache": ("MR_PLANE_INDEX64",),
    "default (32-bit index, read-only cache)": (),
}
BLOCK_SIZES = (64, 128, 256, 512, 1024)


def kernel_variants(budget: Budget, repeats: int) -> dict:
    """Forward projection and gather back-projection of ``projector.cu`` built with each set
    of ``KERNEL_VARIANTS`` switches (same run, same inputs, CUDA events), their outputs
    against the default build's, and a block-size sweep of the default build."""
    reason = _need_gpu()
    if reason:
        return {"status": reason}
    import cupy as cp

    from mar_rt.ct.geometry import FanBeamGeometry
    from mar_rt.kernels import build, gpu

    g = FanBeamGeometry.syndeeplesion()
    proj = gpu.get_gpu_projector(g)
    image, _ = test_image()
    dims = (np.int32(g.n_rows), np.int32(g.n_cols), np.int32(g.n_views), np.int32(g.n_det))

    # inputs and outputs per batch size, made once; every build and block size reads them
    buffers = {}
    for b in (1, 16):
        x = cp.asarray(np.broadcast_to(image, (b, *image.shape)).copy())
        buffers[b] = (
            x,
            cp.ascontiguousarray(cp.swapaxes(x, -1, -2)),
            proj.forward(x),
            cp.empty((b, g.n_views, g.n_det), np.float32),
            cp.empty_like(x),
        )
    pad, span = np.int32(proj.pad), np.int32(proj.span)

    def launchers(module: Any, b: int, block: int) -> dict[str, Callable[[], Any]]:
        nb = gpu.slices_per_thread(b)
        chunks = -(-b // nb)
        x, x_t, sino, y, back = buffers[b]
        fwd = module.get_function(f"mr_forward_{nb}")
        adj = module.get_function(f"mr_adjoint_{nb}")
        n_fwd, n_adj = chunks * g.n_views * g.n_det, chunks * g.n_rows * g.n_cols

        def forward() -> Any:
            args = (x, x_t, proj.rays, np.int32(b), *dims, y)
            fwd(((n_fwd + block - 1) // block,), (block,), args)
            return y

        def gather() -> Any:
            args = (sino, proj.gtab, proj.vcoef32, np.int32(b), *dims, pad, span, back)
            adj(((n_adj + block - 1) // block,), (block,), args)
            return back

        return {"forward": forward, "back_gather": gather}

    def module_for(defines: tuple[str, ...]) -> Any:
        opts = (*build.NVRTC_OPTIONS, *(f"-D{d}" for d in defines))
        module = cp.RawModule(code=build.device_source("projector.cu"), options=opts)
        module.compile()
        return module

    out: dict[str, Any] = {"repeats": repeats, "variants": {}, "block_sweep": {}}
    reference: dict[tuple[int, str], np.ndarray] = {}
    default = module_for(())
    for b in (1, 16):
        for op, fn in launchers(default, b, gpu.BLOCK).items():
            reference[(b, op)] = cp.asnumpy(fn())
    for label, defines in KERNEL_VARIANTS.items():
        if not budget.ok(10):
            out["truncated"] = True
            break
        module = module_for(defines)
        rec: dict[str, Any] = {"defines": list(defines)}
        for b in (1, 16):
            for op, fn in launchers(module, b, gpu.BLOCK).items():
                result = cp.asnumpy(fn())
                rec[f"{op}_b{b}"] = time_cuda(fn, repeats)
                rec[f"{op}_b{b}_max_abs_diff_vs_default"] = float(
                    np.abs(result - reference[(b, op)]).max()
                )
        out["variants"][label] = rec
        log.info(
            "variant %s: forward b1 %.3f ms, b16 %.3f ms; gather b1 %.3f ms",
            label,
            rec["forward_b1"]["median_ms"],
            rec["forward_b16"]["median_ms"],
            rec["back_gather_b1"]["median_ms"],
        )
    for block in BLOCK_SIZES:
        if not budget.ok(5):
            out["truncated"] = True
            break
        rec = {}
        for b in (1, 16):
            for op, fn in launchers(default, b, block).items():
                rec[f"{op}_b{b}"] = time_cuda(fn, repeats)["median_ms"]
        out["block_sweep"][str(block)] = rec
        log.info("block %d: %s", block, rec)
    return out


def sde_step_section(budget: Budget, repeats: int) -> dict:
    reason = _need_gpu()
    if reason:
        return {"status": reason}
    import cupy as cp
    import torch

    from mar_rt.kernels import gpu

    out: dict[str, Any] = {}
    for shape in ((1, 1, 416, 416), (16, 1, 416, 416), (1, 1, 640, 641), (16, 1, 640, 641)):
        if not budget.ok(5):
            out["truncated"] = True
            break
        x, eps, mu, z = (torch.randn(shape, device="cuda") for _ in range(4))
        xc, ec, mc, zc = (cp.from_dlpack(t) for t in (x, eps, mu, z))
        buf = cp.empty_like(xc)

        def torch_step(x=x, eps=eps, mu=mu, z=z):
            return mu + 0.9 * (x - mu) - 0.05 * eps + 0.01 * z

        def fused(xc=xc, ec=ec, mc=mc, zc=zc, buf=buf):
            return gpu.sde_step(xc, ec, mc, 0.9, 0.05, 0.01, zc, out=buf)

        key = "x".join(str(s) for s in shape)
        t_torch, t_fused = time_cuda(torch_step, repeats), time_cuda(fused, repeats)
        out[key] = {
            "fused_kernel": t_fused,
            "torch_ops": t_torch,
            "ratio": t_fused["median_ms"] / t_torch["median_ms"],
            "fused_GBps": 5 * x.numel() * 4 / (t_fused["median_ms"] * 1e-3) / 1e9,
        }
    return out


def unet_step(budget: Budget, repeats: int) -> dict:
    """U-Net step fp32 / fp16 / CUDA graph (runs only if mar_rt.models.unet imports)."""
    if not _cuda():
        return {"status": "skipped: no CUDA"}
    import torch

    from mar_rt.models.unet import ConditionalUNet, UNetConfig

    out: dict[str, Any] = {}
    for cfg_name, size in (("tiny", 416), ("paper", 256), ("paper", 416)):
        if not budget.ok(20):
            out["truncated"] = True
            break
        cfg = UNetConfig.tiny() if cfg_name == "tiny" else UNetConfig.paper()
        out[f"{cfg_name}_{size}"] = _unet_case(ConditionalUNet(cfg).cuda().eval(), size, repeats)
        torch.cuda.empty_cache()
    return out


def _unet_case(net: Any, size: int, repeats: int) -> dict:
    """fp32, fp16 autocast and fp16 CUDA-graph timings of one U-Net at one image size."""
    import torch

    x = torch.randn(1, 1, size, size, device="cuda")
    mu = torch.randn_like(x)
    t = torch.full((1,), 50.0, device="cuda")
    c = torch.randn(1, net.cfg.context_dim, device="cuda")
    rec: dict[str, Any] = {"params_M": sum(p.numel() for p in net.parameters()) / 1e6}
    with torch.inference_mode():
        cond = net.condition(c, c)
        rec["fp32"] = _time_torch(lambda: net(x, mu, t, cond), repeats)
        with torch.autocast("cuda", dtype=torch.float16):
            rec["fp16_autocast"] = _time_torch(lambda: net(x, mu, t, cond), repeats)
    try:
        rec["fp16_graph"] = _graph_timing(net, x, mu, t, cond.clone(), repeats)
    except Exception as exc:  # noqa: BLE001
        rec["fp16_graph"] = f"error: {type(exc).__name__}: {exc}"
    return rec


def _time_torch(fn: Callable[[], Any], repeats: int) -> dict:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return summary(times)


def _graph_timing(net: Any, x: Any, mu: Any, t: Any, cond: Any, repeats: int) -> dict:
    """One U-Net call plus the SDE update captured in a CUDA graph (fp16 autocast)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.set_grad_enabled(False)
    with torch.cuda.stream(side), torch.autocast("cuda", dtype=torch.float16):
        for _ in range(3):
            eps = net(x, mu, t, cond)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.autocast("cuda", dtype=torch.float16):
        eps = net(x, mu, t, cond)
        x_next = mu + 0.9 * (x - mu) - 0.05 * eps.float()
    del x_next
    timing = _time_torch(graph.replay, repeats)
    torch.set_grad_enabled(True)
    return timing


def pipeline(
    budget: Budget,
    repeats: int,
    *,
    device: str = "cuda",
    precisions: tuple[str, ...] = ("fp32", "fp16"),
    configs: tuple[str, ...] = ("tiny", "paper"),
    step_scale: float = 1.0,
) -> dict:
    """Full DuDoCROP latency per slice, fp16 vs fp32 after the full loop, and loop overhead.

    Bundles: the shipped demo bundle (when present), an untrained ``tiny`` and an untrained
    ``paper`` bundle. Input: the demo slice with a seeded simulated implant (measured
    sinogram), so PSNR against the clean target is meaningful for the demo bundle.

    Loop overhead = (image-SDE stage time − steps × one ``unet_image_step`` engine call −
    one ``unet_image_cond`` call) / image-SDE stage time, the engine calls timed alone with
    CUDA events on the same graphs.
    """
    if device == "cuda" and not _cuda():
        return {"status": "skipped: no CUDA"}
    import torch

    from mar_rt.ct import metrics
    from mar_rt.ct.geometry import FanBeamGeometry
    from mar_rt.ct.masks import body_outline, generate_metal_mask
    from mar_rt.ct.projector import Projector
    from mar_rt.ct.simulate import simulate_metal_artifact
    from mar_rt.runtime.bundle_access import DEMO_BUNDLE
    from mar_rt.runtime.demo import load_demo_slice, make_untrained_bundle
    from mar_rt.runtime.pipeline import DuDoCROPPipeline

    geom = FanBeamGeometry.syndeeplesion()
    target = load_demo_slice()
    mask = generate_metal_mask(
        geom.image_shape, seed=7, body_mask=body_outline(target), size_px=890
    )
    proj = Projector(geom, device=device)
    sim = simulate_metal_artifact(
        torch.as_tensor(target, device=device),
        torch.as_tensor(mask, device=device),
        geometry=geom,
        seed=7,
        projector=proj,
    )
    x_ma = sim["ma_CT"].float()
    y_ma = sim["ma_sinogram"].float()
    m = torch.as_tensor(mask, device=device)
    out: dict[str, Any] = {"input": "demo slice + 890 px Ti implant (seed 7), measured sinogram"}
    out["input_psnr"] = float(metrics.psnr(x_ma.cpu().numpy(), target, mask))
    out["li_psnr"] = float(metrics.psnr(sim["LI_CT"].float().cpu().numpy(), target, mask))

    def _sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def run(pipe: Any, steps: int) -> tuple[Any, float]:
        pipe(x_ma, sinogram=y_ma, sinogram_is_measured=True, mask=m, steps=steps, seed=0)
        _sync()
        t0 = time.perf_counter()
        res = pipe(x_ma, sinogram=y_ma, sinogram_is_measured=True, mask=m, steps=steps, seed=0)
        _sync()
        return res, time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        bundles: list[tuple[str, Path, tuple[int, ...]]] = []
        if (Path(DEMO_BUNDLE) / "bundle.json").exists():
            bundles.append(("demo", Path(DEMO_BUNDLE), (0, 100)))
        for cfg in configs:
            folder = make_untrained_bundle(Path(tmp) / cfg, config=cfg)
            bundles.append((f"{cfg}_untrained", folder, (10, 100) if cfg == "tiny" else (10, 50)))
        for name, path, step_list in bundles:
            rec: dict[str, Any] = {}
            out[name] = rec
            outputs: dict[str, Any] = {}
            for precision in precisions:
                if not budget.ok(20):
                    rec["truncated"] = True
                    break
                pipe = DuDoCROPPipeline.from_bundle(
                    path, backend="torch", device=device, precision=precision
                )
                rec["operators"] = pipe.operators.name
                for steps in step_list:
                    if not budget.ok(15):
                        rec["truncated"] = True
                        break
                    steps = max(1, int((steps or pipe.config.steps) * step_scale))
                    res, latency = run(pipe, steps)
                    o = res.output.float().cpu().numpy().reshape(target.shape)
                    outputs[(precision, steps)] = o
                    entry = {
                        "latency_s": latency,
                        "timings": {k: float(v) for k, v in res.timings.items()},
                        "psnr_vs_target": float(metrics.psnr(o, target, mask)),
                        "ssim_vs_target": float(metrics.ssim(o, target, mask)),
                        "fp32_reruns": list(getattr(res.qa, "fp32_reruns", []) or []),
                    }
                    entry["loop_overhead"] = _loop_overhead(pipe, res, steps, repeats)
                    rec[f"{precision}_steps_{steps}"] = entry
                pipe.close()
                if device == "cuda":
                    torch.cuda.empty_cache()
            for (prec, steps), o in outputs.items():
                if prec == "fp16" and ("fp32", steps) in outputs:
                    ref = outputs[("fp32", steps)]
                    rec[f"fp16_vs_fp32_steps_{steps}"] = {
                        "psnr_between_db": float(metrics.psnr(o, ref, mask)),
                        "psnr_delta_vs_target_db": float(
                            metrics.psnr(o, target, mask) - metrics.psnr(ref, target, mask)
                        ),
                    }
    return out


def _loop_overhead(pipe: Any, res: Any, steps: int, repeats: int) -> dict:
    import torch

    graphs = pipe.graphs
    step = graphs["unet_image_step"]
    cond_graph = graphs["unet_image_cond"]
    h, w = res.intermediates["x_li"].shape[-2:]
    dev = res.output.device
    d = cond_graph.input_specs["content_emb"].shape[-1]
    emb = torch.zeros(1, d, device=dev)
    cond = cond_graph.infer({"content_emb": emb, "artifact_emb": emb}, copy_outputs=True)["cond"]
    x = torch.rand(1, 1, h, w, device=dev)
    feed = {"x_t": x, "mu": x.clone(), "t": torch.full((1,), 50.0, device=dev), "cond": cond}
    engine = _time_torch(lambda: step.infer(feed), repeats)["median_ms"] / 1e3
    cond_t = (
        _time_torch(lambda: cond_graph.infer({"content_emb": emb, "artifact_emb": emb}), repeats)[
            "median_ms"
        ]
        / 1e3
    )
    loop = float(res.timings["image_sde"])
    return {
        "image_sde_s": loop,
        "engine_step_s": engine,
        "cond_s": cond_t,
        "overhead_fraction": (loop - steps * engine - cond_t) / loop if loop > 0 else None,
    }


TRAIN_CHILD = """
import logging, sys
from pathlib import Path
from mar_rt.train.presets import recipe_config
from mar_rt.train.recipe import train_bundle
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
config, minutes, sources, out = sys.argv[1], float(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
train_bundle(
    sources, out / "bundle", recipe=recipe_config(config, device="cuda"), device="cuda",
    max_minutes=minutes if minutes > 0 else None, work_dir=out / "work", progress=True,
)
"""


def train_gpu(
    budget: Budget, sources: Path, out_dir: Path, configs: tuple[str, ...] = ("smoke", "tiny-gpu")
) -> dict:
    """``train_bundle`` on CUDA: the ``smoke`` preset end to end, then ``tiny-gpu`` under a
    wall-time budget (whatever this section has left).  Each in a child process with a
    timeout; the stage reports (``<work>/ckpt/*.done``, there even after a timeout), the
    child's log and ``train_report.json`` (when the bundle was written) are kept."""
    if not _cuda():
        return {"status": "skipped: no CUDA"}
    if not sources.is_dir():
        return {"status": f"skipped: no sources at {sources} (mar-rt train export-sources)"}
    out: dict[str, Any] = {"sources": str(sources)}
    for config in configs:
        left = budget.left() - 10
        if left < 30:
            out[config] = {"status": "skipped: section budget spent"}
            continue
        # smoke is short and runs unbudgeted; the others stop 25 s before the timeout
        minutes = 0.0 if config == "smoke" else max(0.5, (left - 25) / 60)
        folder = out_dir / f"train_{config}"  # the log and stage reports come back
        folder.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"mar-rt-train-{config}-"))  # caches, weights
        cmd = [sys.executable, "-c", TRAIN_CHILD, config, str(minutes), str(sources), str(scratch)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=left)
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            text = "".join(
                v.decode(errors="replace") if isinstance(v, bytes) else (v or "")
                for v in (exc.stdout, exc.stderr)
            )
            rc = "timeout"
        (folder / "train.log").write_text(text)
        rec: dict[str, Any] = {
            "returncode": rc,
            "max_minutes": minutes or None,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        done = scratch / "work" / "ckpt"
        if done.is_dir():
            rec["stages_done"] = {
                p.stem: json.loads(p.read_text()) for p in sorted(done.glob("*.done"))
            }
        report = scratch / "bundle" / "train_report.json"
        if report.is_file():
            shutil.copy(report, folder / "train_report.json")
        shutil.rmtree(scratch, ignore_errors=True)
        rec["log_tail"] = text.strip().splitlines()[-15:]
        out[config] = rec
        log.info(
            "train %s: rc %s in %.0f s; stages %s",
            config,
            rc,
            rec["wall_s"],
            sorted(rec.get("stages_done", {})),
        )
    return out


GPU_TEST_FILES = (
    "tests/kernels/test_gpu.py",
    "tests/ct/test_projector.py",
    "tests/ct/test_mar.py",
    "tests/runtime/test_sampler.py",
    "tests/runtime/test_operators.py",
    "tests/runtime/test_pipeline_gpu.py",
)


def gpu_tests(budget: Budget) -> dict:
    reason = _need_gpu()
    if reason:
        return {"status": reason}
    results = {}
    for path in GPU_TEST_FILES:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", path]
        if not budget.ok(5):
            results[path] = {"status": "skipped: section budget spent"}
            continue
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, cwd=ROOT, timeout=max(10.0, budget.left())
            )
        except subprocess.TimeoutExpired:
            results[path] = {"status": "error: pytest timed out"}
            continue
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        results[path] = {
            "returncode": proc.returncode,
            "summary": lines[-1] if lines else "",
            "tail": lines[-30:],
        }
        log.info("%s: %s", path, results[path]["summary"])
    return {"files": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for device_check.{log,json}")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per GPU figure")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="total seconds")
    parser.add_argument("--only", nargs="*", default=None, help="run only these sections")
    parser.add_argument(
        "--train-sources",
        default=str(ROOT / ".gpu_data" / "sources"),
        help="clean slices for train_gpu (mar-rt train export-sources --out ...)",
    )
    parser.add_argument(
        "--train-configs", nargs="*", default=["smoke", "tiny-gpu"], help="train_gpu presets"
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(out_dir / "device_check.log"), logging.StreamHandler()],
    )
    os.environ.setdefault("MAR_RT_CACHE", str(Path(tempfile.gettempdir()) / "mar-rt-cache"))
    deadline = time.monotonic() + args.budget
    r = args.repeats
    sections: list[tuple[str, float, Callable[[Budget], dict]]] = [
        ("environment", 20, environment),
        ("build", 90, build_section),
        ("host_parity", 40, host_parity),
        ("gpu_parity", 60, gpu_parity),
        ("adjoint", 20, adjoint),
        ("kernel_timings", 100, lambda b: kernel_timings(b, r)),
        ("kernel_variants", 60, lambda b: kernel_variants(b, r)),
        ("sde_step", 20, lambda b: sde_step_section(b, r)),
        ("unet_step", 60, lambda b: unet_step(b, r)),
        ("pipeline", 200, lambda b: pipeline(b, 10)),
        ("gpu_tests", 150, gpu_tests),
        (
            "train_gpu",
            240,
            lambda b: train_gpu(b, Path(args.train_sources), out_dir, tuple(args.train_configs)),
        ),
    ]
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "sections": {}}
    json_path = out_dir / "device_check.json"
    for name, seconds, fn in sections:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        if time.monotonic() >= deadline:
            entry: dict[str, Any] = {"status": "skipped: total time budget spent"}
        else:
            log.info("section %s (budget %.0f s)", name, seconds)
            try:
                entry = fn(Budget(seconds, deadline))
                entry.setdefault("status", "ok")
            except Exception as exc:  # noqa: BLE001 - every section records its error
                entry = {
                    "status": f"error: {type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-3000:],
                }
                log.error("section %s failed: %s", name, exc)
        entry["elapsed_s"] = round(time.perf_counter() - t0, 2)
        entry["budget_s"] = seconds
        report["sections"][name] = entry
        log.info("section %s: %s in %.1f s", name, entry["status"], entry["elapsed_s"])
        json_path.write_text(json.dumps(report, indent=2, default=str))
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    json_path.write_text(json.dumps(report, indent=2, default=str))
    log.info("wrote %s", json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
