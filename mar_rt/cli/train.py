"""`mar-rt train`: data generation, DuDoCLIP and IR-SDE training, whole bundles (DESIGN §7–§9).

    mar-rt train data            --data SOURCES --out BUNDLE      pairs + validation set
    mar-rt train clip   --domain image|sinogram        ...        one DuDoCLIP
    mar-rt train sde    --domain image|sinogram|residual ...      one U-Net (+ bundle)
    mar-rt train bundle                                 ...       everything, in order
    mar-rt train export-sources --data SOURCES --out DIR          μ .npy slices for a GPU box

Every command works in ``<out>.work`` (pair cache, ``val/`` for ``mar-rt eval``, checkpoints);
a stage finished by an earlier command is reused, ``--resume`` also continues a stopped one.
``--init-from BUNDLE`` (``sde``, ``bundle``) starts the U-Nets from that bundle's weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)

_DOMAINS = {"clip": ("image", "sinogram"), "sde": ("image", "sinogram", "residual")}

DataOpt = Annotated[
    list[Path],
    typer.Option(
        "--data",
        help="Clean CT slices: the shared data folder, an export-sources folder, or a folder "
        "of gt.h5 / .npy / .png / .dcm / .nii files. Repeat to combine sources.",
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", help="Bundle folder to write.")]
ConfigOpt = Annotated[
    str,
    typer.Option(
        "--config",
        help="Recipe preset: tiny | tiny-cpu | tiny-gpu | clinical-cpu | clinical-cpu-s4 | "
        "clinical-cpu-scanner | paper | smoke.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N.")]
MinutesOpt = Annotated[
    float | None, typer.Option("--max-minutes", help="Wall-time budget of the whole command.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of data, initialisation, batches.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from checkpoints.")]
WorkOpt = Annotated[Path | None, typer.Option("--work", help="Work folder (default: <out>.work).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
InitOpt = Annotated[
    Path | None,
    typer.Option(
        "--init-from",
        help="Bundle whose U-Nets (same network config) are the starting weights (fine-tune); "
        "under another SDE they only start the training, and untrained loops stay off.",
    ),
]
ThreadsOpt = Annotated[
    int, typer.Option("--threads", help="torch CPU threads (0: torch's default).", min=0)
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def _run(
    stages: tuple[str, ...],
    data: list[Path],
    out: Path,
    config: str,
    device: str,
    max_minutes: float | None,
    seed: int,
    resume: bool,
    work: Path | None,
    quiet: bool,
    threads: int = 0,
    init_from: Path | None = None,
) -> None:
    import torch

    from mar_rt.errors import MarRtError

    if threads:
        torch.set_num_threads(threads)
    from mar_rt.train.presets import recipe_config
    from mar_rt.train.recipe import train_bundle
    from mar_rt.train.sources import load_clean_slices

    try:
        recipe = recipe_config(config, device=device, seed=seed)
        report = train_bundle(
            load_clean_slices(data), out, recipe=recipe, device=device, max_minutes=max_minutes,
            work_dir=work, resume=resume, progress=not quiet, stages=stages, init_from=init_from,
        )  # fmt: skip
    except (MarRtError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    for stage, info in report.get("stages", {}).items():
        brief = {
            k: v for k, v in info.items() if k in ("seconds", "steps", "train_pairs", "val_cases")
        }
        typer.echo(f"{stage:<15} {json.dumps(brief)}")
    if report.get("trained"):
        typer.echo(f"bundle: {out} (trained: {', '.join(report['trained'])})")
    typer.echo(f"work folder: {report['work_dir']} (validation set: {report['work_dir']}/val)")


def register(app: typer.Typer) -> None:
    """Add ``mar-rt train ...`` to the app."""
    train_app = typer.Typer(
        help="Generate training data and train DuDoCLIP / IR-SDE networks into a bundle.",
        no_args_is_help=True,
    )

    @train_app.command("data")
    def data_cmd(
        data: DataOpt, out: OutOpt, config: ConfigOpt = "tiny", device: DeviceOpt = "cpu",
        max_minutes: MinutesOpt = None, seed: SeedOpt = 0, resume: ResumeOpt = False,
        work: WorkOpt = None, quiet: QuietOpt = False, threads: ThreadsOpt = 0,
    ) -> None:  # fmt: skip
        """Simulate training pairs (cached) and write the validation set (<work>/val)."""
        _run(("data",), data, out, config, device, max_minutes, seed, resume, work, quiet, threads)

    @train_app.command("clip")
    def clip_cmd(
        data: DataOpt, out: OutOpt,
        domain: Annotated[str, typer.Option("--domain", help="image | sinogram")] = "image",
        config: ConfigOpt = "tiny", device: DeviceOpt = "cpu", max_minutes: MinutesOpt = None,
        seed: SeedOpt = 0, resume: ResumeOpt = False, work: WorkOpt = None,
        quiet: QuietOpt = False, threads: ThreadsOpt = 0,
    ) -> None:  # fmt: skip
        """Fine-tune one DuDoCLIP controller (contrastive, controller only)."""
        if domain not in _DOMAINS["clip"]:
            raise _fail(f"--domain must be one of {_DOMAINS['clip']}, got {domain!r}")
        stages = ("data", f"clip_{domain}")
        _run(stages, data, out, config, device, max_minutes, seed, resume, work, quiet, threads)

    @train_app.command("sde")
    def sde_cmd(
        data: DataOpt, out: OutOpt,
        domain: Annotated[str, typer.Option("--domain", help="image|sinogram|residual")] = "image",
        config: ConfigOpt = "tiny", device: DeviceOpt = "cpu", max_minutes: MinutesOpt = None,
        seed: SeedOpt = 0, resume: ResumeOpt = False, work: WorkOpt = None,
        quiet: QuietOpt = False, threads: ThreadsOpt = 0, init_from: InitOpt = None,
    ) -> None:  # fmt: skip
        """Train one IR-SDE U-Net (both DuDoCLIPs must be trained; residual needs image and
        sinogram), then write the bundle."""
        if domain not in _DOMAINS["sde"]:
            raise _fail(f"--domain must be one of {_DOMAINS['sde']}, got {domain!r}")
        stages = ("data", f"unet_{domain}") + (("residual_data",) if domain == "residual" else ())
        _run(
            stages, data, out, config, device, max_minutes, seed, resume, work, quiet, threads,
            init_from,
        )  # fmt: skip

    @train_app.command("bundle")
    def bundle_cmd(
        data: DataOpt, out: OutOpt, config: ConfigOpt = "tiny", device: DeviceOpt = "cpu",
        max_minutes: MinutesOpt = None, seed: SeedOpt = 0, resume: ResumeOpt = False,
        work: WorkOpt = None, quiet: QuietOpt = False, threads: ThreadsOpt = 0,
        init_from: InitOpt = None,
    ) -> None:  # fmt: skip
        """Train the whole bundle in order with per-stage time budgets."""
        from mar_rt.train.recipe import STAGES

        _run(
            STAGES, data, out, config, device, max_minutes, seed, resume, work, quiet, threads,
            init_from,
        )  # fmt: skip

    @train_app.command("export-sources")
    def export_cmd(
        data: DataOpt,
        out: Annotated[
            Path, typer.Option("--out", help="Folder for <slice_id>.npy + sources.json.")
        ],
    ) -> None:
        """Write every clean slice as μ float32 416² .npy (for training where the data folder
        is not available, e.g. a GPU machine)."""
        from mar_rt.errors import MarRtError
        from mar_rt.train.sources import export_sources, load_clean_slices

        try:
            slices = load_clean_slices(data)
        except MarRtError as exc:
            raise _fail(str(exc)) from exc
        export_sources(slices, out)
        size = sum(f.stat().st_size for f in out.glob("*")) / 1e6
        typer.echo(f"exported {len(slices)} slices to {out} ({size:.1f} MB)")

    app.add_typer(train_app, name="train")
