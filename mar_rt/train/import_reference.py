"""Build a mar-rt bundle from checkpoints trained with the reference code (``mar-rt import``).

A researcher who trained DuDoCROP with the public DA-CLIP / IR-SDE code
(``Algolzw/daclip-uir``) holds:

    DA-CLIP checkpoint(s)   open_clip trainer: {"epoch", "name", "state_dict" ("module." keys),
                            "optimizer"}; one per domain (image, and optionally sinogram)
    U-Net checkpoint(s)     IR-SDE trainer's save_network: a plain state dict; one per stage
                            (image, sinogram, residual), each optional
    option YAML             the trainer's options; its ``sde:`` block (max_sigma, T, schedule,
                            eps, sample_T)

:func:`import_reference` reads them (``torch.load(weights_only=True)``, nothing is unpickled),
infers every network config from tensor shapes (``mar_rt.models.reference``), and writes a
bundle (``mar_rt.models.bundle``) whose manifest gains an ``import`` section: each source
file's name, size and sha256, what was inferred, and the choices made.  The bundle folder is
written atomically (it appears complete or not at all).

Choices the files cannot tell (each recorded in the manifest):

    * a missing sinogram DA-CLIP: the image DA-CLIP also serves the sinogram domain;
    * a missing U-Net: its stage is switched off in the pipeline config (no sinogram net:
      OSRO off; no residual net: OSRO's residual step off).  The bundle still holds a network
      for every stage (the runtime's graph set has one per stage): a copy of an imported
      U-Net, which the pipeline never runs;
    * no option YAML: DA-CLIP's options (max_sigma 50, T 100, cosine, eps 0.005);
    * pipeline steps: the options' ``sample_T`` when set, else T;
    * μ: the metal-affected pair (``mu_source="ma"``), as the DuDoCROP paper reverts to it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mar_rt.errors import BadInputError, BundleError

__all__ = ["GEOMETRIES", "ImportReport", "import_reference", "infer_daclip_config"]

log = logging.getLogger(__name__)

GEOMETRIES = ("syndeeplesion",)
DOMAINS = ("image", "sinogram", "residual")


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_reference` wrote and inferred."""

    bundle: Path
    sources: dict[str, dict[str, Any]]
    configs: dict[str, dict[str, Any]]
    sde: dict[str, Any]
    pipeline: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- DA-CLIP config


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := rx.match(k))})


def infer_daclip_config(
    state: Mapping[str, torch.Tensor], *, where: str, overrides: Mapping[str, Any] | None = None
) -> Any:
    """``DuDoCLIPConfig`` of a DA-CLIP state dict (``clip.*`` keys), from tensor shapes.

    Read from shapes: embed_dim, image size and patch, widths, layer counts, MLP ratios,
    context length, vocabulary.  Not readable: attention heads (open_clip's conventions are
    assumed: 64 channels per head in both towers) and ``quick_gelu`` (False, as DA-CLIP);
    ``overrides`` replaces top-level fields and merges into ``vision_cfg`` / ``text_cfg``.
    """
    from mar_rt.models.dudoclip import DuDoCLIPConfig

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise BundleError(f"{where}: missing tensor {key!r}; not a DA-CLIP ViT checkpoint")
        return tuple(state[key].shape)

    conv = shape("clip.visual.conv1.weight")
    width, patch = conv[0], conv[-1]
    tokens = shape("clip.visual.positional_embedding")[0] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise BundleError(f"{where}: {tokens} image tokens is not a square grid")
    token_emb = shape("clip.token_embedding.weight")
    text_width = token_emb[1]
    vision_layers = _count(state, "clip.visual.transformer.resblocks.")
    text_layers = _count(state, "clip.transformer.resblocks.")
    vision: dict[str, Any] = {
        "layers": vision_layers,
        "width": width,
        "head_width": 64,
        "patch_size": patch,
        "image_size": grid * patch,
    }
    v_mlp = shape("clip.visual.transformer.resblocks.0.mlp.c_fc.weight")[0] / width
    if v_mlp != 4.0:
        vision["mlp_ratio"] = v_mlp
    text: dict[str, Any] = {
        "context_length": shape("clip.positional_embedding")[0],
        "vocab_size": token_emb[0],
        "width": text_width,
        "heads": max(1, text_width // 64),
        "layers": text_layers,
    }
    t_mlp = shape("clip.transformer.resblocks.0.mlp.c_fc.weight")[0] / text_width
    if t_mlp != 4.0:
        text["mlp_ratio"] = t_mlp
    values: dict[str, Any] = {
        "embed_dim": shape("clip.text_projection")[1],
        "image_size": grid * patch,
        "vision_cfg": vision,
        "text_cfg": text,
        "quick_gelu": False,
    }
    for key, value in (overrides or {}).items():
        if key in ("vision_cfg", "text_cfg") and isinstance(value, Mapping):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    if "image_size" in (overrides or {}):
        values["vision_cfg"]["image_size"] = values["image_size"]
    try:
        return DuDoCLIPConfig(**values)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: inferred DuDoCLIP config is invalid: {exc}") from exc


def _load_daclip(path: Path, overrides: Mapping[str, Any] | None) -> Any:
    from mar_rt.models.dudoclip import DuDoCLIP
    from mar_rt.models.reference import read_torch_state_dict

    state = read_torch_state_dict(path)
    cfg = infer_daclip_config(state, where=str(path), overrides=overrides)
    model = DuDoCLIP(cfg)
    try:
        model.load_daclip_checkpoint(path)
    except BadInputError as exc:
        raise BundleError(str(exc)) from exc
    return model.eval()


# --------------------------------------------------------------------------- the import


def _source(path: Path, kind: str) -> dict[str, Any]:
    from mar_rt.models.bundle import sha256_file

    return {
        "file": path.name,
        "kind": kind,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _existing(path: str | os.PathLike[str] | None, flag: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{flag} {path}: file not found")
    return path


def import_reference(
    out: str | os.PathLike[str],
    *,
    daclip: str | os.PathLike[str],
    daclip_sinogram: str | os.PathLike[str] | None = None,
    unet_image: str | os.PathLike[str] | None = None,
    unet_sinogram: str | os.PathLike[str] | None = None,
    unet_residual: str | os.PathLike[str] | None = None,
    options: str | os.PathLike[str] | None = None,
    geometry: str | os.PathLike[str] = "syndeeplesion",
    clip_preprocess: str = "tensor",
    mu_source: str = "ma",
    unet_overrides: Mapping[str, Any] | None = None,
    clip_overrides: Mapping[str, Any] | None = None,
) -> ImportReport:
    """Write a bundle at ``out`` (must not exist) from reference checkpoints.

    Args:
        out: the new bundle folder.
        daclip: DA-CLIP checkpoint of the image domain.
        daclip_sinogram: DA-CLIP checkpoint of the sinogram domain (default: ``daclip``).
        unet_image, unet_sinogram, unet_residual: IR-SDE U-Net checkpoints (at least one).
        options: the reference option YAML (its ``sde:`` block).
        geometry: the scanner geometry: a name (``GEOMETRIES``) or a JSON file of
            ``FanBeamGeometry`` fields (square image grid).
        clip_preprocess: ``"tensor"`` or ``"daclip"`` (``DuDoCLIPConfig.preprocess``).
        mu_source: what the DAPG loops revert to (``PipelineConfig.mu_source``).
        unet_overrides: ``UNetConfig`` fields the shapes cannot tell, for every U-Net.
        clip_overrides: ``DuDoCLIPConfig`` fields (e.g. heads), for every DA-CLIP.

    Raises ``BadInputError`` for a missing file or a bad option, ``BundleError`` for a
    checkpoint that does not fit (naming the file and tensor).
    """
    from mar_rt.models import prompts
    from mar_rt.models.bundle import save_bundle, update_bundle
    from mar_rt.models.reference import (
        load_irsde_unet,
        read_reference_options,
        sample_steps_from_options,
    )
    from mar_rt.models.sde import SDEConfig
    from mar_rt.runtime.config import PipelineConfig
    from mar_rt.runtime.io.common import atomic_folder

    out = Path(out)
    if out.exists():
        raise BadInputError(f"--out {out}: exists; choose a new bundle folder")
    geo = _geometry(geometry)
    clip_paths = {
        "image": _existing(daclip, "--daclip"),
        "sinogram": _existing(daclip_sinogram, "--daclip-sinogram"),
    }
    if clip_paths["image"] is None:
        raise BadInputError("--daclip is required (the image-domain DA-CLIP checkpoint)")
    unet_paths = {
        "image": _existing(unet_image, "--unet-image"),
        "sinogram": _existing(unet_sinogram, "--unet-sinogram"),
        "residual": _existing(unet_residual, "--unet-residual"),
    }
    if all(p is None for p in unet_paths.values()):
        raise BadInputError("give at least one U-Net (--unet-image, --unet-sinogram, ...)")
    options_path = _existing(options, "--options")
    notes: list[str] = []

    # 1. SDE and sampling steps
    if options_path is not None:
        sde = SDEConfig.from_reference_options(options_path)
        steps = sample_steps_from_options(read_reference_options(options_path)) or sde.T
    else:
        sde = SDEConfig(T=100, max_sigma=50.0, schedule="cosine", eps=0.005)
        steps = sde.T
        notes.append("no --options: DA-CLIP's SDE (max_sigma 50, T 100, cosine, eps 0.005)")

    # 2. networks
    sources: dict[str, dict[str, Any]] = {}
    modules: dict[str, torch.nn.Module] = {}
    clip_over = dict(clip_overrides or {})
    if clip_preprocess != "tensor":
        clip_over["preprocess"] = clip_preprocess
    for domain in ("image", "sinogram"):
        path = clip_paths[domain] or clip_paths["image"]
        if domain == "sinogram" and clip_paths["sinogram"] is None:
            notes.append("no --daclip-sinogram: the image DA-CLIP also serves the sinogram")
            modules["clip_sinogram"] = copy.deepcopy(modules["clip_image"])
        else:
            modules[f"clip_{domain}"] = _load_daclip(path, clip_over)
        sources[f"clip_{domain}"] = _source(path, "daclip")
    embed_dim = modules["clip_image"].cfg.embed_dim
    loaded = {}
    for domain, path in unet_paths.items():
        if path is None:
            continue
        net = load_irsde_unet(path, **dict(unet_overrides or {}))
        if net.cfg.in_channels != 1 or net.cfg.out_channels != 1:
            raise BundleError(
                f"{path}: the U-Net has {net.cfg.in_channels} input / {net.cfg.out_channels} "
                "output channels; a CT stage needs 1 / 1"
            )
        clip_name = "clip_sinogram" if domain == "sinogram" else "clip_image"
        if net.cfg.context_dim != modules[clip_name].cfg.embed_dim:
            raise BundleError(
                f"{path}: the U-Net's context_dim {net.cfg.context_dim} does not match the "
                f"{clip_name} embedding dimension {modules[clip_name].cfg.embed_dim}"
            )
        loaded[domain] = net
        sources[f"unet_{domain}"] = _source(path, "irsde_unet")
    for domain in DOMAINS:
        if domain in loaded:
            modules[f"unet_{domain}"] = loaded[domain]
            continue
        stand_in = next(d for d in DOMAINS if d in loaded)
        notes.append(
            f"no --unet-{domain}: its stage is off; unet_{domain} holds a copy of "
            f"unet_{stand_in} (never run)"
        )
        modules[f"unet_{domain}"] = copy.deepcopy(loaded[stand_in])
    if modules["clip_sinogram"].cfg.embed_dim != embed_dim:
        notes.append("the two DA-CLIPs have different embedding dimensions")

    # 3. pipeline and the bundle
    try:
        pipeline = PipelineConfig(
            steps=int(steps),
            mu_source=mu_source,
            image_size=geo.n_rows,
            run_image_sde="image" in loaded,
            run_sinogram_sde="sinogram" in loaded,
            run_osro="sinogram" in loaded,
            osro_residual="residual" in loaded,
        )
    except ValueError as exc:
        raise BadInputError(f"pipeline: {exc}") from exc
    config = {
        "sde": sde,
        "prompt_version": prompts.PROMPT_VERSION,
        "geometry": geo.to_dict(),
        "normalisation": {
            "image": "x = clip(mu, 0, 0.5) / 0.5",
            "sinogram": "y = clip(p, 0, 4) / 4",
            "residual": f"r = clip(R / {pipeline.residual_scale}, -1, 1)",
        },
        "pipeline": pipeline.to_dict(),
    }
    record = {
        "from": "Algolzw/daclip-uir (DA-CLIP / IR-SDE reference code)",
        "sources": sources,
        "options": None if options_path is None else _source(options_path, "options"),
        "geometry": str(geometry)
        if str(geometry) in GEOMETRIES
        else _source(Path(geometry), "geometry"),
        "inferred": {name: _plain_config(m.cfg) for name, m in modules.items()},
        "notes": notes,
    }
    with atomic_folder(out) as tmp:
        save_bundle(tmp, config, modules, overwrite=True)
        update_bundle(tmp, **{"import": record})
    log.info("imported %s into %s", sorted(sources), out)
    return ImportReport(
        bundle=out,
        sources=sources,
        configs=record["inferred"],
        sde=sde.to_dict(),
        pipeline=pipeline.to_dict(),
        notes=notes,
    )


def _geometry(geometry: str | os.PathLike[str]) -> Any:
    """``FanBeamGeometry`` by name or from a JSON file of its fields."""
    import json

    from mar_rt.ct.geometry import FanBeamGeometry

    if str(geometry) == "syndeeplesion":
        return FanBeamGeometry.syndeeplesion()
    path = Path(geometry)
    if not path.is_file():
        raise BadInputError(
            f"--geometry must be one of {GEOMETRIES} or a JSON file of FanBeamGeometry fields, "
            f"got {str(geometry)!r}"
        )
    try:
        geo = FanBeamGeometry(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise BadInputError(f"--geometry {path}: not a FanBeamGeometry JSON file: {exc}") from exc
    if geo.n_rows != geo.n_cols:
        raise BadInputError(
            f"--geometry {path}: the image grid must be square, got {geo.image_shape}"
        )
    return geo


def _plain_config(cfg: Any) -> dict[str, Any]:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
