"""`mar-rt run`: DuDoCROP on CT inputs (DICOM in → derived DICOM out; npy / NIfTI / h5 in →
the same kind out), or the demo when no input is given.  The work is
:func:`mar_rt.runtime.study.run_study`; this module only parses options and prints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)

BACKEND_HELP = "auto | tensorrt | onnxruntime | torch (falls back tensorrt → onnxruntime → torch)"


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def _choose_backend(requested: str, device: str | None, bundle: Path) -> tuple[str, str]:
    """(backend, device) for the request, printing what was picked and why."""
    from mar_rt.runtime.backends import resolve_backend

    choice = resolve_backend(requested, device=device, bundle=bundle)
    typer.echo(f"backend: {choice.backend} on {choice.device} ({choice.reason})")
    return choice.backend, choice.device


def _timings_table(timings: dict[str, float], n_slices: int) -> str:
    from mar_rt.runtime.pipeline import STAGES

    lines = [f"{'stage':<14}{'total s':>10}{'per slice s':>13}"]
    for stage in STAGES:
        t = timings.get(stage, 0.0)
        lines.append(f"{stage:<14}{t:>10.2f}{t / max(n_slices, 1):>13.3f}")
    return "\n".join(lines)


class _StepBar:
    """A tqdm bar advanced by the pipeline's progress callback (one tick per SDE step)."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def __call__(self, stage: str, i: int, n: int) -> None:
        self.bar.set_postfix_str(stage, refresh=False)
        if stage in ("image", "sinogram", "residual"):
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _run_demo(
    bundle: Path, backend: str, device: str, steps: int | None, seed: int, out: Path
) -> None:
    from mar_rt.runtime.demo import run_demo

    typer.echo("no input given: running the demo (simulated implant in the shipped slice)")
    bar = _StepBar(0, "demo")
    try:
        result = run_demo(
            out, bundle, backend=backend, device=device, steps=steps, seed=seed, progress=bar
        )
    finally:
        bar.close()
    rec = result.metrics
    typer.echo(f"{'method':<10}{'PSNR dB':>9}{'SSIM':>8}")
    for name, s in rec["methods"].items():
        typer.echo(f"{name:<10}{s['psnr']:>9.2f}{s['ssim']:>8.4f}")
    typer.echo(_timings_table(rec["timings_s"], 1))
    typer.echo(f"panel:   {result.png}")
    typer.echo(f"metrics: {result.metrics_json}")


def _run_inputs(
    inputs: list[Path],
    *,
    bundle: Path,
    backend: str,
    device: str | None,
    steps: int | None,
    seed: int,
    out: Path,
    units: str | None,
    sinogram: Path | None,
    skip_bad: bool,
    reinsert_metal: bool,
) -> None:
    """Each INPUT through :func:`mar_rt.runtime.study.run_study`; print what was done."""
    from mar_rt.errors import BadInputError
    from mar_rt.runtime.study import open_pipeline, run_study

    if sinogram is not None and len(inputs) != 1:
        raise BadInputError("--sinogram goes with exactly one INPUT")
    with open_pipeline(bundle, backend=backend, device=device, notify=typer.echo) as pipe:
        for path in inputs:
            bar = _StepBar(0, path.name)
            try:
                result = run_study(
                    path,
                    pipe,
                    out,
                    units=units,
                    skip_bad=skip_bad,
                    steps=steps,
                    seed=seed,
                    reinsert_metal=reinsert_metal,
                    sinogram=sinogram,
                    progress=bar,
                )
            finally:
                bar.close()
            for bad, why in result.qa["skipped_files"]:
                typer.echo(f"skipped {bad}: {why}")
            qa = result.qa
            typer.echo(
                f"{path}: {result.n_slices} slice(s), {result.n_metal_slices} with metal "
                f"corrected ({qa['route'].replace('_', '-')} route), "
                f"{qa['slices_passed_through']} passed through unchanged"
            )
            if result.has_metal:
                typer.echo(_timings_table(result.timings_s, result.n_metal_slices))
            typer.echo(f"wrote {result.folder}")


def register(app: typer.Typer) -> None:
    """Add `run` to the app."""

    @app.command()
    def run(
        inputs: Annotated[
            list[Path] | None,
            typer.Argument(help="DICOM files/folders, .npy, .nii[.gz] or SynDeepLesion .h5."),
        ] = None,
        bundle: Annotated[
            Path | None,
            typer.Option("--bundle", help="Model bundle folder (default: the demo bundle)."),
        ] = None,
        backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "auto",
        device: Annotated[
            str | None, typer.Option("--device", help="cpu or cuda (default: the backend's).")
        ] = None,
        steps: Annotated[
            int | None, typer.Option("--steps", min=1, help="Reverse-SDE steps per loop.")
        ] = None,
        seed: Annotated[int, typer.Option("--seed", min=0, help="Noise seed.")] = 0,
        out: Annotated[
            Path | None,
            typer.Option("--out", help="Output folder (default ./mar-rt-out; demo ./mar-rt-demo)."),
        ] = None,
        units: Annotated[
            str | None, typer.Option("--units", help="hu or mu: the units of .npy / NIfTI input.")
        ] = None,
        sinogram: Annotated[
            Path | None,
            typer.Option("--sinogram", help="Measured sinogram(s) .npy (N, views, bins)."),
        ] = None,
        skip_bad: Annotated[
            bool,
            typer.Option("--skip-bad", help="Skip unreadable DICOM files, do not stop."),
        ] = False,
        reinsert_metal: Annotated[
            bool,
            typer.Option(
                "--reinsert-metal/--no-reinsert-metal",
                help="Put the original metal pixels back into the output (default: yes).",
            ),
        ] = True,
    ) -> None:
        """Correct metal artifacts; with no INPUT, run the demo and write a PNG panel."""
        from mar_rt.errors import MarRtError
        from mar_rt.runtime.bundle_access import DEMO_BUNDLE

        if units is not None and units not in ("hu", "mu"):
            raise _fail(f"--units must be 'hu' or 'mu', got {units!r}", code=2)
        bundle_path = bundle if bundle is not None else DEMO_BUNDLE
        if not bundle_path.exists():
            hint = (
                "pass --bundle PATH"
                if bundle is not None
                else ("the demo bundle is not installed at that path; pass --bundle PATH")
            )
            raise _fail(f"bundle folder {bundle_path} does not exist ({hint})", code=2)
        try:
            if not inputs:
                name, dev = _choose_backend(backend, device, bundle_path)
                _run_demo(bundle_path, name, dev, steps, seed, out or Path("mar-rt-demo"))
            else:
                _run_inputs(
                    list(inputs),
                    bundle=bundle_path,
                    backend=backend,
                    device=device,
                    steps=steps,
                    seed=seed,
                    out=out or Path("mar-rt-out"),
                    units=units,
                    sinogram=sinogram,
                    skip_bad=skip_bad,
                    reinsert_metal=reinsert_metal,
                )
        except MarRtError as exc:
            raise _fail(str(exc)) from exc
