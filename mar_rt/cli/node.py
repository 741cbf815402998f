"""`mar-rt node`: run the MAR node (DICOM in by C-STORE, derived series out to the PACS);
`mar-rt node status`: the queue, the last series and their timings."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

BACKEND_HELP = "auto | tensorrt | onnxruntime | torch (falls back tensorrt → onnxruntime → torch)"


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def _serve(**flags: object) -> None:
    import signal

    from mar_rt.errors import MarRtError
    from mar_rt.node.config import build_config
    from mar_rt.node.events import install_handlers
    from mar_rt.node.service import MarNode

    config_file = flags.pop("config")
    try:
        cfg = build_config(config_file, **flags)  # type: ignore[arg-type]
    except MarRtError as exc:
        raise _fail(str(exc), code=2) from exc
    if cfg.bundle is not None and not (cfg.bundle / "bundle.json").is_file():
        raise _fail(f"--bundle {cfg.bundle}: no bundle.json there", code=2)
    root = logging.getLogger()
    for handler in list(root.handlers):  # JSON lines instead of the plain CLI format
        root.removeHandler(handler)
    install_handlers(cfg.spool / "logs" / "node.jsonl")
    node = MarNode(cfg)
    signal.signal(signal.SIGTERM, lambda *_: node.request_stop())
    signal.signal(signal.SIGINT, lambda *_: node.request_stop())
    try:
        node.start()
    except OSError as exc:  # e.g. the port is taken
        node.stop()
        raise _fail(f"cannot start the node: {exc}") from exc
    try:
        node.serve_forever()
    finally:
        node.stop()


def register(app: typer.Typer) -> None:
    """Add `node` and `node status` to the app."""
    group = typer.Typer(
        help="The MAR node: receive CT series by C-STORE, correct them, send them to PACS.",
        invoke_without_command=True,
        no_args_is_help=False,
    )

    @group.callback(invoke_without_command=True)
    def node(
        ctx: typer.Context,
        aet: Annotated[str | None, typer.Option("--aet", help="Our AE title [MARNODE].")] = None,
        port: Annotated[int | None, typer.Option("--port", help="Listen port [11112].")] = None,
        host: Annotated[
            str | None, typer.Option("--host", help="Listen address [0.0.0.0].")
        ] = None,
        dest: Annotated[
            str | None,
            typer.Option("--dest", help="Where derived series go: AET@host:port."),
        ] = None,
        spool: Annotated[
            Path | None, typer.Option("--spool", help="Spool folder (received files, queue).")
        ] = None,
        config: Annotated[
            Path | None, typer.Option("--config", help="TOML settings; flags win.")
        ] = None,
        quiet_seconds: Annotated[
            float | None,
            typer.Option("--quiet-seconds", help="Series ready after this long idle [10]."),
        ] = None,
        allow_aet: Annotated[
            list[str] | None,
            typer.Option("--allow-aet", help="Calling AE title allowed (repeat); default any."),
        ] = None,
        keep_hours: Annotated[
            float | None,
            typer.Option("--keep-hours", help="Keep received files after the send [24]."),
        ] = None,
        bundle: Annotated[
            Path | None, typer.Option("--bundle", help="Model bundle (default: the demo).")
        ] = None,
        backend: Annotated[str | None, typer.Option("--backend", help=BACKEND_HELP)] = None,
        device: Annotated[str | None, typer.Option("--device", help="cpu or cuda.")] = None,
        steps: Annotated[
            int | None, typer.Option("--steps", min=1, help="Reverse-SDE steps per loop.")
        ] = None,
        spool_max_mb: Annotated[
            float | None,
            typer.Option("--spool-max-mb", help="Refuse instances (0xA700) beyond this size."),
        ] = None,
    ) -> None:
        """Run the node until SIGTERM / Ctrl-C (see docs/node.md)."""
        if ctx.invoked_subcommand is not None:
            return
        _serve(
            config=config,
            aet=aet,
            port=port,
            host=host,
            dest=dest,
            spool=spool,
            quiet_seconds=quiet_seconds,
            allow_aets=allow_aet or None,
            keep_hours=keep_hours,
            bundle=bundle,
            backend=backend,
            device=device,
            steps=steps,
            spool_max_mb=spool_max_mb,
        )

    @group.command("status")
    def status(
        spool: Annotated[Path, typer.Option("--spool", help="The node's spool folder.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        last: Annotated[int, typer.Option("--last", min=1, help="How many series to list.")] = 10,
    ) -> None:
        """Print the queue, the last series and their timings."""
        from mar_rt.node.status import collect_status, format_status

        if not spool.is_dir():
            raise _fail(f"{spool}: no such spool folder", code=2)
        report = collect_status(spool, last=last)
        typer.echo(json.dumps(report, indent=1) if as_json else format_status(report))

    app.add_typer(group, name="node")
