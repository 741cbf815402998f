"""Benchmark: torch eager against ONNX Runtime (CPU by default) or TensorRT (``--backend
tensorrt --device cuda``), per graph and for one full DuDoCROP pipeline run, in one process.

Per graph: batch 1 feeds at the bundle's shapes, one warm-up call each, then ``--repeats``
calls alternating torch / ORT; the table shows medians and the ORT/torch ratio (< 1: ORT is
faster; the target for the U-Net step graphs is ≤ 0.8).  The pipeline row runs the demo slice
with a metal disc for ``--steps`` SDE steps per loop on both backends (same seed): the first
call (session warm-up included) and the median of ``--pipeline-repeats`` further calls, and
the PSNR between the two outputs.

Without ``--bundle`` an untrained bundle of ``--config`` (default ``tiny``, the demo
networks) on the SynDeepLesion geometry is written to a temporary folder; ``build-engines``
(ONNX export + verification + ORT optimised models) runs first and its time is reported apart.

    python benchmarks/bench_backends.py [--bundle PATH | --config tiny|micro|paper]
        [--repeats 5] [--threads N] [--steps 2] [--precision fp32|fp16] [--device cpu|cuda]
        [--backend onnxruntime|tensorrt]
        [--no-pipeline] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bundle(args: argparse.Namespace, tmp: Path) -> Path:
    if args.bundle:
        return Path(args.bundle)
    from mar_rt.runtime.config import PipelineConfig
    from mar_rt.runtime.demo import make_untrained_bundle

    folder = tmp / f"bench-{args.config}"
    print(f"writing an untrained {args.config} bundle to {folder}")
    make_untrained_bundle(folder, config=args.config, pipeline=PipelineConfig(steps=args.steps))
    return folder


def _time_graphs(bundle_path: Path, args: argparse.Namespace) -> list[dict]:
    from mar_rt.export.verify import random_feed
    from mar_rt.models.bundle import load_bundle
    from mar_rt.runtime.backends import GraphSet

    bundle = load_bundle(bundle_path)
    device = torch.device(args.device)
    options = {"threads": args.threads} if args.backend == "onnxruntime" else {}
    ort = GraphSet.from_bundle(
        bundle, args.backend, device=device, precision=args.precision, **options
    )
    ref = GraphSet.from_bundle(bundle, "torch", device=device)
    rows = []
    with ort, ref:
        for graph in ort:
            feed = {k: v.to(device) for k, v in random_feed(ort[graph].spec, 1, seed=0).items()}
            times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
            runners = {"torch": ref[graph], "onnxruntime": ort[graph]}
            for runner in runners.values():
                runner.infer(feed)  # warm-up (buffers, first-call allocations)
            for _ in range(args.repeats):
                for name, runner in runners.items():
                    _sync(device)
                    start = time.perf_counter()
                    runner.infer(feed)
                    _sync(device)
                    times[name].append(time.perf_counter() - start)
            t_torch = statistics.median(times["torch"])
            t_ort = statistics.median(times["onnxruntime"])
            err = max(
                (ort[graph].infer(feed)[k] - ref[graph].infer(feed)[k]).abs().max().item()
                for k in ort[graph].output_specs
            )
            row = {
                "graph": graph,
                "torch_ms": 1e3 * t_torch,
                "ort_ms": 1e3 * t_ort,
                "ratio": t_ort / t_torch,
                "max_abs_diff": err,
                "engine_set": str(ort[graph].engine_folder),
            }
            rows.append(row)
            print(
                f"{graph:<22}{row['torch_ms']:>11.1f}{row['ort_ms']:>11.1f}"
                f"{row['ratio']:>8.2f}{err:>11.1e}",
                flush=True,
            )
    return rows


def _pipeline(bundle_path: Path, args: argparse.Namespace) -> dict:
    from mar_rt.runtime.demo import load_demo_slice
    from mar_rt.runtime.pipeline import DuDoCROPPipeline

    x = torch.from_numpy(load_demo_slice())
    size = x.shape[-1]
    r, c = np.ogrid[:size, :size]
    disc = (r - size * 0.55) ** 2 + (c - size * 0.62) ** 2 <= (size / 32) ** 2
    x[torch.from_numpy(disc)] = 2.4
    result: dict = {"steps": args.steps}
    outputs = {}
    for backend in ("torch", args.backend):
        options = {"threads": args.threads} if backend == "onnxruntime" else {}
        precision = args.precision if backend != "torch" else "fp32"
        with DuDoCROPPipeline.from_bundle(
            bundle_path, backend=backend, device=args.device, precision=precision, **options
        ) as pipe:
            if tuple(x.shape) != pipe.geometry.image_shape:
                x = torch.nn.functional.interpolate(
                    x[None, None], size=pipe.geometry.image_shape, mode="area"
                )[0, 0]
            start = time.perf_counter()
            out = pipe(x, steps=args.steps, seed=5)  # cold: first-call allocations included
            cold = time.perf_counter() - start
            warm = []
            for _ in range(args.pipeline_repeats):
                start = time.perf_counter()
                out = pipe(x, steps=args.steps, seed=5)
                warm.append(time.perf_counter() - start)
            name = "torch" if backend == "torch" else "onnxruntime"  # the "fast" slot
            result[f"{name}_cold_s"] = cold
            result[f"{name}_s"] = statistics.median(warm) if warm else cold
            result[f"{name}_stages"] = out.timings
            outputs[name] = out.output.cpu()
    result["backend"] = args.backend
    result["ratio"] = result["onnxruntime_s"] / result["torch_s"]
    a = (outputs["onnxruntime"].clamp(0, 0.5) / 0.5).double()
    b = (outputs["torch"].clamp(0, 0.5) / 0.5).double()
    mse = float(((a - b) ** 2).mean())
    result["psnr_db"] = float("inf") if mse == 0 else 10 * float(np.log10(1 / mse))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=str, default=None)
    parser.add_argument("--config", default="tiny", choices=("micro", "tiny", "paper"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--pipeline-repeats", type=int, default=2)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()

    from mar_rt.export.build import build_engines
    from mar_rt.export.ort import physical_cores

    args.threads = args.threads or physical_cores()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bundle_path = _bundle(args, Path(tmp))
        start = time.perf_counter()
        summary = build_engines(
            bundle_path,
            backend=args.backend,
            precision=args.precision,
            device=args.device if args.backend == "onnxruntime" else None,
        )
        build_s = time.perf_counter() - start
        print(
            f"build-engines: {build_s:.1f} s (exported {len(summary.exported)}, "
            f"cache hit {summary.cache_hit}) → {summary.engine_dir.name}"
        )
        print(f"threads: torch {torch.get_num_threads()}, onnxruntime {args.threads}")
        fast = "ORT ms" if args.backend == "onnxruntime" else "TRT ms"
        print(f"{'graph':<22}{'torch ms':>11}{fast:>11}{'ratio':>8}{'max|Δ|':>11}")
        rows = _time_graphs(bundle_path, args)
        pipeline = None
        if not args.no_pipeline:
            pipeline = _pipeline(bundle_path, args)
            print(
                f"{'pipeline (warm)':<22}{1e3 * pipeline['torch_s']:>11.0f}"
                f"{1e3 * pipeline['onnxruntime_s']:>11.0f}{pipeline['ratio']:>8.2f}"
                f"   PSNR(fast, torch) {pipeline['psnr_db']:.1f} dB, {args.steps} steps"
            )
            cold = pipeline["onnxruntime_cold_s"] / pipeline["torch_cold_s"]
            print(
                f"{'pipeline (1st call)':<22}{1e3 * pipeline['torch_cold_s']:>11.0f}"
                f"{1e3 * pipeline['onnxruntime_cold_s']:>11.0f}{cold:>8.2f}"
            )
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "config": args.config if not args.bundle else args.bundle,
        "precision": args.precision,
        "device": args.device,
        "build_engines_s": build_s,
        "graphs": rows,
        "pipeline": pipeline,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
