"""Benchmark: Joseph forward projection, its adjoint and FBP against ASTRA's CPU line_fanflat.

SynDeepLesion geometry (416², 640 views × 641 bins), float32, batch 1 by default.  Ours and
ASTRA run alternately in the same process, after a warm-up, and the table reports medians
and our/ASTRA ratios (< 1: ours is faster).  ASTRA's CPU algorithms have no fan-beam FBP, so
the FBP row compares against our ramp filter followed by ASTRA's back-projection (the cost of
an FBP built on ASTRA; not the same weighting).  One-time table builds are reported apart.

    python benchmarks/bench_projector.py [--repeats 5] [--batch 1] [--device cpu]
                                         [--threads N] [--no-astra] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.projector import Projector
from mar_rt.ct.ramp import filter_sinogram

SDL_GT = Path(__file__).resolve().parents[1].parent / "shared/data/syndeeplesion/train"
SDL_GT = SDL_GT / "000129_03_01/115/gt.h5"


def _phantom(g: FanBeamGeometry) -> np.ndarray:
    """The official gt image when present, else a water ellipse with a bone ring."""
    if SDL_GT.exists():
        import h5py

        with h5py.File(SDL_GT, "r") as f:
            return f["image"][()].astype(np.float32)
    xs, ys = g.pixel_centres()
    rr = (xs[None, :] / 7.0) ** 2 + (ys[:, None] / 5.5) ** 2
    return (0.192 * (rr < 1) + 0.3 * ((rr > 0.8) & (rr < 0.9))).astype(np.float32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class _Astra:
    """ASTRA CPU line_fanflat FP/BP through the algorithm API (data objects made once)."""

    def __init__(self, g: FanBeamGeometry) -> None:
        import astra

        self.astra = astra
        half = g.n_cols * g.pixel_size / 2
        vol = astra.create_vol_geom(g.n_rows, g.n_cols, -half, half, -half, half)
        geo = astra.create_proj_geom(
            "fanflat", g.det_spacing, g.n_det, g.angles() - np.pi / 2,
            g.source_distance, g.detector_distance,
        )  # fmt: skip
        self.pid = astra.create_projector("line_fanflat", geo, vol)
        self.vid = astra.data2d.create("-vol", vol, 0)
        self.sid = astra.data2d.create("-sino", geo, 0)
        self.fp = self._algorithm("FP", ProjectionDataId=self.sid, VolumeDataId=self.vid)
        self.bp = self._algorithm("BP", ProjectionDataId=self.sid, ReconstructionDataId=self.vid)

    def _algorithm(self, kind: str, **ids: int) -> int:
        cfg = self.astra.astra_dict(kind)
        cfg["ProjectorId"] = self.pid
        cfg.update(ids)
        return self.astra.algorithm.create(cfg)

    def forward(self, image: np.ndarray) -> np.ndarray:
        self.astra.data2d.store(self.vid, image)
        self.astra.algorithm.run(self.fp)
        return self.astra.data2d.get(self.sid)

    def back(self, sino: np.ndarray) -> np.ndarray:
        self.astra.data2d.store(self.sid, sino)
        self.astra.algorithm.run(self.bp)
        return self.astra.data2d.get(self.vid)

    def close(self) -> None:
        self.astra.algorithm.delete([self.fp, self.bp])
        self.astra.data2d.delete([self.vid, self.sid])
        self.astra.projector.delete(self.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per operator (≥ 3)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (ours)")
    parser.add_argument("--device", default="cpu", help="torch device for ours (ASTRA: CPU)")
    parser.add_argument("--no-astra", action="store_true", help="time ours only")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = max(3, args.repeats)
    device = torch.device(args.device)

    g = FanBeamGeometry.syndeeplesion()
    image_np = _phantom(g)
    image = torch.from_numpy(image_np).to(device).expand(args.batch, *g.image_shape).contiguous()
    if args.batch == 1:
        image = image[0]

    proj = Projector(g, device=device, dtype=torch.float32)
    setup = {
        "forward_table_s": _time(lambda: proj.forward(image), device),
        "adjoint_table_s": 0.0,
        "fbp_table_s": 0.0,
    }
    sino = proj.forward(image)
    setup["adjoint_table_s"] = _time(lambda: proj.adjoint(sino), device)
    setup["fbp_table_s"] = _time(lambda: proj.fbp(sino), device)

    ours = {
        "forward": lambda: proj.forward(image),
        "back-projection": lambda: proj.adjoint(sino),
        "fbp": lambda: proj.fbp(sino),
    }
    baseline: dict[str, Callable[[], object]] = {}
    checks: dict[str, float] = {}
    astra_version = None
    if not args.no_astra:
        try:
            import astra

            astra_version = astra.__version__
            ref = _Astra(g)
        except ImportError:
            ref = None
        if ref is not None:
            sino_np = sino.reshape(-1, *g.sino_shape)[0].cpu().numpy()
            baseline = {
                "forward": lambda: ref.forward(image_np),
                "back-projection": lambda: ref.back(sino_np),
                "fbp": lambda: ref.back(filter_sinogram(torch.from_numpy(sino_np), g).numpy()),
            }
            theirs = ref.forward(image_np)
            checks["forward_mre_vs_astra"] = float(
                np.abs(sino_np - theirs).mean() / np.abs(theirs).mean()
            )
            their_bp = ref.back(sino_np)
            our_bp = proj.adjoint(sino).reshape(-1, *g.image_shape)[0].cpu().numpy()
            checks["back_mre_vs_astra"] = float(
                np.abs(our_bp - their_bp).mean() / np.abs(their_bp).mean()
            )

    rows = []
    for name, fn in ours.items():
        other = baseline.get(name)
        fn()  # warm-up
        if other is not None:
            other()
        ours_runs, their_runs = [], []
        for _ in range(repeats):
            ours_runs.append(_time(fn, device))
            if other is not None:
                their_runs.append(_time(other, torch.device("cpu")))
        ours_s = statistics.median(ours_runs)
        astra_s = statistics.median(their_runs) if their_runs else None
        rows.append(
            {
                "op": name,
                "ours_s": ours_s,
                "astra_s": astra_s,
                "ratio": ours_s / astra_s if astra_s else None,
                "ours_runs": ours_runs,
                "astra_runs": their_runs,
            }
        )
    if baseline:
        ref.close()

    result = {
        "geometry": g.to_dict(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "astra": astra_version,
        "batch": args.batch,
        "repeats": repeats,
        "setup": setup,
        "table_bytes": proj.table_bytes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "checks": checks,
        "results": rows,
    }
    print(
        f"SynDeepLesion 416² / 640×641, float32, batch {args.batch}, {device}, "
        f"{torch.get_num_threads()} torch threads, median of {repeats}"
    )
    print(f"{'op':<18}{'ours (s)':>10}{'ASTRA (s)':>11}{'ours/ASTRA':>12}")
    for row in rows:
        astra_s = f"{row['astra_s']:.4f}" if row["astra_s"] else "n/a"
        ratio = f"{row['ratio']:.3f}" if row["ratio"] else "n/a"
        print(f"{row['op']:<18}{row['ours_s']:>10.4f}{astra_s:>11}{ratio:>12}")
    print("(fbp ASTRA column: our ramp filter + ASTRA BP, a cost reference only)")
    print(
        "one-time tables: "
        + ", ".join(f"{k} {v:.2f}" for k, v in setup.items())
        + f"; cached {proj.table_bytes / 2**20:.0f} MiB; peak RSS {result['peak_rss_mb']:.0f} MiB"
    )
    for key, value in checks.items():
        print(f"{key}: {value:.5f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
