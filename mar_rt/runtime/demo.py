"""The demo: one real slice, a seeded simulated implant, and a side-by-side panel of input, LI,
NMAR, DuDoCROP and the clean target with PSNR/SSIM (``mar-rt run`` without input).

Also ``make_untrained_bundle``, a quick bundle of randomly initialised networks for tests,
timing runs and export checks (its outputs are meaningless as images).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.resample import resample_images
from mar_rt.models.sde import SDEConfig
from mar_rt.runtime.config import PipelineConfig
from mar_rt.runtime.sampler import ProgressFn

log = logging.getLogger(__name__)

DEMO_SLICE = "demo_slice.npz"
HU_WINDOW = (-175.0, 275.0)
"""Soft-tissue display window of the panel (HU)."""

UNTRAINED_STEPS = 10
"""Default reverse-SDE steps written into an untrained bundle's pipeline section."""

PANEL = (
    ("input", "Input (metal)"),
    ("li", "LI"),
    ("nmar", "NMAR"),
    ("dudocrop", "DuDoCROP"),
    ("target", "Target"),
)


# ------------------------------------------------------------------ small geometry + bundle
def small_geometry(size: int = 64, *, n_views: int = 96, n_det: int = 97) -> FanBeamGeometry:
    """The SynDeepLesion field of view (15.36 cm) at ``size``², with fewer views and bins,
    the detector still covering 2√2 × the field (for fast tests)."""
    base = FanBeamGeometry.syndeeplesion().with_image_size(size)
    fov = size * base.pixel_size
    return FanBeamGeometry(
        n_rows=size,
        n_cols=size,
        pixel_size=base.pixel_size,
        n_views=n_views,
        n_det=n_det,
        det_spacing=2 * math.sqrt(2) * fov / n_det,
        source_distance=base.source_distance,
        detector_distance=base.detector_distance,
    )


def _network_configs(config: str) -> tuple[Any, Any]:
    from mar_rt.models.dudoclip import DuDoCLIPConfig
    from mar_rt.models.unet import UNetConfig

    if config == "tiny":
        clip = DuDoCLIPConfig.tiny()
        return clip, UNetConfig.tiny(context_dim=clip.embed_dim)
    if config == "paper":
        clip = DuDoCLIPConfig.paper()
        return clip, UNetConfig.paper(context_dim=clip.embed_dim)
    if config == "micro":  # the smallest networks the configs accept: for unit tests only
        clip = DuDoCLIPConfig(
            embed_dim=32,
            image_size=32,
            vision_cfg={"layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
            text_cfg={
                "context_length": 77,
                "vocab_size": 49408,
                "width": 32,
                "heads": 1,
                "layers": 1,
            },
        )
        unet = UNetConfig(
            nf=8,
            ch_mult=(1, 2, 2),
            num_res_blocks=1,
            context_dim=32,
            time_sin_dim=16,
            time_dim=32,
            prompt_len=16,
            attn_head_dim=8,
            linear_attn_heads=1,
            linear_attn_head_dim=8,
            transformer_levels=(),
            ff_mult=2,
            norm_groups=4,
        )
        return clip, unet
    raise ValueError(f"config must be 'micro', 'tiny' or 'paper', got {config!r}")


def make_untrained_bundle(
    folder: str | Path,
    *,
    config: str = "tiny",
    seed: int = 0,
    geometry: FanBeamGeometry | None = None,
    pipeline: PipelineConfig | None = None,
    sde: SDEConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle of randomly initialised networks (seeded) to ``folder``.

    Args:
        config: ``micro`` (unit tests), ``tiny`` (the demo networks' size) or ``paper``.
        seed: initialises every network (each with its own offset); the global RNG is untouched.
        geometry: default SynDeepLesion (416², 640 × 641).
        pipeline: default ``PipelineConfig(steps=UNTRAINED_STEPS)`` at the geometry's size.
        sde: default ``SDEConfig()`` (T = 100, max_sigma = 50, cosine).
    """
    from mar_rt.ct import units
    from mar_rt.models.bundle import save_bundle
    from mar_rt.models.dudoclip import DuDoCLIP
    from mar_rt.models.prompts import PROMPT_VERSION
    from mar_rt.models.unet import ConditionalUNet

    geometry = geometry or FanBeamGeometry.syndeeplesion()
    if geometry.n_rows != geometry.n_cols:
        raise ValueError(
            f"make_untrained_bundle: the image grid must be square, got {geometry.image_shape}"
        )
    pipeline = pipeline or PipelineConfig(steps=UNTRAINED_STEPS, image_size=geometry.n_rows)
    clip_cfg, unet_cfg = _network_configs(config)
    modules: dict[str, torch.nn.Module] = {}
    for k, domain in enumerate(("image", "sinogram")):
        modules[f"clip_{domain}"] = DuDoCLIP(clip_cfg, seed=seed + 101 * k)
    for k, domain in enumerate(("image", "sinogram", "residual")):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1009 + 101 * k)
            modules[f"unet_{domain}"] = ConditionalUNet(unet_cfg)
    cfg = {
        "sde": sde or SDEConfig(),
        "prompt_version": PROMPT_VERSION,
        "geometry": geometry.to_dict(),
        "normalisation": {
            "image_max_mu": units.IMAGE_NET_MAX_MU,
            "sino_max": units.SINO_NET_MAX,
            "residual_scale": pipeline.residual_scale,
        },
        "pipeline": pipeline.to_dict(),
    }
    return save_bundle(folder, cfg, modules, overwrite=overwrite)


# ------------------------------------------------------------------ the demo
def load_demo_slice() -> np.ndarray:
    """The shipped demo slice: μ (cm⁻¹) float32 (416, 416); see ``mar_rt/assets/README.md``."""
    path = Path(__file__).resolve().parents[1] / "assets" / DEMO_SLICE
    with np.load(path) as data:
        return data["mu"].astype(np.float32)


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its files, and what it measured."""

    png: Path
    metrics_json: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def _to_grid(mu: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    x = torch.from_numpy(mu)
    if tuple(x.shape) == tuple(shape):
        return x
    return resample_images(x, shape)


def run_demo(
    out_dir: str | Path,
    bundle: str | Path | None = None,
    *,
    backend: str = "torch",
    device: str = "cpu",
    steps: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> DemoResult:
    """Simulate a seeded implant in the demo slice, correct it, and write the panel.

    1. load the slice (resampled to the bundle grid if the bundle is not 416²);
    2. a seeded procedural implant inside the body (``mar_rt.ct.masks``) and its simulated
       scan (``mar_rt.ct.simulate``, the SynDeepLesion protocol);
    3. LI and DuDoCROP from the pipeline, NMAR from ``mar_rt.ct.mar``;
    4. PSNR / SSIM against the clean slice (SynDeepLesion convention, metal excluded);
    5. ``demo.png`` (input | LI | NMAR | DuDoCROP | target, HU window [−175, 275]) and
       ``metrics.json`` in ``out_dir``, each written atomically.
    """
    from mar_rt.ct import metrics
    from mar_rt.ct.mar import nmar_correct
    from mar_rt.ct.masks import body_outline, generate_metal_mask
    from mar_rt.ct.simulate import simulate_metal_artifact
    from mar_rt.runtime.bundle_access import DEMO_BUNDLE
    from mar_rt.runtime.pipeline import DuDoCROPPipeline

    bundle_path = Path(bundle) if bundle is not None else DEMO_BUNDLE
    out_dir = Path(out_dir)
    with DuDoCROPPipeline.from_bundle(bundle_path, backend=backend, device=device) as pipe:
        geometry = pipe.geometry
        # 1-2. slice, implant, simulated scan
        target = _to_grid(load_demo_slice(), geometry.image_shape)
        mask = torch.from_numpy(
            generate_metal_mask(geometry.image_shape, seed=seed, body_mask=body_outline(target))
        )
        proj = pipe.operators.ct_view()  # the pipeline's FP / FBP, also for simulation and NMAR
        target, mask = target.to(proj.device), mask.to(proj.device)
        sim = simulate_metal_artifact(target, mask, geometry=geometry, seed=seed, projector=proj)
        # 3. correct
        out = pipe(
            sim["ma_CT"],
            sinogram=sim["ma_sinogram"],
            sinogram_is_measured=True,
            mask=mask,
            steps=steps,
            seed=seed,
            progress=progress,
        )
        nmar = nmar_correct(
            sim["ma_CT"],
            mask,
            geometry,
            sinogram=sim["ma_sinogram"],
            projector=proj,
            filter=pipe.config.fbp_filter,
            allow_edge=True,
        )["nmar_image"]
        images = {
            "input": sim["ma_CT"].cpu(),
            "li": out.intermediates["x_li"][0].cpu(),
            "nmar": nmar.cpu(),
            "dudocrop": out.output.cpu(),
            "target": target.cpu(),
        }
        target, mask = target.cpu(), mask.cpu()
        # 4. metrics
        scores = {
            name: {
                "psnr": float(metrics.psnr(img, target, mask)),
                "ssim": float(metrics.ssim(img, target, mask)),
            }
            for name, img in images.items()
            if name != "target"
        }
        record = {
            "slice": f"mar_rt/assets/{DEMO_SLICE} (SynDeepLesion train 000195_02_02/202, clean)",
            "image_shape": list(geometry.image_shape),
            "metal_px": int(mask.sum()),
            "seed": int(seed),
            "steps": out.steps,
            "bundle": str(bundle_path),
            "backend": pipe.graphs.backend,
            "device": str(pipe.device),
            "methods": scores,
            "timings_s": out.timings,
            "qa": out.qa.to_dict(),
        }
    # 5. files
    out_dir.mkdir(parents=True, exist_ok=True)
    png = write_panel(out_dir / "demo.png", images, scores, mask=mask)
    metrics_json = out_dir / "metrics.json"
    from mar_rt.runtime.io.common import atomic_file

    with atomic_file(metrics_json) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return DemoResult(png=png, metrics_json=metrics_json, metrics=record)


def write_panel(
    path: Path,
    images: dict[str, torch.Tensor],
    scores: dict[str, dict[str, float]],
    *,
    mask: torch.Tensor | None = None,
    window: tuple[float, float] = HU_WINDOW,
) -> Path:
    """One row of images in HU (``PANEL`` order) with PSNR/SSIM titles, written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from mar_rt.ct.units import mu_to_hu
    from mar_rt.runtime.io.common import atomic_file

    names = [(k, t) for k, t in PANEL if k in images]
    fig = Figure(figsize=(3.2 * len(names), 3.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(names))
    for ax, (key, title) in zip(np.atleast_1d(axes), names, strict=True):
        hu = mu_to_hu(images[key].detach().cpu().to(torch.float32)).numpy()
        ax.imshow(hu, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
        if key in scores:
            s = scores[key]
            title = f"{title}\n{s['psnr']:.2f} dB / SSIM {s['ssim']:.3f}"
        else:
            title = f"{title}\n[{window[0]:.0f}, {window[1]:.0f}] HU"
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
