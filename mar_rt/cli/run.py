"""`mar-rt run`: DuDoCROP on CT inputs (DICOM in → derived DICOM out; npy / NIfTI / h5 in →
the same kind out), or the demo when no input is given."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

log = logging.getLogger(__name__)

BACKEND_HELP = "auto | tensorrt | onnxruntime | torch (falls back tensorrt → onnxruntime → torch)"


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def _choose_backend(requested: str, device: str | None, bundle: Path) -> tuple[str, str]:
    """(backend, device) for the request, printing what was picked and why."""
    from mar_rt.runtime.backends import resolve_backend

    onnx = (bundle / "onnx").is_dir()
    choice = resolve_backend(requested, device=device, onnx_available=onnx)
    typer.echo(f"backend: {choice.backend} on {choice.device} ({choice.reason})")
    return choice.backend, choice.device


def _open_pipeline(bundle: Path, backend: str, device: str) -> Any:
    """The pipeline on ``backend``; a backend that cannot run this bundle falls back to torch.

    That covers a missing library (BackendUnavailableError), a bundle without exported ONNX
    (BundleError) and missing or foreign engines (EngineMismatchError).
    """
    from mar_rt.errors import BackendUnavailableError, BundleError, EngineMismatchError
    from mar_rt.runtime.pipeline import DuDoCROPPipeline

    try:
        return DuDoCROPPipeline.from_bundle(bundle, backend=backend, device=device)
    except (BackendUnavailableError, BundleError, EngineMismatchError) as exc:
        if backend == "torch":
            raise
        typer.echo(f"backend {backend} failed ({exc}); falling back to torch on {device}")
        return DuDoCROPPipeline.from_bundle(bundle, backend="torch", device=device)


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


def _load_sinograms(path: Path, n: int) -> Any:
    import numpy as np

    from mar_rt.errors import BadInputError

    try:
        sino = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable .npy sinogram ({exc})") from exc
    if sino.ndim == 2:
        sino = sino[None]
    if sino.ndim != 3 or sino.shape[0] != n:
        raise BadInputError(f"{path}: expected {n} sinogram(s) (N, views, bins), got {sino.shape}")
    return sino.astype(np.float32)


def _run_inputs(
    inputs: list[Path],
    *,
    bundle: Path,
    backend: str,
    device: str,
    steps: int | None,
    seed: int,
    out: Path,
    units: str | None,
    sinogram: Path | None,
    skip_bad: bool,
    save_intermediates: bool,
) -> None:
    import dataclasses

    import numpy as np

    from mar_rt.errors import BadInputError
    from mar_rt.runtime.io import from_grid, read_study, to_grid, write_study
    from mar_rt.runtime.io.common import atomic_file
    from mar_rt.runtime.pipeline import slice_seed
    from mar_rt.runtime.qa import QARecord

    if sinogram is not None and len(inputs) != 1:
        raise BadInputError("--sinogram goes with exactly one INPUT")
    with _open_pipeline(bundle, backend, device) as pipe:
        geometry, cfg = pipe.geometry, pipe.config
        # read and check every input before anything is written
        studies = []
        for path in inputs:
            try:
                study = read_study(path, units=units, skip_bad=skip_bad, geometry=geometry)
            except ValueError as exc:  # BadInputError is a ValueError
                raise BadInputError(str(exc)) from exc
            for bad, why in study.skipped:
                typer.echo(f"skipped {bad}: {why}")
            if sinogram is not None:
                study = dataclasses.replace(
                    study,
                    sinograms=_load_sinograms(sinogram, len(study)),
                    sinogram_is_measured=True,
                )
            grid_study, grid_map = to_grid(
                study, geometry, resample=cfg.on_size_mismatch == "resample"
            )
            studies.append((path, study, grid_study, grid_map))

        dapg_steps = steps or cfg.steps
        n_steps = dapg_steps * 2 + (cfg.residual_steps_for(dapg_steps) if cfg.run_osro else 0)
        for path, study, gs, grid_map in studies:
            n = len(gs)
            typer.echo(f"{path}: {n} slice(s), {gs.source_kind}, grid {gs.image_shape}")
            outputs, records, inter = [], [], []
            timings: dict[str, float] = {}
            bar = _StepBar(n * n_steps, path.name)
            try:
                for start in range(0, n, cfg.batch_size):
                    sl = slice(start, min(start + cfg.batch_size, n))
                    res = pipe(
                        gs.images[sl],
                        sinogram=None if gs.sinograms is None else gs.sinograms[sl],
                        sinogram_is_measured=gs.sinogram_is_measured,
                        mask=None if gs.metal_masks is None else gs.metal_masks[sl],
                        steps=steps,
                        seed=slice_seed(seed, start),
                        progress=bar,
                        return_intermediates=save_intermediates,
                    )
                    outputs.append(res.output.cpu().numpy().reshape(-1, *gs.image_shape))
                    records.append(res.qa)
                    if save_intermediates:
                        inter.append({k: v.cpu().numpy() for k, v in res.intermediates.items()})
                    for k, v in res.timings.items():
                        timings[k] = timings.get(k, 0.0) + v
            finally:
                bar.close()
            images = from_grid(np.concatenate(outputs), grid_map)
            qa = QARecord.merge(records)
            qa_dict = {
                "input": str(path),
                "slices_in": n,
                "grid_resampled_from": list(grid_map.source_shape) if grid_map.resampled else None,
                "timings_s": timings,
                **qa.to_dict(),
            }
            folder = write_study(study, images, out, bundle_name=pipe.bundle_name, qa=qa_dict)
            if save_intermediates:
                arrays = {k: np.concatenate([d[k] for d in inter]) for k in inter[0]}
                with atomic_file(folder / "intermediates.npz") as tmp:
                    np.savez_compressed(tmp, **arrays)
            typer.echo(_timings_table(timings, n))
            typer.echo(qa.table())
            typer.echo(f"wrote {folder}")


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
        save_intermediates: Annotated[
            bool,
            typer.Option("--save-intermediates", help="Also write intermediates.npz."),
        ] = False,
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
            name, dev = _choose_backend(backend, device, bundle_path)
            if not inputs:
                _run_demo(bundle_path, name, dev, steps, seed, out or Path("mar-rt-demo"))
            else:
                _run_inputs(
                    list(inputs),
                    bundle=bundle_path,
                    backend=name,
                    device=dev,
                    steps=steps,
                    seed=seed,
                    out=out or Path("mar-rt-out"),
                    units=units,
                    sinogram=sinogram,
                    skip_bad=skip_bad,
                    save_intermediates=save_intermediates,
                )
        except MarRtError as exc:
            raise _fail(str(exc)) from exc
