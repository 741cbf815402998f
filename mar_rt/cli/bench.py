"""``mar-rt bench``: per-stage latency (p50/p95) per backend, JSON and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``mar-rt bench`` to the app."""

    @app.command("bench")
    def bench(
        bundle: Annotated[
            Path | None, typer.Option("--bundle", help="Bundle folder (default: the demo bundle).")
        ] = None,
        backends: Annotated[
            str, typer.Option("--backends", help="Comma list: torch, onnxruntime, tensorrt.")
        ] = "torch,onnxruntime",
        device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
        steps: Annotated[int | None, typer.Option("--steps", help="SDE steps per loop.")] = None,
        runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per backend.")] = 3,
        warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 1,
        sweep: Annotated[
            str, typer.Option("--sweep", help="Comma list of step counts: latency vs PSNR.")
        ] = "",
        out: Annotated[Path, typer.Option("--out", help="Folder for bench.json, bench.png.")] = (
            Path("mar-rt-bench")
        ),
    ) -> None:
        """Warm up, then time the pipeline per stage on the demo case for each backend."""
        from mar_rt.runtime import bench as B
        from mar_rt.runtime.bundle_access import DEMO_BUNDLE

        bundle_path = bundle or DEMO_BUNDLE
        if not (bundle_path / "bundle.json").is_file():
            raise typer.BadParameter(f"{bundle_path}: no bundle.json (not a mar-rt bundle)")
        try:
            sweep_steps = [int(s) for s in sweep.split(",") if s.strip()]
        except ValueError:
            raise typer.BadParameter(
                f"--sweep must be integers separated by commas: {sweep!r}"
            ) from None
        machine = B.machine_summary()
        typer.echo(f"machine: {machine['summary']}")
        report: dict = {
            "machine": machine,
            "bundle": str(bundle_path),
            "runs": runs,
            "backends": {},
        }
        for name in [b.strip() for b in backends.split(",") if b.strip()]:
            typer.echo(f"benchmarking {name} on {device} ...")
            report["backends"][name] = B.bench_backend(
                bundle_path, name, device=device, steps=steps, runs=runs, warmup=warmup,
                sweep=sweep_steps,
            )  # fmt: skip
        typer.echo(f"{'backend':<14}{'stage':<14}{'p50 s':>10}{'p95 s':>10}")
        for name, res in report["backends"].items():
            if "error" in res:
                typer.echo(f"{name:<14}unavailable: {res['error']}")
                continue
            for stage, p in res["stages"].items():
                typer.echo(f"{name:<14}{stage:<14}{p['p50']:>10.3f}{p['p95']:>10.3f}")
            for row in res.get("sweep", []):
                typer.echo(
                    f"{name:<14}steps {row['steps']:<4} {row['seconds']:.2f} s  "
                    f"PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.4f}"
                )
        json_path = B.write_json(report, out / "bench.json")
        if any("stages" in r for r in report["backends"].values()):
            png = B.write_chart(report, out / "bench.png")
            typer.echo(f"chart: {png}")
        typer.echo(f"json:  {json_path}")
