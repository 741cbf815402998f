"""`mar-rt eval`: PSNR / SSIM of input, LI, NMAR and DuDoCROP on a SynDeepLesion-layout folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add `eval` to the app."""

    @app.command("eval")
    def eval_(
        data_dir: Annotated[
            Path,
            typer.Argument(help="Folder of <case>/gt.h5 + <case>/<k>.h5 (recursive)."),
        ],
        json_path: Annotated[
            Path | None, typer.Option("--json", help="Write the results as JSON here.")
        ] = None,
        bundle: Annotated[
            Path | None,
            typer.Option("--bundle", help="Model bundle (default: the shipped demo bundle)."),
        ] = None,
        backend: Annotated[
            str, typer.Option("--backend", help="auto | tensorrt | onnxruntime | torch.")
        ] = "auto",
        device: Annotated[str | None, typer.Option("--device", help="cpu or cuda.")] = None,
        steps: Annotated[int | None, typer.Option("--steps", min=1, help="SDE steps.")] = None,
        seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
        methods: Annotated[
            str,
            typer.Option(
                "--methods",
                help="Comma-separated: input li li_official nmar dudocrop sde_only dapg_only.",
            ),
        ] = "input,li,li_official,nmar,dudocrop",
        ablations: Annotated[
            bool, typer.Option("--ablations", help="Add sde_only and dapg_only to the methods.")
        ] = False,
        image_only: Annotated[
            bool,
            typer.Option(
                "--image-only",
                help="Run every method from ma_CT alone (Y_ma = FP(ma_CT), segmented mask), "
                "as on a workstation; the JSON says route: image_only.",
            ),
        ] = False,
    ) -> None:
        """Score each method per case and per metal-size group; print a table, write JSON."""
        from mar_rt.errors import MarRtError
        from mar_rt.runtime.bundle_access import DEMO_BUNDLE
        from mar_rt.runtime.evaluate import NETWORK_METHODS, evaluate, format_table
        from mar_rt.runtime.io.common import atomic_file

        names = [m.strip() for m in methods.split(",") if m.strip()]
        if ablations:
            names += [m for m in ("dudocrop", "sde_only", "dapg_only") if m not in names]
        needs_bundle = any(m in NETWORK_METHODS for m in names)
        bundle_path = bundle if bundle is not None else DEMO_BUNDLE
        name, dev = "torch", "cpu"
        try:
            if needs_bundle:
                if not bundle_path.exists():
                    typer.echo(
                        f"error: bundle folder {bundle_path} does not exist; pass --bundle PATH "
                        "or leave the network methods out of --methods",
                        err=True,
                    )
                    raise typer.Exit(code=2)
                from mar_rt.runtime.backends import resolve_backend

                choice = resolve_backend(backend, device=device, bundle=bundle_path)
                name, dev = choice.backend, choice.device
                typer.echo(f"backend: {name} on {dev} ({choice.reason})")
            result = evaluate(
                data_dir,
                methods=names,
                bundle=bundle_path if needs_bundle else None,
                backend=name,
                device=dev,
                steps=steps,
                seed=seed,
                progress=lambda case: typer.echo(f"  {case}", err=True),
                image_only=image_only,
            )
        except MarRtError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from exc
        typer.echo(format_table(result))
        typer.echo(f"{result['seconds']:.1f} s")
        if json_path is not None:
            with atomic_file(json_path) as tmp:
                tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            typer.echo(f"wrote {json_path}")
