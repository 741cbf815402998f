"""`mar-rt import`: build a bundle from DA-CLIP / IR-SDE reference checkpoints
(``mar_rt.train.import_reference``); see docs/import.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def _json_option(value: str | None, flag: str) -> dict | None:
    if value is None:
        return None
    text = Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(f"{flag}: not JSON (or a JSON file): {exc}", code=2) from exc
    if not isinstance(data, dict):
        raise _fail(f"{flag}: must be a JSON object", code=2)
    return data


def _describe_unet(cfg: dict) -> str:
    return (
        f"nf {cfg['nf']}, ch_mult {tuple(cfg['ch_mult'])}, context {cfg['context_dim']}, "
        f"transformers at levels {tuple(cfg['transformer_levels'])} + middle, "
        f"{'reference' if cfg['transformer_prenorm'] else 'no'} PreNorm wrapping, "
        f"pad to ×{2 ** (len(cfg['ch_mult']) - (0 if cfg['reference_padding'] else 1))}"
    )


def _describe_clip(cfg: dict) -> str:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return (
        f"ViT {v['layers']}×{v['width']} patch {v['patch_size']} at {cfg['image_size']}², "
        f"text {t['layers']}×{t['width']}, embed {cfg['embed_dim']}, "
        f"preprocess {cfg['preprocess']}"
    )


def register(app: typer.Typer) -> None:
    """Add `import` to the app."""

    @app.command("import")
    def import_command(
        daclip: Annotated[
            Path, typer.Option("--daclip", help="DA-CLIP checkpoint of the image domain.")
        ],
        out: Annotated[Path, typer.Option("--out", help="The new bundle folder.")],
        daclip_sinogram: Annotated[
            Path | None,
            typer.Option(
                "--daclip-sinogram",
                help="DA-CLIP checkpoint of the sinogram domain (default: --daclip).",
            ),
        ] = None,
        unet_image: Annotated[
            Path | None, typer.Option("--unet-image", help="IR-SDE U-Net, image domain.")
        ] = None,
        unet_sinogram: Annotated[
            Path | None, typer.Option("--unet-sinogram", help="IR-SDE U-Net, sinogram domain.")
        ] = None,
        unet_residual: Annotated[
            Path | None, typer.Option("--unet-residual", help="IR-SDE U-Net, OSRO residual.")
        ] = None,
        options: Annotated[
            Path | None,
            typer.Option("--options", help="The reference option YAML (its sde: block)."),
        ] = None,
        geometry: Annotated[
            str,
            typer.Option(
                "--geometry",
                help="Scanner geometry: syndeeplesion, or a JSON file of FanBeamGeometry fields.",
            ),
        ] = "syndeeplesion",
        clip_preprocess: Annotated[
            str,
            typer.Option(
                "--clip-preprocess",
                help="tensor (bilinear, exportable) or daclip (DA-CLIP's PIL bicubic, host).",
            ),
        ] = "tensor",
        mu_source: Annotated[
            str, typer.Option("--mu-source", help="What the loops revert to: ma | li | nmar.")
        ] = "ma",
        unet_config: Annotated[
            str | None,
            typer.Option(
                "--unet-config",
                help="UNetConfig fields the shapes cannot tell, JSON or a JSON file, e.g. "
                "'{\"attn_head_dim\": 64}'.",
            ),
        ] = None,
        clip_config: Annotated[
            str | None,
            typer.Option(
                "--clip-config",
                help="DuDoCLIPConfig fields, JSON or a JSON file, e.g. "
                '\'{"text_cfg": {"heads": 8}}\'.',
            ),
        ] = None,
    ) -> None:
        """Build a bundle from checkpoints trained with the DA-CLIP / IR-SDE reference code."""
        from mar_rt.errors import MarRtError
        from mar_rt.train.import_reference import import_reference

        try:
            report = import_reference(
                out,
                daclip=daclip,
                daclip_sinogram=daclip_sinogram,
                unet_image=unet_image,
                unet_sinogram=unet_sinogram,
                unet_residual=unet_residual,
                options=options,
                geometry=geometry,
                clip_preprocess=clip_preprocess,
                mu_source=mu_source,
                unet_overrides=_json_option(unet_config, "--unet-config"),
                clip_overrides=_json_option(clip_config, "--clip-config"),
            )
        except MarRtError as exc:
            raise _fail(str(exc)) from exc
        for name, cfg in report.configs.items():
            src = report.sources.get(name)
            origin = f"{src['file']} (sha256 {src['sha256'][:12]}…)" if src else "copy"
            describe = _describe_clip if name.startswith("clip_") else _describe_unet
            typer.echo(f"{name:<14} {origin}: {describe(cfg)}")
        sde = report.sde
        typer.echo(
            f"sde            max_sigma {sde['max_sigma']:g}, T {sde['T']}, {sde['schedule']}, "
            f"eps {sde['eps']:g}; pipeline steps {report.pipeline['steps']}, "
            f"mu_source {report.pipeline['mu_source']}"
        )
        on = [k for k in ("run_image_sde", "run_sinogram_sde", "run_osro", "osro_residual")]
        typer.echo(
            "stages         "
            + ", ".join(f"{k} {'on' if report.pipeline[k] else 'off'}" for k in on)
        )
        for note in report.notes:
            typer.echo(f"note           {note}")
        typer.echo(f"wrote {report.bundle}")
