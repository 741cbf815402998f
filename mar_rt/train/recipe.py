"""Train a whole bundle in order, with per-stage time budgets (DESIGN.md §7–§9).

Stages (each a function; the budget of a stage is its share of the time still left):

    1. data            clean slices → training pairs (simulated, cached) and the validation set
    2. clip_image      DuDoCLIP on x(X_ma);   3. clip_sinogram   DuDoCLIP on y(Y_ma)
    4. embeddings      content/artifact embeddings of every pair, computed once
    5. unet_image      IR-SDE, μ = x(X_LI), x(X_NMAR) or x(X_ma) (``pipeline.mu_source``),
                       target x(X)
    6. unet_sinogram   IR-SDE, μ = the matching sinogram, target y(Y), loss weighted to the
                       trace
    7. residual_data   the real pipeline (DAPG + OSRO steps 1–2) on training pairs → R, X'_p,
                       on each route that runs the residual loop (``residual_routes``)
    8. unet_residual   IR-SDE, μ = R/scale, target (X − X'_p)/scale, X the route's image
                       target (``DataConfig.image_target``)
    9. tune            sampling steps, α and OSRO switches on validation cases (the same
                       cases the final evaluation uses: a selection on the validation set)
   10. bundle          ``bundle.json`` + fp16 safetensors + ``train_report.json``

A bundle is saved after stages 5, 6 and 8 with the pipeline switched to what is trained so far
(untrained U-Nets are stored at their random initialisation and switched off), so a run cut
short still leaves a usable bundle. Validation during training and stages 7 and 9 run
``mar_rt.runtime.pipeline.DuDoCROPPipeline``: validation goes through the real pipeline
(``train`` sits above ``runtime`` in the layers). The presets are data, in ``presets``.

Checkpoints live in ``<work>/ckpt``; ``resume`` skips finished stages and continues a
U-Net run from its checkpoint. ``init_from`` (a bundle) starts every U-Net from that bundle's
weights instead of ``identity_init``: fine-tuning an existing bundle with a new recipe or data.
Its DuDoCLIP networks (when their config is the recipe's) serve where no CLIP stage runs and no
checkpoint exists, so U-Nets can be fine-tuned in a fresh work folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mar_rt.ct import metrics
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.errors import MarRtError
from mar_rt.models.bundle import Bundle, load_bundle, save_bundle
from mar_rt.models.sde import make_schedule
from mar_rt.models.unet import ConditionalUNet
from mar_rt.train.clip_set import ClipSet, clip_inputs, clip_set
from mar_rt.train.clip_trainer import embed, train_clip
from mar_rt.train.data_config import image_only_view, training_jobs
from mar_rt.train.domains import (
    DomainData,
    concat_domains,
    image_domain,
    residual_domain,
    sinogram_domain,
    with_nmar,
    with_scanner_targets,
)
from mar_rt.train.pair_meta import PairMeta
from mar_rt.train.pairs import PairSet, generate_pairs
from mar_rt.train.presets import RecipeConfig
from mar_rt.train.sde_trainer import identity_init, train_sde
from mar_rt.train.sources import CleanSlice, load_clean_slices
from mar_rt.train.split import check_no_validation, phantom_slices, split_slices
from mar_rt.train.validation_set import VAL_SIM_RANGES, write_validation_set

log = logging.getLogger(__name__)

STAGES = (
    "data", "clip_image", "clip_sinogram", "unet_image", "unet_sinogram",
    "residual_data", "unet_residual", "tune",
)  # fmt: skip
NETWORKS = ("clip_image", "clip_sinogram", "unet_image", "unet_sinogram", "unet_residual")
REPORT = "train_report.json"


# --- time budgets --------------------------------------------------------------------------------
class Clock:
    """Splits the time left among the stages still to run, in proportion to their shares."""

    def __init__(self, total_minutes: float | None, budget: Sequence[tuple[str, float]]) -> None:
        self.t0 = time.monotonic()
        self.total = None if total_minutes is None else 60.0 * total_minutes
        self.share = dict(budget)

    def left(self) -> float | None:
        return None if self.total is None else max(0.0, self.total - (time.monotonic() - self.t0))

    def stage_minutes(self, stage: str) -> float | None:
        """Minutes for ``stage``: its share of the time left among it and the later stages."""
        if self.total is None:
            return None
        later = STAGES[STAGES.index(stage) :]
        weight = sum(self.share.get(s, 0.0) for s in later)
        return max(0.05, (self.left() or 0.0) * self.share.get(stage, 0.0) / max(weight, 1e-9) / 60)

    def deadline(self, stage: str) -> float | None:
        m = self.stage_minutes(stage)
        return None if m is None else time.monotonic() + 60.0 * m


# --- bundle --------------------------------------------------------------------------------------
def bundle_config(recipe: RecipeConfig, pipeline: Any) -> dict[str, Any]:
    """The ``save_bundle`` config sections for ``recipe`` with ``pipeline``."""
    from mar_rt.models import prompts

    return {
        "sde": recipe.sde,
        "prompt_version": prompts.PROMPT_VERSION,
        "geometry": FanBeamGeometry.syndeeplesion().to_dict(),
        "normalisation": {
            "image": "x = clip(mu, 0, 0.5) / 0.5",
            "sinogram": "y = clip(p, 0, 4) / 4",
            "residual": f"r = clip(R / {pipeline.residual_scale}, -1, 1)",
        },
        "pipeline": pipeline.to_dict(),
    }


def write_bundle(
    out: str | os.PathLike[str],
    recipe: RecipeConfig,
    nets: dict[str, torch.nn.Module],
    pipeline: Any,
) -> Path:
    """Save the five networks (fp16 copies when ``recipe.store_fp16``) and the config."""
    modules = {}
    for name in NETWORKS:
        m = copy.deepcopy(nets[name]).to("cpu").eval()
        modules[name] = m.half() if recipe.store_fp16 else m
    return save_bundle(out, bundle_config(recipe, pipeline), modules, overwrite=True)


def stage_pipeline(pipeline: Any, trained: set[str]) -> Any:
    """The pipeline config a partly trained bundle ships with: ``pipeline``, with the loops
    whose net is not trained off on every route (OSRO needs the sinogram net, the residual
    loop its net); a loop the recipe switches off stays off."""
    off: dict[str, bool] = {}
    if "unet_image" not in trained:
        off["run_image_sde"] = False
    if "unet_sinogram" not in trained:
        off.update(run_sinogram_sde=False, run_osro=False)
    if "unet_residual" not in trained:
        off["osro_residual"] = False
    route = dict(pipeline.image_only or {})
    route.update({k: v for k, v in off.items() if k in route})
    return pipeline.replace(**off, image_only=route or None)


# --- validation through the real pipeline --------------------------------------------------------
def spread_cases(metas: Sequence[PairMeta], n: int) -> list[int]:
    """``n`` validation case indices spread over sizes and slices (deterministic)."""
    order = sorted(range(len(metas)), key=lambda i: (metas[i].k, metas[i].slice_id))
    if n <= 0 or n >= len(order):
        return order
    pick = np.linspace(0, len(order) - 1, n).round().astype(int)
    return [order[i] for i in pick]


@torch.no_grad()
def run_pipeline(
    bundle: str | os.PathLike[str], pairs: PairSet, config: Any, *, device: str,
    steps: int | None = None, seed: int = 0, intermediates: bool = False,
    route: str = "sinogram",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The real pipeline on ``pairs`` with their masks → (outputs (N, H, W) on CPU,
    intermediates on CPU if asked). ``route`` "sinogram": the measured ``ma_sinogram``;
    "image_only": ``ma_CT`` alone (the pipeline reprojects it and runs the config's image-only
    overrides), as for :func:`image_only_view` pairs."""
    from mar_rt.runtime.pipeline import DuDoCROPPipeline

    if route not in ("sinogram", "image_only"):
        raise ValueError(f"route must be 'sinogram' or 'image_only', got {route!r}")
    f = pairs.fields
    outs, inter = [], {}
    with DuDoCROPPipeline.from_bundle(bundle, device=device, config=config) as pipe:
        bs = config.batch_size
        for i in range(0, len(pairs), bs):
            sl = slice(i, i + bs)
            y = f["ma_sinogram"][sl].to(device) if route == "sinogram" else None
            res = pipe(
                f["ma_CT"][sl].to(device), sinogram=y, sinogram_is_measured=y is not None,
                mask=f["mask"][sl].to(device), steps=steps, seed=seed,
                return_intermediates=intermediates,
            )  # fmt: skip
            outs.append(res.output.cpu().clone())
            for k, v in res.intermediates.items():
                inter.setdefault(k, []).append(v.cpu().clone())
    return torch.cat(outs), {k: torch.cat(v) for k, v in inter.items()}


def score(images: torch.Tensor, pairs: PairSet, target: str = "image") -> dict[str, float]:
    """Mean PSNR / SSIM (SynDeepLesion convention) of ``images`` against the pairs' field
    ``target`` (the clean slice by default)."""
    ref, mask = pairs.fields[target].cpu(), pairs.fields["mask"].cpu()
    p = np.atleast_1d(metrics.psnr(images, ref, mask))
    s = np.atleast_1d(metrics.ssim(images, ref, mask))
    return {"psnr": float(p.mean()), "ssim": float(s.mean())}


def domain_val_config(pipeline: Any, domain: str) -> Any:
    """What the pipeline runs to judge one U-Net: image → X_p only; sinogram → X'_p = FBP(Y_f)
    only; residual → the full pipeline."""
    if domain == "image":
        return pipeline.replace(run_sinogram_sde=False, run_osro=False)
    if domain == "sinogram":
        return pipeline.replace(
            run_image_sde=False, run_sinogram_sde=True, run_osro=True, fidelity_prior="sinogram",
            osro_residual=False, norm2=False, alpha=1.0, image_only=None,
        )  # fmt: skip
    return pipeline


# --- the recipe ----------------------------------------------------------------------------------
@dataclass
class Run:
    """State of one recipe run (what later stages and the report need)."""

    recipe: RecipeConfig
    device: str
    work: Path
    out: Path
    resume: bool
    progress: bool
    clock: Clock
    stages: tuple[str, ...] = STAGES
    nets: dict[str, torch.nn.Module] = field(default_factory=dict)
    trained: set[str] = field(default_factory=set)
    report: dict[str, Any] = field(default_factory=dict)
    train: PairSet | None = None
    val: PairSet | None = None
    clip_train: ClipSet | None = None  # DuDoCLIP's own pairs (``DataConfig.clip_*``)
    clip_val: ClipSet | None = None  # its zero-shot (PI_s) cases
    emb: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    init: dict[str, dict[str, torch.Tensor]] | None = None  # network name → starting weights

    def ckpt(self, name: str) -> Path:
        (self.work / "ckpt").mkdir(parents=True, exist_ok=True)
        return self.work / "ckpt" / name

    def save(self, pipeline: Any | None = None) -> Path:
        cfg = pipeline or stage_pipeline(self.recipe.pipeline, self.trained)
        path = write_bundle(self.out, self.recipe, self.nets, cfg)
        self.report["pipeline"] = cfg.to_dict()
        self.report["trained"] = sorted(self.trained)
        write_report(self.out, self.report)
        return path

    def load(self, stage: str) -> bool:
        """Reuse ``stage``'s checkpoint: it finished before and we resume or do not rerun it
        (its earlier report entry is kept, marked ``reused``)."""
        marker = self.ckpt(f"{stage}.done")
        if not (marker.is_file() and (self.resume or stage not in self.stages)):
            return False
        info = json.loads(marker.read_text())
        self.report.setdefault("stages", {}).setdefault(stage, {**info, "reused": True})
        return True

    def stage_done(self, stage: str, seconds: float, **info: Any) -> None:
        self.report.setdefault("stages", {})[stage] = {"seconds": round(seconds, 2), **info}
        self.ckpt(f"{stage}.done").write_text(json.dumps(self.report["stages"][stage]))
        log.info("stage %s done in %.1f s", stage, seconds)


def write_report(folder: Path, report: dict[str, Any]) -> None:
    tmp = folder / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, folder / REPORT)


def _stage_data(run: Run, slices: Sequence[CleanSlice]) -> None:
    t0 = time.monotonic()
    r = run.recipe
    dev = run.device
    phantoms = phantom_slices(r.data.phantoms, r.data.seed)
    train_slices, val_slices = split_slices(
        list(slices) + phantoms, r.data.val_ids, r.data.exclude_series
    )
    if not val_slices:
        log.warning("no validation slices among the sources (%s)", r.data.val_ids)
    deadline = run.clock.deadline("data")
    run.val = (
        write_validation_set(
            val_slices, run.work / "val", seed=r.data.seed, device=dev, sizes=r.data.val_sizes
        )
        if val_slices else None
    )  # fmt: skip
    run.train = generate_pairs(
        train_slices, training_jobs(train_slices, r.data), seed=r.data.seed, device=dev,
        cache_dir=run.work / "cache" / "train" if r.cache_pairs else None, deadline=deadline,
        min_pairs=len(train_slices), sim_ranges=r.data.sim_ranges,
        progress=(lambda i, n: log.info("data: pair %d/%d", i, n)) if run.progress else None,
    )  # fmt: skip
    check_no_validation(run.train.metas, r.data.val_ids)
    clip_info = {}
    clip_stages = [st for st in ("clip_image", "clip_sinogram") if st in run.stages]
    if "data" in run.stages or clip_stages:
        own_set = "data" in run.stages or any(getattr(r, st).own_set for st in clip_stages)
        _clip_data(run, slices, val_slices, own_set=own_set, deadline=deadline)
        if run.clip_train is not None:
            clip_info["clip_pairs"] = len(run.clip_train)
        if run.clip_val is not None:
            clip_info["clip_val_cases"] = len(run.clip_val)
    run.stage_done(
        "data", time.monotonic() - t0, train_pairs=len(run.train),
        train_slices=sorted({m.slice_id for m in run.train.metas}),
        val_cases=0 if run.val is None else len(run.val),
        val_slices=[s.slice_id for s in val_slices],
        sources={s.slice_id: s.source for s in list(slices) + phantoms[:1]}, **clip_info,
    )  # fmt: skip


def _clip_data(
    run: Run,
    slices: Sequence[CleanSlice],
    val_slices: Sequence[CleanSlice],
    *,
    own_set: bool,
    deadline: float | None = None,
) -> None:
    """DuDoCLIP's own training pairs (when ``own_set``; cut short at the data stage's
    ``deadline``) and PI_s cases (``DataConfig.clip_*``, always whole), cached in
    ``<work>/cache``; the same seeds as the U-Net pairs."""
    r = run.recipe
    counts = r.data.clip_counts()
    log_progress = (lambda i, n: log.info("clip data: pair %d/%d", i, n)) if run.progress else None
    common = {"seed": r.data.seed, "size": r.clip.image_size, "device": run.device}
    if own_set and (counts.masks_per_slice or counts.phantom_masks):
        phantoms = phantom_slices(counts.phantoms, r.data.seed)
        train_slices, _ = split_slices(
            list(slices) + phantoms, r.data.val_ids, r.data.exclude_series
        )
        run.clip_train = clip_set(
            train_slices, training_jobs(train_slices, counts), **common,
            cache_file=run.work / "cache" / "clip_train.pt", progress=log_progress,
            clean=r.data.clip_clean, deadline=deadline,
        )  # fmt: skip
        check_no_validation(run.clip_train.metas, r.data.val_ids)
    if r.data.clip_val_masks and val_slices:
        per = dataclasses.replace(counts, masks_per_slice=r.data.clip_val_masks)
        run.clip_val = clip_set(
            val_slices, training_jobs(val_slices, per), **common,
            cache_file=run.work / "cache" / "clip_val.pt",
        )  # fmt: skip


def _stage_clip(run: Run, domain: str) -> None:
    from mar_rt.models.dudoclip import DuDoCLIP

    name = f"clip_{domain}"
    r = run.recipe
    model = DuDoCLIP(r.clip, seed=r.data.seed + (0 if domain == "image" else 1)).to(run.device)
    ck = run.ckpt(f"{name}.pt")
    if run.load(name) and ck.is_file():
        model.load_state_dict(torch.load(ck, map_location=run.device, weights_only=True))
        log.info("%s: loaded from %s", name, ck)
    elif name not in run.stages and run.init is not None and name in run.init:
        model.load_state_dict(run.init[name], strict=True)
        log.info("%s: taken from the init bundle", name)
    elif name not in run.stages:
        raise MarRtError(f"{name} is needed but not trained yet (run `mar-rt train clip` first)")
    else:
        t0 = time.monotonic()
        cfg = dataclasses.replace(getattr(r, name), max_minutes=run.clock.stage_minutes(name))
        if run.clip_train is not None and cfg.own_set:
            inputs, metas = run.clip_train.inputs[domain], run.clip_train.metas
        else:
            inputs, metas = clip_inputs(run.train, domain), run.train.metas
        val_inputs, val_metas = None, None
        if run.clip_val is not None:
            val_inputs, val_metas = run.clip_val.inputs[domain], run.clip_val.metas
        elif run.val is not None:
            val_inputs, val_metas = clip_inputs(run.val, domain), run.val.metas
        res = train_clip(
            model, inputs.to(run.device), metas, cfg, domain=domain,
            val_inputs=None if val_inputs is None else val_inputs.to(run.device),
            val_metas=val_metas, progress=run.progress,
        )  # fmt: skip
        torch.save(model.state_dict(), ck)
        run.stage_done(
            name, time.monotonic() - t0, steps=res.steps, pairs=len(metas),
            loss_first=res.losses[:5], loss_last=res.losses[-5:], zero_shot=res.zero_shot,
        )  # fmt: skip
    model.eval().requires_grad_(False)
    run.nets[name] = model
    run.emb[domain] = embed(model, clip_inputs(run.train, domain))
    if run.val is not None:
        run.emb[f"val_{domain}"] = embed(model, clip_inputs(run.val, domain))


UNET_NAMES = tuple(n for n in NETWORKS if n.startswith("unet_"))


def open_init_bundle(folder: str | os.PathLike[str], recipe: RecipeConfig) -> Bundle:
    """The bundle a fine-tuning run starts from: it must hold the three U-Nets with exactly
    the recipe's U-Net config.  Its SDE may differ (e.g. T = 1 weights starting a T = 4 run);
    then its U-Nets are starting weights only (see :func:`train_bundle`)."""
    bundle = load_bundle(folder)
    where = bundle.manifest_path
    for name in UNET_NAMES:
        if name not in bundle.network_names:
            raise MarRtError(f"{where}: no network {name!r} to start from")
        cfg = bundle.network_config(name)
        if cfg != recipe.unet:
            raise MarRtError(
                f"{where}: {name} config {cfg} differs from the recipe's {recipe.unet}"
            )
    return bundle


def init_clips(bundle: Bundle, recipe: RecipeConfig) -> tuple[str, ...]:
    """The DuDoCLIP networks of ``bundle`` with the recipe's CLIP config: the starting (and,
    when their stage does not run, the final) weights of those towers."""
    return tuple(
        n
        for n in ("clip_image", "clip_sinogram")
        if n in bundle.network_names and bundle.network_config(n) == recipe.clip
    )


def _new_unet(run: Run, domain: str) -> ConditionalUNet:
    """A U-Net to train: the ``init_from`` bundle's weights (fp32), else seeded
    ``identity_init``."""
    offset = {"image": 10, "sinogram": 11, "residual": 12}[domain]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.recipe.data.seed + offset)
        unet = ConditionalUNet(run.recipe.unet)
    if run.init is not None:
        unet.load_state_dict(run.init[f"unet_{domain}"], strict=True)
        return unet
    return identity_init(unet, run.recipe.sde.lam) if run.recipe.identity_init else unet


def _validator(run: Run, domain: str):
    """Validation through the real pipeline on ``val_cases`` cases (EMA weights); the residual
    net on the first of :func:`residual_routes`, the others on the measured route."""
    if run.val is None or run.recipe.val_cases == 0:
        return None
    pairs = run.val.subset(spread_cases(run.val.metas, run.recipe.val_cases))
    route = residual_routes(run.recipe)[0] if domain == "residual" else "sinogram"
    target = "image"
    if domain != "sinogram":  # judged against what the image-domain networks are trained for
        pairs, targets = with_image_targets(run, pairs, sim_ranges=VAL_SIM_RANGES)
        target = targets[route]
    pairs = pairs if route == "sinogram" else image_only_view(pairs)
    folder = run.work / "val_bundle"
    cfg = domain_val_config(
        stage_pipeline(run.recipe.pipeline, run.trained | {f"unet_{domain}"}), domain
    )

    def validate(ema: torch.nn.Module, step: int) -> dict[str, Any]:
        try:
            nets = dict(run.nets)
            nets[f"unet_{domain}"] = ema
            write_bundle(folder, run.recipe, nets, cfg)
            out, inter = run_pipeline(
                folder, pairs, cfg, device=run.device, intermediates=True, route=route
            )
            li = score(inter["x_li"], pairs, target)
            res = score(out, pairs, target) | {f"li_{k}": v for k, v in li.items()}
            log.info(
                "unet_%s step %d: val PSNR %.2f dB (LI %.2f), SSIM %.4f (LI %.4f), %s route, "
                "against %s", domain, step, res["psnr"], res["li_psnr"], res["ssim"],
                res["li_ssim"], route, target,
            )  # fmt: skip
            return res | {"route": route, "target": target}
        except (ImportError, MarRtError, RuntimeError, ValueError) as err:
            log.warning("unet_%s: validation through the pipeline failed: %s", domain, err)
            return {"error": str(err)}

    return validate


def with_image_targets(
    run: Run, pairs: PairSet, sim_ranges: str | None = None
) -> tuple[PairSet, dict[str, str]]:
    """``pairs`` with the fields each route's image-domain networks are trained towards
    (``DataConfig.image_target``), and those fields' names per route; "scanner" adds the
    pairs' own metal-free scans (cached), under the settings ``sim_ranges`` the pairs were made
    with (default ``DataConfig.sim_ranges``, the training pairs')."""
    r = run.recipe
    if r.data.image_target != "scanner":
        return pairs, {"sinogram": "image", "image_only": "image"}
    if "scanner_CT" not in pairs.fields:
        pairs = with_scanner_targets(
            pairs, sim_ranges=sim_ranges or r.data.sim_ranges, filter=r.pipeline.fbp_filter,
            cache_dir=run.work / "cache" / "scanner" if r.cache_pairs else None,
        )  # fmt: skip
    return pairs, {"sinogram": "scanner_CT", "image_only": "scanner_CT_own"}


def route_pairs(run: Run, route: str) -> PairSet:
    """The training pairs as ``route`` sees them: measured, or :func:`image_only_view` (with
    NMAR fields when that route's μ is NMAR)."""
    r = run.recipe
    nmar_cache = run.work / "cache" / "nmar" if r.cache_pairs else None
    if route == "sinogram":
        if r.pipeline.mu_source == "nmar" and "NMAR_CT" not in run.train.fields:
            run.train = with_nmar(run.train, cache_dir=nmar_cache)
        return run.train
    pairs = image_only_view(run.train)
    if r.pipeline.for_route("image_only").mu_source == "nmar":
        pairs = with_nmar(pairs, cache_dir=nmar_cache)
    return pairs


_IMAGE_ROUTES = {
    "measured": ("sinogram",), "image_only": ("image_only",), "both": ("sinogram", "image_only"),
}  # fmt: skip


def image_routes(recipe: RecipeConfig) -> tuple[str, ...]:
    """The routes whose inputs the image U-Net trains on (``DataConfig.image_inputs``)."""
    return _IMAGE_ROUTES[recipe.data.image_inputs]


def residual_routes(recipe: RecipeConfig) -> tuple[str, ...]:
    """The routes the residual U-Net trains on: those of :func:`image_routes` whose pipeline
    runs the residual loop (all of them when none does)."""
    routes = image_routes(recipe)
    on = tuple(rt for rt in routes if recipe.pipeline.for_route(rt).osro_residual)
    return on or routes


def _domain_data(run: Run, domain: str) -> DomainData:
    r = run.recipe
    if domain == "image":
        c, a = run.emb["image"]
        run.train, targets = with_image_targets(run, run.train)
        parts = []
        for route in image_routes(r):
            pairs = route_pairs(run, route)
            mu_source = r.pipeline.for_route(route).mu_source
            parts.append(image_domain(pairs, c, a, mu_source=mu_source, target=targets[route]))
        return concat_domains(parts)
    c, a = run.emb["sinogram"]
    return sinogram_domain(route_pairs(run, "sinogram"), c, a, mu_source=r.pipeline.mu_source)


def _stage_unet(run: Run, domain: str, make_data: Callable[[], DomainData]) -> None:
    name = f"unet_{domain}"
    r = run.recipe
    cfg = getattr(r, domain)
    ck = run.ckpt(f"{name}.pt")
    unet = _new_unet(run, domain).to(run.device)
    t0 = time.monotonic()
    if run.load(name) and ck.is_file():
        state = torch.load(ck, map_location=run.device, weights_only=True)
        unet.load_state_dict(state["ema"])
        run.nets[name] = unet.eval()
        run.trained.add(name)
        log.info("%s: loaded EMA weights from %s", name, ck)
        return
    if name not in run.stages:
        return
    data = make_data()  # may run a stage of its own (residual_data): the budget comes after
    cfg = dataclasses.replace(cfg, max_minutes=run.clock.stage_minutes(name))
    ema, res = train_sde(
        unet, data, make_schedule(r.sde), cfg, name=name, checkpoint=ck, resume=run.resume,
        validate=_validator(run, domain), progress=run.progress,
    )  # fmt: skip
    run.nets[name] = ema.eval()
    run.trained.add(name)
    run.stage_done(
        name, time.monotonic() - t0, steps=res.steps, loss_first=res.losses[:5],
        loss_last_mean=float(np.mean(res.losses[-50:])) if res.losses else None, val=res.val,
        parameters=sum(p.numel() for p in unet.parameters()),
    )  # fmt: skip
    run.report.setdefault("loss_curves", {})[name] = _thin(res.losses)
    run.save()


def _thin(values: Sequence[float], n: int = 200) -> list[list[float]]:
    """[step, mean loss] at ≤ n points (block means) for the report."""
    if not values:
        return []
    blocks = np.array_split(np.asarray(values, dtype=np.float64), min(n, len(values)))
    out, step = [], 0
    for b in blocks:
        step += len(b)
        out.append([step, round(float(b.mean()), 6)])
    return out


def _stage_residual_data(run: Run) -> DomainData:
    """R and X'_p of ``residual_pairs`` training pairs on each of :func:`residual_routes`, made
    by the real pipeline with that route's switches; targets from :func:`with_image_targets`. The
    time budget is shared out over the routes."""
    t0 = time.monotonic()
    r = run.recipe
    n = min(r.residual_pairs, len(run.train))
    idx = torch.randperm(len(run.train), generator=torch.Generator().manual_seed(r.data.seed))[
        :n
    ].tolist()
    deadline = run.clock.deadline("residual_data")
    base = stage_pipeline(r.pipeline, run.trained)
    folder = run.work / "val_bundle"
    write_bundle(folder, r, run.nets, base.replace(osro_residual=False))
    # only the pairs used here get targets (those already on run.train are kept)
    chosen, targets = with_image_targets(run, run.train.subset(idx))
    routes = residual_routes(r)
    c, a = run.emb["image"]
    dev = run.device
    parts, counts = [], {}
    for j, route in enumerate(routes):
        cfg = base.for_route(route).replace(osro_residual=False)
        pairs = chosen if route == "sinogram" else image_only_view(chosen)
        end = None if deadline is None else t0 + (deadline - t0) * (j + 1) / len(routes)
        chunks, done = [], []
        step = max(cfg.batch_size, 1) * 2
        for i in range(0, n, step):
            if end is not None and time.monotonic() > end and done:
                log.warning("residual_data (%s): time budget reached after %d of %d pairs",
                            route, len(done), n)  # fmt: skip
                break
            part = list(range(i, min(i + step, n)))
            _, inter = run_pipeline(
                folder, pairs.subset(part), cfg, device=dev, steps=r.residual_loop_steps,
                seed=r.data.seed, intermediates=True, route=route,
            )  # fmt: skip
            chunks.append(inter)
            done += part
        inter = {k: torch.cat([ch[k] for ch in chunks]) for k in ("residual", "x_p_prime")}
        f = pairs.subset(done).fields
        sel = torch.as_tensor([idx[i] for i in done])
        parts.append(
            residual_domain(
                f[targets[route]].to(dev),
                inter["x_p_prime"].to(dev),
                inter["residual"].to(dev),
                f["mask"].to(dev),
                c[sel.to(c.device)],
                a[sel.to(a.device)],
                scale=r.pipeline.residual_scale,
            )
        )
        counts[route] = len(done)
    run.stage_done(
        "residual_data", time.monotonic() - t0, pairs=counts, steps=r.residual_loop_steps
    )
    return concat_domains(parts)


def _variants(
    inter: dict[str, torch.Tensor], pairs: PairSet, target: str = "image"
) -> list[dict[str, Any]]:
    """Scores against ``target`` of OSRO variants recomputed from one full run's intermediates
    (the same ``mar_rt.runtime.osro`` formulas): α ∈ {0, ¼, ½, ¾, 1} × residual on/off × Norm²
    on/off."""
    from mar_rt.runtime import osro

    valid = ~pairs.fields["mask"].cpu()
    x_p, x_pp, r_hat = inter["x_p"], inter["x_p_prime"], inter["residual_hat"]
    rows = []
    for residual in (True, False):
        x_hat = x_pp + r_hat if residual else x_pp
        for norm2 in (True, False):
            xn = osro.match_stats(x_hat, x_p, valid) if norm2 else x_hat
            for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
                s = score(osro.fuse(xn, x_p, alpha), pairs, target)
                rows.append({"osro_residual": residual, "norm2": norm2, "alpha": alpha, **s})
    return rows


def _stage_tune(run: Run) -> Any:
    """Pick steps, α, Norm² and the residual switch on validation cases (mean PSNR)."""
    t0 = time.monotonic()
    r = run.recipe
    base = stage_pipeline(r.pipeline, run.trained)
    if run.val is None or not base.run_osro:
        return base
    pairs = run.val.subset(spread_cases(run.val.metas, r.tune_cases))
    pairs, targets = with_image_targets(run, pairs, sim_ranges=VAL_SIM_RANGES)
    target = targets["sinogram"]
    folder = run.work / "val_bundle"
    write_bundle(folder, r, run.nets, base)
    deadline = run.clock.deadline("tune")
    table, best = [], None
    for steps in r.tune_steps:
        if deadline is not None and time.monotonic() > deadline and table:
            break
        _, inter = run_pipeline(
            folder, pairs, base, device=run.device, steps=steps, intermediates=True
        )
        li = score(inter["x_li"], pairs, target)
        xp = score(inter["x_p"], pairs, target)
        for row in _variants(inter, pairs, target):
            row = {"steps": steps, **row}
            table.append(row)
            if best is None or row["psnr"] > best["psnr"]:
                best = row
        table.append({"steps": steps, "li": li, "dapg_only": xp})
    if best is None:
        return base
    cfg = base.replace(
        steps=best["steps"], alpha=best["alpha"], norm2=best["norm2"],
        osro_residual=best["osro_residual"] and "unet_residual" in run.trained,
    )  # fmt: skip
    run.stage_done(
        "tune", time.monotonic() - t0, cases=len(pairs), target=target, table=table, chosen=best
    )
    return cfg


def _guarded(run: Run, stage: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or None after logging and recording a pipeline failure in the report."""
    try:
        return fn()
    except (MarRtError, RuntimeError, ValueError) as err:
        log.error("stage %s failed (%s); keeping what is trained so far", stage, err)
        run.report.setdefault("errors", {})[stage] = repr(err)
        return None


def train_bundle(
    sources: str | os.PathLike[str] | Sequence[CleanSlice],
    out: str | os.PathLike[str],
    *,
    recipe: RecipeConfig,
    device: str = "cpu",
    max_minutes: float | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    stages: Sequence[str] = STAGES,
    init_from: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train every network of a bundle from clean slices ``sources`` (a folder, see
    ``load_clean_slices``, or CleanSlices) and write the bundle to ``out``.

    ``init_from``: a bundle whose U-Nets (same config as the recipe, checked before any stage
    runs) are the starting weights of the U-Nets trained here and, under the recipe's SDE
    only (ε̂ at state t means something else under another), the final weights of those not
    trained (their loops stay on in the bundle's pipeline); its DuDoCLIP networks of the
    recipe's config stand in for CLIP stages that neither run nor have a checkpoint
    (:func:`init_clips`).

    ``max_minutes`` is the whole run's wall-time budget (None: the recipe's step counts);
    ``work_dir`` (default ``<out>.work``) holds the pair cache, the validation set (``val/``,
    readable by ``mar-rt eval``) and checkpoints. Returns the training report (also written to
    ``out/train_report.json``).
    """
    init = open_init_bundle(init_from, recipe) if init_from is not None else None
    # read now: ``out`` may be the init bundle itself, rewritten after each U-Net stage
    states = (
        {
            n: {k: v.float() for k, v in init.state_dict(n).items()}
            for n in (*UNET_NAMES, *init_clips(init, recipe))
        }
        if init is not None else None
    )  # fmt: skip
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {STAGES}")
    clock = Clock(max_minutes, [(s, w) for s, w in recipe.budget if s in stages or s == "data"])
    run = Run(recipe, device, work, out, resume, progress, clock, tuple(stages), init=states)
    run.report = {
        "recipe": recipe.to_dict(), "device": device, "max_minutes": max_minutes,
        "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "work_dir": str(work),
    }  # fmt: skip
    if init is not None:
        nets = init.config["networks"]
        same_sde = init.sde == recipe.sde
        run.report["init_from"] = {
            "bundle": str(init.folder),
            "sha256": {n: nets[n]["sha256"] for n in UNET_NAMES},
            "same_sde": same_sde,
        }
        if same_sde:
            # the init bundle's U-Nets are trained: one not retrained here keeps its loop on
            run.trained.update(UNET_NAMES)
        else:
            log.warning(
                "%s: its SDE %s is not the recipe's %s; its U-Nets only start the ones trained "
                "here, and a loop whose U-Net is not trained under this SDE stays off",
                init.manifest_path, init.sde, recipe.sde,
            )  # fmt: skip
    if torch.device(device).type == "cuda":
        run.report["gpu"] = torch.cuda.get_device_name(torch.device(device))
    slices = (
        load_clean_slices(sources) if isinstance(sources, (str, os.PathLike)) else list(sources)
    )
    _stage_data(run, slices)
    if not set(run.stages) - {"data"}:
        return run.report
    unets_wanted = any(not st.startswith("clip_") for st in run.stages if st != "data")
    for domain in ("image", "sinogram"):
        if f"clip_{domain}" in run.stages or unets_wanted:
            _stage_clip(run, domain)
    if not unets_wanted:
        return run.report
    for domain in ("image", "sinogram", "residual"):
        run.nets[f"unet_{domain}"] = _new_unet(run, domain).to(device).eval()
    _stage_unet(run, "image", lambda: _domain_data(run, "image"))
    _stage_unet(run, "sinogram", lambda: _domain_data(run, "sinogram"))
    if {"unet_image", "unet_sinogram"} <= run.trained:
        # these two stages run the runtime's pipeline: a failure there keeps what is trained
        _guarded(
            run,
            "unet_residual",
            lambda: _stage_unet(run, "residual", lambda: _stage_residual_data(run)),
        )
    elif "unet_residual" in run.stages:
        raise MarRtError("the residual U-Net needs trained image and sinogram U-Nets first")
    if not run.trained:
        return run.report
    final = stage_pipeline(recipe.pipeline, run.trained)
    if "tune" in run.stages:
        final = _guarded(run, "tune", lambda: _stage_tune(run)) or final
    run.report["seconds"] = round(time.monotonic() - run.clock.t0, 1)
    run.save(final)
    log.info("bundle written to %s (%.1f min)", out, run.report["seconds"] / 60)
    return run.report
