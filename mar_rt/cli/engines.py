"""`mar-rt build-engines`: export a bundle's graphs to ONNX, verify them, and build (or find
in the cache) the engine set for this machine (``mar_rt.export.build``).

ONNX files and engines go to the per-user cache (``$MAR_RT_CACHE``, else
``$XDG_CACHE_HOME/mar-rt``, else ``~/.cache/mar-rt``), where ``mar-rt run`` finds them; the
bundle folder is only read, so an installed (read-only) bundle works."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def build_engines_command(
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", help="Bundle folder (default: the shipped demo bundle)."),
    ] = None,
    backend: Annotated[
        str, typer.Option("--backend", help="onnxruntime | tensorrt")
    ] = "onnxruntime",
    precision: Annotated[str, typer.Option("--precision", help="fp32 | fp16")] = "fp32",
    batch: Annotated[
        int, typer.Option("--batch", min=1, help="Batch size engines are tuned for.")
    ] = 1,
    max_batch: Annotated[
        int | None, typer.Option("--max-batch", min=1, help="Largest batch the engines accept.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for onnx/ and engines/ (default: the per-user cache, $MAR_RT_CACHE or "
            "$XDG_CACHE_HOME/mar-rt, where mar-rt run looks; the bundle itself is never written).",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device", help="ONNX Runtime device: cpu | cuda (default: cuda if available)."
        ),
    ] = None,
    tensorrt_ep: Annotated[
        bool, typer.Option("--tensorrt-ep", help="ONNX Runtime: TensorRT execution provider first.")
    ] = False,
    strongly_typed: Annotated[
        bool,
        typer.Option(
            "--strongly-typed", help="TensorRT 10: fp16 from the fp16 ONNX, strongly typed."
        ),
    ] = False,
    workspace_gib: Annotated[
        float, typer.Option("--workspace-gib", help="TensorRT workspace limit.")
    ] = 4.0,
    force: Annotated[
        bool, typer.Option("--force", help="Re-export and rebuild even when current.")
    ] = False,
) -> None:
    """Export, verify and build engines for one bundle; a second run is a cache hit."""
    from mar_rt.errors import MarRtError
    from mar_rt.export.build import BACKENDS, build_engines
    from mar_rt.runtime.bundle_access import DEMO_BUNDLE

    if backend not in BACKENDS:
        raise _fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in ("fp32", "fp16"):
        raise _fail(f"--precision must be fp32 or fp16, got {precision!r}")
    if device not in (None, "cpu", "cuda"):
        raise _fail(f"--device must be cpu or cuda, got {device!r}")
    if bundle is None:
        bundle = DEMO_BUNDLE
        if not (bundle / "bundle.json").is_file():
            raise _fail(
                f"no --bundle given and the demo bundle is not installed at {bundle}; "
                f"pass --bundle PATH (a folder with bundle.json)"
            )
    elif not (bundle / "bundle.json").is_file():
        raise _fail(f"{bundle} is not a bundle folder (no bundle.json)")

    def progress(graph: str, message: str) -> None:
        typer.echo(f"{graph:<20} {message}")

    trt_options = {"strongly_typed": strongly_typed, "workspace_gib": workspace_gib}
    try:
        summary = build_engines(
            bundle,
            backend=backend,
            precision=precision,
            batch=batch,
            max_batch=max_batch,
            out=out,
            force=force,
            device=device,
            tensorrt_ep=tensorrt_ep,
            trt_options=trt_options if backend == "tensorrt" else None,
            progress=progress,
        )
    except MarRtError as exc:
        raise _fail(str(exc)) from exc
    state = (
        "cache hit"
        if summary.cache_hit
        else f"built {len(summary.built)}, reused {len(summary.reused)}"
    )
    typer.echo(
        f"engines: {summary.engine_dir} ({state}; exported {len(summary.exported)} ONNX; "
        f"{summary.seconds:.1f} s)"
    )


def register(app: typer.Typer) -> None:
    """Add ``build-engines`` to the app."""
    app.command("build-engines")(build_engines_command)
