"""`mar-rt batch`: many series through DuDoCROP on Ray, resumable (see mar_rt.batch).

Exit codes: 0 every series done (or done before), 1 the job could not run, 3 it ran and some
series failed (their reasons are printed and in DIR/ledger.jsonl).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from mar_rt.cli.run import BACKEND_HELP, _fail

log = logging.getLogger(__name__)

EXIT_SOME_FAILED = 3


class _SeriesBar:
    """A tqdm bar advanced once per finished series, showing done / failed counts."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.failed = 0

    def __call__(self, record: dict[str, Any], i: int, n: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=n, unit="series", desc="batch", leave=False)
        self.failed += record["status"] == "failed"
        self.bar.set_postfix_str(f"failed {self.failed}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_summary(summary: Any) -> None:
    plan = summary.plan
    typer.echo(
        f"series: {summary.found} found, {summary.skipped} done before (skipped), "
        f"{len(summary.done)} done now, {len(summary.failed)} failed"
        + (f" (retried {summary.retried} that had failed before)" if summary.retried else "")
    )
    if plan is not None:
        typer.echo(
            f"ran on {summary.address}: {plan.workers} worker(s) "
            f"({plan.num_cpus:g} CPU, {plan.num_gpus:g} GPU, {plan.torch_threads} torch "
            f"thread(s) each, device {plan.device}), {len(summary.nodes())} node(s)"
        )
    if summary.done:
        typer.echo(
            f"throughput: {summary.series_per_minute:.2f} series/min "
            f"({len(summary.done)} in {summary.wall_s:.1f} s)"
        )
    for r in summary.failed:
        typer.echo(f"FAILED {r['label']}: {r['error']}")
    typer.echo(f"ledger: {summary.out / 'ledger.jsonl'}")
    typer.echo(f"report: {summary.report_json}  {summary.report_png}")


def register(app: typer.Typer) -> None:
    """Add `batch` to the app."""

    @app.command()
    def batch(
        inputs: Annotated[
            list[Path],
            typer.Argument(
                help="Folders (scanned recursively: DICOM grouped by SeriesInstanceUID; "
                ".npy, .nii[.gz], .h5 one series per file) or manifests (.csv / .jsonl: a "
                "'path' column, optional units, steps, seed, skip_bad)."
            ),
        ],
        out: Annotated[
            Path, typer.Option("--out", help="Output folder: ledger, report, one folder/series.")
        ],
        address: Annotated[
            str | None,
            typer.Option(
                "--address",
                help="Ray cluster: 'auto' or HOST:PORT, from a node of the cluster (default "
                "$RAY_ADDRESS; unset: a local Ray inside this command). Not Ray Client's "
                "ray://: Ray Data does not run through it.",
            ),
        ] = None,
        workers: Annotated[
            int | None,
            typer.Option("--workers", min=1, help="Workers (default one per GPU, else per CPU)."),
        ] = None,
        bundle: Annotated[
            Path | None,
            typer.Option("--bundle", help="Model bundle folder (default: the demo bundle)."),
        ] = None,
        backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "auto",
        device: Annotated[
            str | None, typer.Option("--device", help="cpu or cuda (default: cuda if any).")
        ] = None,
        units: Annotated[
            str | None, typer.Option("--units", help="hu or mu: the units of .npy / NIfTI.")
        ] = None,
        steps: Annotated[
            int | None, typer.Option("--steps", min=1, help="Reverse-SDE steps per loop.")
        ] = None,
        seed: Annotated[int, typer.Option("--seed", min=0, help="Noise seed.")] = 0,
        skip_bad: Annotated[
            bool, typer.Option("--skip-bad", help="Leave out unreadable DICOM files.")
        ] = False,
        torch_threads: Annotated[
            int | None,
            typer.Option(
                "--torch-threads",
                min=1,
                help="torch threads per worker (default 1 on CPU, 2 with a GPU).",
            ),
        ] = None,
        preview: Annotated[
            bool, typer.Option("--preview/--no-preview", help="Write preview.png per series.")
        ] = True,
    ) -> None:
        """Correct many series on Ray; a rerun skips what is done and retries what failed."""
        from mar_rt.errors import MarRtError

        if importlib.util.find_spec("ray") is None:
            raise _fail("mar-rt batch needs Ray: pip install 'mar-rt[scale]'", code=1)
        from mar_rt.batch import BatchConfig, SeriesOptions, run_batch, scan_inputs

        if units is not None and units not in ("hu", "mu"):
            raise _fail(f"--units must be 'hu' or 'mu', got {units!r}", code=2)
        if device is not None and device != "cpu" and not device.startswith("cuda"):
            raise _fail(f"--device must be cpu or cuda, got {device!r}", code=2)
        bar = _SeriesBar()
        try:
            options = SeriesOptions(units=units, steps=steps, seed=seed, skip_bad=skip_bad)
            scan = scan_inputs(inputs, options=options, exclude=out)
            typer.echo(f"found {len(scan.series)} series")
            for reason, n in sorted(scan.ignored.items()):
                typer.echo(f"  ignored {n} file(s): {reason}")
            config = BatchConfig(
                out=out,
                bundle=bundle,
                backend=backend,
                device=device,
                workers=workers,
                torch_threads=torch_threads,
                preview=preview,
            )
            verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
            try:
                summary = run_batch(
                    scan.series, config, address=address, progress=bar, log_to_driver=verbose
                )
            finally:
                bar.close()
        except MarRtError as exc:
            raise _fail(str(exc)) from exc
        _print_summary(summary)
        if summary.failed:
            raise typer.Exit(code=EXIT_SOME_FAILED)
