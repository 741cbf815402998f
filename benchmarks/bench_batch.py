"""Benchmark: `mar-rt batch` on a local Ray (1 and 2 CPU workers) against a plain loop of
``run_study`` over the same series, in one run, torch single-threaded everywhere.

Inputs: ``--series`` .npy series of ``--slices`` slices each (64² phantoms with a titanium
disc, every slice goes through the pipeline), an untrained ``--config`` bundle on the 64²
test geometry (or ``--bundle``), ``--steps`` SDE steps per loop.

- **loop**: one pipeline opened once (not timed), then ``run_study`` per series; run before
  and after the Ray runs (the machine's load drifts), the faster pass counts.
- **ray, N workers**: ``run_batch`` into a fresh folder on one local Ray (started once,
  ``--cpus`` CPUs). Every worker opens its pipeline before the first series starts, so the
  steady span runs from the first series' start to the last one's end (ledger times).
  - series/min = series / span;
  - Ray's overhead per series (1 worker) = span / series − the worker's mean time inside
    a series (hash + ``run_study``): what scheduling, transfer and the ledger add, measured
    in the same run; the target is ≤ 10% of the compute.  Against the loop it is
    span / series − loop time per series (sensitive to load drift on a shared machine);
  - speed-up = series/min with 2 workers / with 1; the target on 2 free cores is ≥ 1.6×.
- The end-to-end wall time (Ray start and worker start-up included) is reported apart, and
  the 1-minute load average before each part (the figures mean little when it exceeds the
  cores).

    python benchmarks/bench_batch.py [--series 8] [--slices 4] [--steps 10]
        [--config micro|tiny] [--bundle PATH] [--cpus 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

SIZE = 64


def _phantom(n: int, seed: int) -> np.ndarray:
    """(n, 64, 64) μ: a water ellipse, a bone disc and a titanium disc, light noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    body = (xx / 26) ** 2 + (yy / 20) ** 2 <= 1
    img = np.where(body, 0.192, 0.0)
    img = np.where((xx - 8) ** 2 + (yy + 4) ** 2 <= 16, 0.35, img)
    img = np.where((xx + 9) ** 2 + (yy - 3) ** 2 <= 9, 2.412, img)
    return (img[None] + rng.normal(0, 0.002, (n, SIZE, SIZE)) * body).astype(np.float32)


def _bundle(args: argparse.Namespace, tmp: Path) -> Path:
    if args.bundle:
        return Path(args.bundle)
    from mar_rt.runtime.config import PipelineConfig
    from mar_rt.runtime.demo import make_untrained_bundle, small_geometry

    folder = tmp / f"bundle-{args.config}"
    make_untrained_bundle(
        folder,
        config=args.config,
        geometry=small_geometry(SIZE),
        pipeline=PipelineConfig(steps=args.steps, image_size=SIZE),
    )
    return folder


def _loop(files: list[Path], bundle: Path, out: Path, steps: int) -> dict:
    import torch

    from mar_rt.runtime.study import open_pipeline, run_study

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with open_pipeline(bundle, backend="torch", device="cpu") as pipe:
        open_s = time.perf_counter() - t0
        times = []
        for f in files:
            t = time.perf_counter()
            run_study(f, pipe, out, units="mu", steps=steps, preview=False)
            times.append(time.perf_counter() - t)
    total = sum(times)
    return {
        "open_s": open_s,
        "total_s": total,
        "per_series_s": total / len(files),
        "series_per_min": 60 * len(files) / total,
    }


def _ray(files: list[Path], bundle: Path, out: Path, steps: int, workers: int) -> dict:
    from mar_rt.batch import BatchConfig, SeriesOptions, run_batch, scan_inputs

    series = scan_inputs(files, options=SeriesOptions(units="mu", steps=steps)).series
    config = BatchConfig(
        out=out,
        bundle=bundle,
        backend="torch",
        device="cpu",
        workers=workers,
        torch_threads=1,
        preview=False,
    )
    t0 = time.perf_counter()
    summary = run_batch(series, config)
    wall = time.perf_counter() - t0
    records = summary.records
    assert len(summary.done) == len(files), [r.get("error") for r in summary.failed]
    start = min(datetime.fromisoformat(r["started_utc"]) for r in records)
    end = max(datetime.fromisoformat(r["finished_utc"]) for r in records)
    span = (end - start).total_seconds()
    return {
        "workers": workers,
        "wall_s": wall,
        "span_s": span,
        "series_per_min": 60 * len(files) / span,
        "per_series_s": span / len(files),
        "mean_worker_s": statistics.mean(r["timings_s"]["worker"] for r in records),
        "mean_run_study_s": statistics.mean(r["timings_s"]["total"] for r in records),
        "pids": len({r["pid"] for r in records}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--config", default="micro", choices=["micro", "tiny"])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp_name:
        tmp = Path(tmp_name)
        bundle = _bundle(args, tmp)
        src = tmp / "in"
        src.mkdir()
        files = []
        for i in range(args.series):
            files.append(src / f"s{i:03d}.npy")
            np.save(files[-1], _phantom(args.slices, seed=i))

        load = {"loop_1": os.getloadavg()[0]}
        loop_1 = _loop(files, bundle, tmp / "loop1", args.steps)
        ray.init(
            num_cpus=args.cpus,
            object_store_memory=200_000_000,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
        try:
            load["ray_1"] = os.getloadavg()[0]
            one = _ray(files, bundle, tmp / "ray1", args.steps, 1)
            load["ray_2"] = os.getloadavg()[0]
            two = _ray(files, bundle, tmp / "ray2", args.steps, 2)
        finally:
            ray.shutdown()
        load["loop_2"] = os.getloadavg()[0]
        loop_2 = _loop(files, bundle, tmp / "loop2", args.steps)

    loop = min(loop_1, loop_2, key=lambda r: r["per_series_s"])
    overhead = one["per_series_s"] - one["mean_worker_s"]
    vs_loop = one["per_series_s"] - loop["per_series_s"]
    result = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": sys.version.split()[0],
        "ray": ray.__version__,
        "load_avg_1min": {k: round(v, 2) for k, v in load.items()},
        "args": vars(args),
        "loop_passes": [loop_1, loop_2],
        "loop": loop,
        "ray_1_worker": one,
        "ray_2_workers": two,
        "ray_overhead_per_series_s": overhead,
        "ray_overhead_fraction_of_compute": overhead / one["mean_worker_s"],
        "ray_1_worker_vs_loop_per_series_s": vs_loop,
        "ray_1_worker_vs_loop_fraction": vs_loop / loop["per_series_s"],
        "speedup_2_vs_1": two["series_per_min"] / one["series_per_min"],
    }
    loads = ", ".join(f"{k} {v:.1f}" for k, v in load.items())
    print(
        f"{args.series} series × {args.slices} slices (64², {args.config} bundle, "
        f"{args.steps} steps), torch 1 thread, Ray {ray.__version__}; load average: {loads}"
    )
    print(f"{'run':<16}{'series/min':>12}{'s/series':>10}{'wall s':>9}")
    for name, r in (("loop, pass 1", loop_1), ("loop, pass 2", loop_2)):
        print(
            f"{name:<16}{r['series_per_min']:>12.2f}{r['per_series_s']:>10.3f}"
            f"{r['total_s'] + r['open_s']:>9.1f}"
        )
    for name, r in (("ray 1 worker", one), ("ray 2 workers", two)):
        print(
            f"{name:<16}{r['series_per_min']:>12.2f}{r['per_series_s']:>10.3f}{r['wall_s']:>9.1f}"
        )
    print(
        "Ray overhead per series (1 worker, span/series − time inside the series): "
        f"{overhead * 1000:.0f} ms = {100 * result['ray_overhead_fraction_of_compute']:.1f}% "
        "of compute (target ≤ 10%)"
    )
    print(
        f"1 worker vs the faster loop pass: {vs_loop * 1000:+.0f} ms per series "
        f"({100 * result['ray_1_worker_vs_loop_fraction']:+.1f}%)"
    )
    print(f"2 workers / 1 worker: {result['speedup_2_vs_1']:.2f}× (target ≥ 1.6× on 2 free cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
