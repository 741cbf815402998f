"""Kernel timings: the host build (CPU fast path) and the CuPy kernels against their baselines.

CPU (always): forward projection, back-projection and FBP at the SynDeepLesion protocol
(416², 640 views × 641 bins), batch 1, for
  * ``host``   — mar_rt.kernels.host (nvcc + OpenMP build of cuda/*.cu);
  * ``torch``  — the reference mar_rt.ct (sparse tables; built once, not timed, reported);
  * ``astra``  — ASTRA's CPU ``line_fanflat`` projector (FP / BP; ASTRA has no CPU fan FBP).
GPU (when CuPy and a CUDA device are present): CuPy kernels against the torch-CUDA reference,
batch 1 and 16, timed with CUDA events.

Every figure is the median of ``--repeats`` runs after one warm-up, measured in the same run
as its baseline; ratios are ours / baseline (< 1 is faster).

Usage::

    python benchmarks/bench_kernels.py                 # table
    python benchmarks/bench_kernels.py --json out.json # also JSON ('-' for stdout)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SDL_CASE = ROOT.parent / "shared" / "data" / "syndeeplesion" / "train" / "000129_03_01" / "115"


# --------------------------------------------------------------------------- inputs
def test_image() -> tuple[np.ndarray, str]:
    """The SynDeepLesion case's clean image (μ, 416²) if present, else a seeded phantom."""
    gt = SDL_CASE / "gt.h5"
    if gt.is_file():
        try:
            import h5py

            with h5py.File(gt) as f:
                return f["image"][()].astype(np.float32), str(gt)
        except (ImportError, OSError):
            pass
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:416, 0:416]
    img = 0.2 * (((yy - 208) / 170.0) ** 2 + ((xx - 208) / 150.0) ** 2 < 1)
    img = img + 0.01 * rng.standard_normal((416, 416))
    return img.astype(np.float32), "phantom"


# --------------------------------------------------------------------------- timing
def summary(times_s: list[float]) -> dict[str, float]:
    """Median / min / max in milliseconds."""
    ms = [1e3 * t for t in times_s]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "n": len(ms),
    }


def time_cpu(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Wall time of ``fn`` (median of ``repeats`` after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summary(times)


def time_cuda(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> dict[str, float]:
    """GPU time of ``fn`` between two CUDA events on the default stream (CuPy and torch both
    launch there unless told otherwise)."""
    import cupy as cp

    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return summary(times)


def ratio(ours: dict | None, base: dict | None) -> float | None:
    if not ours or not base:
        return None
    return ours["median_ms"] / base["median_ms"]


def rel_diff(a: Any, b: Any) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --------------------------------------------------------------------------- CPU
def astra_operators(geometry: Any) -> tuple[Callable, Callable, Callable] | None:
    """ASTRA CPU line_fanflat FP and BP closures on preallocated data, or None without ASTRA.

    Geometry as DESIGN §4: fanflat, angles − π/2, source/detector distances R and D, volume
    ±(W·pixel)/2.  Returns (forward(image) → sino, back(sino) → image, cleanup).
    """
    try:
        import astra
    except ImportError:
        return None
    g = geometry
    half_w, half_h = g.n_cols * g.pixel_size / 2, g.n_rows * g.pixel_size / 2
    vol = astra.create_vol_geom(g.n_rows, g.n_cols, -half_w, half_w, -half_h, half_h)
    proj = astra.create_proj_geom(
        "fanflat",
        g.det_spacing,
        g.n_det,
        g.angles() - math.pi / 2,
        g.source_distance,
        g.detector_distance,
    )
    pid = astra.create_projector("line_fanflat", proj, vol)
    vid = astra.data2d.create("-vol", vol, 0.0)
    sid = astra.data2d.create("-sino", proj, 0.0)
    cfg_fp = astra.astra_dict("FP")
    cfg_fp.update(ProjectorId=pid, VolumeDataId=vid, ProjectionDataId=sid)
    cfg_bp = astra.astra_dict("BP")
    cfg_bp.update(ProjectorId=pid, ReconstructionDataId=vid, ProjectionDataId=sid)
    fp, bp = astra.algorithm.create(cfg_fp), astra.algorithm.create(cfg_bp)

    def forward(image: np.ndarray) -> np.ndarray:
        astra.data2d.store(vid, image)
        astra.algorithm.run(fp)
        return astra.data2d.get_shared(sid)

    def back(sino: np.ndarray) -> np.ndarray:
        astra.data2d.store(sid, sino)
        astra.algorithm.run(bp)
        return astra.data2d.get_shared(vid)

    def cleanup() -> None:
        astra.algorithm.delete([fp, bp])
        astra.data2d.delete([vid, sid])
        astra.projector.delete(pid)

    return forward, back, cleanup


def cpu_benchmark(repeats: int, *, torch_ref: bool = True, astra: bool = True) -> dict:
    """Host build vs torch reference vs ASTRA CPU, batch 1 at the SynDeepLesion protocol."""
    import torch

    from mar_rt.ct.geometry import FanBeamGeometry
    from mar_rt.kernels import build, host

    g = FanBeamGeometry.syndeeplesion()
    image, source = test_image()
    out: dict[str, Any] = {
        "geometry": "416² / 640 × 641",
        "image": source,
        "threads": {
            "omp": os.environ.get("OMP_NUM_THREADS", "all"),
            "cpus": os.cpu_count(),
            "torch": torch.get_num_threads(),
        },
        "repeats": repeats,
        "load_average_before": os.getloadavg(),
    }
    ok, why = build.host_available()
    if not ok:
        out["skipped"] = f"host build unavailable: {why}"
        return out
    t0 = time.perf_counter()
    proj = host.get_host_projector(g)
    out["host_tables_ms"] = 1e3 * (time.perf_counter() - t0)
    sino = proj.forward(image)
    times: dict[str, dict] = {}
    times["host_forward"] = time_cpu(lambda: proj.forward(image), repeats)
    times["host_back_scatter"] = time_cpu(lambda: proj.adjoint(sino), repeats)
    times["host_back_gather"] = time_cpu(lambda: proj.adjoint(sino, method="gather"), repeats)
    times["host_fbp"] = time_cpu(lambda: proj.fbp(sino), repeats)

    if torch_ref:
        from mar_rt.ct.projector import Projector

        xt, st = torch.from_numpy(image), torch.from_numpy(np.ascontiguousarray(sino))
        t0 = time.perf_counter()
        ref = Projector(g)
        ref.forward(xt), ref.adjoint(st), ref.fbp(st)  # builds and caches every table
        out["torch_tables_ms"] = 1e3 * (time.perf_counter() - t0)
        times["torch_forward"] = time_cpu(lambda: ref.forward(xt), repeats)
        times["torch_back"] = time_cpu(lambda: ref.adjoint(st), repeats)
        times["torch_fbp"] = time_cpu(lambda: ref.fbp(st), repeats)
        out["parity_vs_torch"] = {
            "forward": rel_diff(sino, ref.forward(xt)),
            "back": rel_diff(proj.adjoint(sino), ref.adjoint(st)),
            "fbp": rel_diff(proj.fbp(sino), ref.fbp(st)),
        }
    if astra:
        ops = astra_operators(g)
        if ops is None:
            out["astra"] = "not installed"
        else:
            forward, back, cleanup = ops
            try:
                times["astra_forward"] = time_cpu(lambda: forward(image), repeats)
                times["astra_back"] = time_cpu(lambda: back(sino), repeats)
                # a sanity check that the geometries agree (line vs Joseph weights: ~1 %)
                out["astra_vs_host_forward_reldiff"] = rel_diff(forward(image).copy(), sino)
            finally:
                cleanup()
    out["times"] = times
    out["load_average_after"] = os.getloadavg()
    out["ratios"] = {
        "forward_vs_astra": ratio(times.get("host_forward"), times.get("astra_forward")),
        "back_vs_astra": ratio(times.get("host_back_scatter"), times.get("astra_back")),
        "back_gather_vs_astra": ratio(times.get("host_back_gather"), times.get("astra_back")),
        "forward_vs_torch": ratio(times.get("host_forward"), times.get("torch_forward")),
        "back_vs_torch": ratio(times.get("host_back_scatter"), times.get("torch_back")),
        "fbp_vs_torch": ratio(times.get("host_fbp"), times.get("torch_fbp")),
    }
    return out


# --------------------------------------------------------------------------- GPU
def gpu_benchmark(repeats: int, batches: tuple[int, ...] = (1, 16)) -> dict:
    """CuPy kernels vs the torch-CUDA reference, CUDA events, per batch size."""
    try:
        import cupy as cp
        import torch

        from mar_rt.kernels import gpu
    except ImportError as exc:
        return {"skipped": f"no CuPy/torch: {exc}"}
    ok, why = gpu.gpu_available()
    if not ok or not torch.cuda.is_available():
        return {"skipped": f"no CUDA: {why if not ok else 'torch sees no GPU'}"}
    from mar_rt.ct.geometry import FanBeamGeometry
    from mar_rt.ct.projector import get_projector

    g = FanBeamGeometry.syndeeplesion()
    image, _ = test_image()
    proj = gpu.get_gpu_projector(g)
    ref = get_projector(g, "cuda", torch.float32)
    result: dict[str, Any] = {"device": why, "repeats": repeats, "batches": {}}
    for b in batches:
        result["batches"][str(b)] = _gpu_batch(proj, ref, image, b, repeats)
        cp.get_default_memory_pool().free_all_blocks()
    return result


def _gpu_batch(proj: Any, ref: Any, image: np.ndarray, b: int, repeats: int) -> dict:
    """One batch size: CuPy kernels (preallocated outputs) vs the torch-CUDA reference."""
    import cupy as cp
    import torch

    x = cp.asarray(np.broadcast_to(image, (b, *image.shape)).copy())
    xt = torch.as_tensor(x, device="cuda")
    y = proj.forward(x)
    yt = torch.as_tensor(y, device="cuda")
    y_out, x_out = cp.empty_like(y), cp.empty_like(x)
    ref.forward(xt), ref.adjoint(yt), ref.fbp(yt)  # table builds, not timed
    t: dict[str, dict] = {
        "cupy_forward": time_cuda(lambda: proj.forward(x, out=y_out), repeats),
        "cupy_back_gather": time_cuda(lambda: proj.adjoint(y, out=x_out), repeats),
        "cupy_back_scatter": time_cuda(
            lambda: proj.adjoint(y, out=x_out, method="scatter"), repeats
        ),
        "cupy_fbp": time_cuda(lambda: proj.fbp(y, out=x_out), repeats),
        "torch_forward": time_cuda(lambda: ref.forward(xt), repeats),
        "torch_back": time_cuda(lambda: ref.adjoint(yt), repeats),
        "torch_fbp": time_cuda(lambda: ref.fbp(yt), repeats),
    }
    return {
        "times": t,
        "ratios": {
            "forward_vs_torch": ratio(t["cupy_forward"], t["torch_forward"]),
            "back_gather_vs_torch": ratio(t["cupy_back_gather"], t["torch_back"]),
            "back_scatter_vs_torch": ratio(t["cupy_back_scatter"], t["torch_back"]),
            "fbp_vs_torch": ratio(t["cupy_fbp"], t["torch_fbp"]),
        },
    }


# --------------------------------------------------------------------------- report
def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def print_report(report: dict) -> None:
    cpu = report.get("cpu", {})
    print(
        f"CPU — {cpu.get('geometry', '')}, image {cpu.get('image', '')}, "
        f"threads {cpu.get('threads', {})}, repeats {cpu.get('repeats', '')}"
    )
    if "skipped" in cpu:
        print(f"  skipped: {cpu['skipped']}")
    for name, s in cpu.get("times", {}).items():
        print(
            f"  {name:<22} {s['median_ms']:9.1f} ms  (min {s['min_ms']:.1f}, max {s['max_ms']:.1f})"
        )
    for name, v in cpu.get("ratios", {}).items():
        print(f"  ratio {name:<24} {_fmt(v)}")
    for key in (
        "parity_vs_torch",
        "astra_vs_host_forward_reldiff",
        "host_tables_ms",
        "torch_tables_ms",
        "load_average_before",
        "load_average_after",
    ):
        if key in cpu:
            print(f"  {key}: {cpu[key]}")
    gpu_rep = report.get("gpu", {})
    if "skipped" in gpu_rep:
        print(f"GPU — skipped: {gpu_rep['skipped']}")
        return
    print(f"GPU — {gpu_rep.get('device', '')}, repeats {gpu_rep.get('repeats', '')}")
    for b, part in gpu_rep.get("batches", {}).items():
        for name, s in part["times"].items():
            print(f"  batch {b:>2} {name:<20} {s['median_ms']:9.3f} ms")
        for name, v in part["ratios"].items():
            print(f"  batch {b:>2} ratio {name:<22} {_fmt(v)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="CPU runs per figure (≥ 3)")
    parser.add_argument("--gpu-repeats", type=int, default=20, help="GPU runs per figure")
    parser.add_argument("--json", default=None, help="write JSON here ('-' for stdout)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch reference")
    parser.add_argument("--no-astra", action="store_true", help="skip ASTRA")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU part")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU part")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    report: dict[str, Any] = {}
    if not args.no_cpu:
        report["cpu"] = cpu_benchmark(
            args.repeats, torch_ref=not args.no_torch, astra=not args.no_astra
        )
    report["gpu"] = {"skipped": "--no-gpu"} if args.no_gpu else gpu_benchmark(args.gpu_repeats)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
