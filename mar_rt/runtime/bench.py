"""Per-stage latency of the DuDoCROP pipeline per backend (``mar-rt bench``).

Each measurement: warm-up calls, then ``runs`` timed calls on the demo case (the shipped
slice with a seeded simulated implant and its measured sinogram); p50/p95 per stage from the
pipeline's own stage timings (``PipelineOutput.timings``), plus ``io``: reading the input
``.npy`` and writing the result through ``mar_rt.runtime.io``. A steps sweep reports latency
against PSNR / SSIM on the same case (its clean slice is the target).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

BENCH_STAGES = ("clip", "image_sde", "sinogram_sde", "osro", "io", "total")


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / mean of a list of seconds."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "mean": float(a.mean()),
        "n": int(a.size),
    }


def demo_case(pipe: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """The demo slice on the pipeline's grid, a seeded implant and its simulated scan."""
    from mar_rt.ct.masks import body_outline, generate_metal_mask
    from mar_rt.ct.simulate import simulate_metal_artifact
    from mar_rt.runtime.demo import _to_grid, load_demo_slice

    geometry = pipe.geometry
    target = _to_grid(load_demo_slice(), geometry.image_shape)
    mask = torch.from_numpy(
        generate_metal_mask(geometry.image_shape, seed=seed, body_mask=body_outline(target))
    )
    proj = pipe.operators.ct_view()
    target, mask = target.to(proj.device), mask.to(proj.device)
    sim = simulate_metal_artifact(target, mask, geometry=geometry, seed=seed, projector=proj)
    return {"target": target, "mask": mask, "x_ma": sim["ma_CT"], "y_ma": sim["ma_sinogram"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _io_seconds(image_mu: np.ndarray, bundle_name: str) -> float:
    """Read a one-slice ``.npy`` study and write the result back (the run's I/O path)."""
    from mar_rt.runtime.io import read_study, write_study

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.npy"
        np.save(src, image_mu.astype(np.float32))
        t0 = time.perf_counter()
        study = read_study(src, units="mu")
        write_study(study, study.images, Path(tmp) / "out", bundle_name=bundle_name, units="mu")
        return time.perf_counter() - t0


def bench_backend(
    bundle: Path,
    backend: str,
    *,
    device: str = "cpu",
    steps: int | None = None,
    runs: int = 3,
    warmup: int = 1,
    sweep: Sequence[int] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """Stage percentiles (seconds) of one backend; ``{"error": ...}`` when it cannot run."""
    from mar_rt.ct import metrics
    from mar_rt.errors import MarRtError
    from mar_rt.runtime.pipeline import DuDoCROPPipeline

    try:
        pipe = DuDoCROPPipeline.from_bundle(bundle, backend=backend, device=device)
    except (MarRtError, ImportError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    with pipe:
        case = demo_case(pipe, seed)
        dev = case["x_ma"].device

        def call(n_steps: int | None) -> Any:
            _sync(dev)
            out = pipe(
                case["x_ma"], sinogram=case["y_ma"], sinogram_is_measured=True,
                mask=case["mask"], steps=n_steps, seed=seed,
            )  # fmt: skip
            _sync(dev)
            return out

        for _ in range(warmup):
            call(steps)
        samples: dict[str, list[float]] = {s: [] for s in BENCH_STAGES}
        x_np = case["x_ma"].cpu().numpy()
        out = None
        for _ in range(runs):
            out = call(steps)
            for stage in BENCH_STAGES:
                if stage != "io":
                    samples[stage].append(float(out.timings.get(stage, 0.0)))
            samples["io"].append(_io_seconds(x_np, bundle.name))
        result: dict[str, Any] = {
            "device": str(dev),
            "steps": out.steps if out is not None else steps,
            "stages": {s: percentiles(v) for s, v in samples.items()},
        }
        target, mask = case["target"].cpu(), case["mask"].cpu()
        rows = []
        for n in sweep:
            t0 = time.perf_counter()
            res = call(n)
            seconds = time.perf_counter() - t0
            img = res.output.cpu()
            rows.append({
                "steps": n, "seconds": seconds,
                "psnr": float(metrics.psnr(img, target, mask)),
                "ssim": float(metrics.ssim(img, target, mask)),
            })  # fmt: skip
        if rows:
            li = out.intermediates["x_li"][0].cpu() if out is not None else None
            result["sweep"] = rows
            if li is not None:
                result["li"] = {
                    "psnr": float(metrics.psnr(li, target, mask)),
                    "ssim": float(metrics.ssim(li, target, mask)),
                }
    return result


def write_chart(report: dict[str, Any], path: Path) -> Path:
    """Stacked bars of the p50 stage times per backend (matplotlib, Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mar_rt.runtime.io.common import atomic_file

    names = [b for b, r in report["backends"].items() if "stages" in r]
    parts = [s for s in BENCH_STAGES if s != "total"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = np.zeros(len(names))
    for stage in parts:
        vals = np.array([report["backends"][b]["stages"][stage]["p50"] for b in names])
        ax.bar(names, vals, bottom=bottom, label=stage)
        bottom += vals
    ax.set_ylabel("seconds per slice (p50)")
    ax.set_title(f"mar-rt bench: {report['machine']['summary']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def machine_summary() -> dict[str, Any]:
    """CPU, cores and GPUs of this machine (from the environment probe)."""
    from mar_rt.runtime.environment import probe_environment

    env = probe_environment()
    gpus = [g.name for g in env.gpus]
    summary = f"{env.cpu_model} ({env.cpu_cores} cores)" + (f", {', '.join(gpus)}" if gpus else "")
    return {"summary": summary, "cpu": env.cpu_model, "cores": env.cpu_cores, "gpus": gpus}


def write_json(report: dict[str, Any], path: Path) -> Path:
    """The report as JSON, written atomically."""
    from mar_rt.runtime.io.common import atomic_file

    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    return path
