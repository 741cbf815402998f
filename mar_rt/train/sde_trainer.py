"""IR-SDE trainer for the conditional U-Nets (image, sinogram and residual domains; DESIGN §7.3).

Notation (``mar_rt.models.sde``):

    x0, μ       target and the state the SDE reverts to, network scale, (B, 1, P, P) patches
    t           uniform in 1..T per sample
    z, x_t      x_t = μ + (x0 − μ)e^{−θ̄_tΔ} + σ̄_t z          (``forward_marginal``)
    ε̂           U-Net(x_t, μ, t, cond), cond = condition(c, a) from the cached DuDoCLIP embeddings
    ℓ           |x_t − [θ_t(μ − x_t) + σ_t² ε̂/σ̄_t]Δ − x*_{t−1}|   (``ml_loss``, per pixel)
    ℓ_ε         |ε̂ − z|, the noise-matching term (weight ``eps_weight``)
    w           per-pixel loss weight (0 on metal; the trace for sinograms)
    loss        Σw(ℓ + eps_weight·ℓ_ε) / Σw

Why ℓ_ε: the posterior sampler rebuilds x̂₀ = μ + (x_t − μ − σ̄_tε̂)e^{θ̄_tΔ}, so a small
systematic error in ε̂ at large t (e^{θ̄_TΔ} = 200) is amplified, and a network that does not
reproduce ε ≈ (x_t − μ)/σ̄_t off the forward marginal lets the reverse chain drift away from
μ. ``ml_loss`` alone weights ε̂ by σ_t²Δ/σ̄_t (≈ 0.004 at large t, ~1e−5 at small t), which
after CPU-scale training left exactly that drift (sampled X_p 20–23 dB against LI's 35 dB on
validation). The ε term trains ε̂ uniformly over t, as denoising score matching does.

Per step: 1. a batch of augmented patches (``mar_rt.train.augment.sample_batch``, CPU generator);
2. t, z and the conditioning-dropout draw (device generator); 3. the loss above; 4. AdamW with
warm-up + cosine learning rate, gradient-norm clipping; 5. EMA of the weights. Every
``val_every`` steps (and at the end) a ``validate(ema_model, step)`` callback runs (the recipe
passes one that runs the real pipeline). Checkpoints (model, EMA, optimiser, step, elapsed
time, generator states) let ``resume`` continue where a run stopped; they are read with
``torch.load(weights_only=True)``.

Deterministic for a seed when ``max_minutes`` is None: the same data give the same losses.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mar_rt.models.sde import Schedule, forward_marginal, ml_loss, posterior_loss
from mar_rt.models.unet import ConditionalUNet
from mar_rt.train.augment import sample_batch
from mar_rt.train.domains import DomainData

log = logging.getLogger(__name__)

Validator = Callable[[ConditionalUNet, int], dict[str, Any]]


LOSSES = {"ml": ml_loss, "posterior": posterior_loss}


@dataclass(frozen=True, kw_only=True)
class SDETrainConfig:
    """One U-Net's training run. ``patch`` None trains on whole images; ``max_minutes`` stops
    early and sets the cosine horizon; ``cond_drop`` replaces both embeddings by zeros with
    that probability (so the no-DuDoCLIP ablation runs a network that has seen zeros);
    ``eps_weight`` weights the noise-matching term; ``loss``: ``"ml"`` (``ml_loss``, the
    reference's Euler-step form) or ``"posterior"`` (``posterior_loss``, for short schedules
    whose T equals the sampling steps; module docstring). ``jitter`` scales target and μ
    together by 1 ± jitter (``sample_batch``); it is off by default because μ and line
    integrals are calibrated, so a rescaled pair is not an input the network will meet. (It
    made no measurable difference in an 811-step fine-tune of the demo image U-Net: 38.51 dB
    without it, 38.54 dB with 0.03, on the 20 validation cases.)"""

    steps: int = 2000
    batch: int = 8
    patch: int | None = 96
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup: int = 50
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    cond_drop: float = 0.1
    eps_weight: float = 0.01
    loss: str = "ml"
    jitter: float = 0.0
    p_focus: float = 0.7
    max_minutes: float | None = None
    seed: int = 0
    log_every: int = 50
    val_every: int = 0
    ckpt_every: int = 200

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(
                f"SDETrainConfig: loss must be one of {sorted(LOSSES)}, got {self.loss!r}"
            )


@dataclass
class SDETrainResult:
    """Loss per step (all steps, resumed ones included), validation history, steps, seconds."""

    losses: list[float] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def lr_factor(step: int, frac: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 over the horizon ``frac``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, parameter by parameter (buffers copied)."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def training_loss(
    unet: ConditionalUNet,
    batch: dict[str, torch.Tensor],
    schedule: Schedule,
    gen: torch.Generator,
    *,
    cond_drop: float = 0.0,
    eps_weight: float = 0.0,
    loss: str = "ml",
) -> torch.Tensor:
    """The weighted loss of one batch (steps 2–3 of the module docstring)."""
    x0, mu, w = batch["x0"], batch["mu"], batch["weight"]
    b = x0.shape[0]
    dev = x0.device
    t = torch.randint(1, schedule.T + 1, (b,), generator=gen, device=dev)
    z = torch.randn(x0.shape, generator=gen, device=dev, dtype=x0.dtype)
    keep = (torch.rand(b, generator=gen, device=dev) >= cond_drop).to(x0.dtype)[:, None]
    x_t = forward_marginal(x0, mu, t, schedule, z)
    cond = unet.condition(batch["content"] * keep, batch["artifact"] * keep)
    eps = unet(x_t, mu, t.to(torch.float32), cond)
    per_pixel = LOSSES[loss](eps, x_t, x0, mu, t, schedule, reduction="none")
    if eps_weight:
        per_pixel = per_pixel + eps_weight * (eps - z).abs()
    return (per_pixel * w).sum() / w.sum().clamp(min=1.0)


@torch.no_grad()
def identity_init(unet: ConditionalUNet, lam: float) -> ConditionalUNet:
    """Start ε̂ at (x_t − μ)/λ, the noise of the forward marginal when x0 = μ and σ̄_t = λ.

    With ``cfg.noise_skip`` = 1/λ the skip is that term, and only ``final_conv`` is zeroed.
    Otherwise:

    One linear path of the U-Net carries its first input channel x_t − μ to the output:
    ``init_conv`` channel 0 copies it (centre tap 1, the rest of that filter 0), the 1×1 skip of
    ``final_block`` passes that channel to its output channel 0 (whose conv branch starts at
    0), and ``final_conv`` reads only that channel with gain 1/λ. Everything else keeps its
    random initialisation, so the network only has to learn the correction −e^{−θ̄_tΔ}(x0 − μ)/σ̄_t
    and the gain where σ̄_t < λ. (With the constant θ schedule σ̄_t ≥ 0.31λ everywhere.)
    """
    if unet.cfg.noise_skip:  # the skip already carries (x_t − μ)/λ: start the rest at 0
        if abs(unet.cfg.noise_skip * lam - 1.0) > 1e-6:
            raise ValueError(f"identity_init: noise_skip {unet.cfg.noise_skip} is not 1/λ")
        unet.final_conv.weight.zero_()
        if unet.final_conv.bias is not None:
            unet.final_conv.bias.zero_()
        return unet
    nf = unet.cfg.nf
    w = unet.init_conv.weight  # (nf, 2·in, k, k)
    w[0].zero_()
    w[0, 0, w.shape[-2] // 2, w.shape[-1] // 2] = 1.0
    block = unet.final_block
    if not isinstance(block.skip, torch.nn.Conv2d):
        raise ValueError("identity_init needs final_block with a 1×1 skip convolution")
    block.skip.weight[0].zero_()
    block.skip.weight[0, nf] = 1.0  # input channels: [x_up (nf), x_first (nf)]
    block.conv2.weight[0].zero_()
    fc = unet.final_conv
    fc.weight.zero_()
    fc.weight[0, 0, fc.weight.shape[-2] // 2, fc.weight.shape[-1] // 2] = 1.0 / lam
    if fc.bias is not None:
        fc.bias.zero_()
    return unet


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_sde(
    unet: ConditionalUNet,
    data: DomainData,
    schedule: Schedule,
    cfg: SDETrainConfig,
    *,
    name: str = "unet",
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    validate: Validator | None = None,
    progress: bool = True,
) -> tuple[ConditionalUNet, SDETrainResult]:
    """Train ``unet`` (in place) on ``data`` (on the U-Net's device); returns (EMA copy, result).

    ``checkpoint``: file written every ``ckpt_every`` steps and at the end; with ``resume`` an
    existing one is loaded first (its step count and elapsed time count against ``steps`` and
    ``max_minutes``).
    """
    from tqdm.auto import tqdm

    device = next(unet.parameters()).device
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    opt = torch.optim.AdamW(
        unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99)
    )
    gen_cpu = torch.Generator().manual_seed(cfg.seed)
    gen_dev = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    result = SDETrainResult()
    start, elapsed_before = 0, 0.0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen_cpu.set_state(state["gen_cpu"].cpu())
        gen_dev.set_state(state["gen_dev"].cpu())
        start, elapsed_before = int(state["step"]), float(state["elapsed"])
        result.losses = [float(v) for v in state["losses"].tolist()]
        log.info("%s: resumed from %s at step %d", name, ckpt, start)

    def save(step: int, elapsed: float) -> None:
        if ckpt is None:
            return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        _save_checkpoint(
            ckpt,
            {
                "model": unet.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "gen_cpu": gen_cpu.get_state(),
                "gen_dev": gen_dev.get_state(),
                "losses": torch.tensor(result.losses, dtype=torch.float64),
            },
        )

    budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
    t0 = time.monotonic()
    unet.train()
    bar = tqdm(total=cfg.steps, initial=start, desc=name, disable=not progress, leave=False)
    step = start
    while step < cfg.steps:
        elapsed = elapsed_before + time.monotonic() - t0
        frac = step / cfg.steps if budget is None else max(step / cfg.steps, elapsed / budget)
        if frac >= 1.0 and step > start:  # at least one step, even on an exhausted budget
            log.info("%s: time budget reached at step %d", name, step)
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, frac, cfg.warmup)
        # 1. batch; 2.–3. loss
        batch = sample_batch(
            data, cfg.batch, cfg.patch, gen_cpu, jitter=cfg.jitter, p_focus=cfg.p_focus
        )
        loss = training_loss(
            unet,
            batch,
            schedule,
            gen_dev,
            cond_drop=cfg.cond_drop,
            eps_weight=cfg.eps_weight,
            loss=cfg.loss,
        )
        # 4. update; 5. EMA (a short effective horizon early on)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, unet, min(cfg.ema_decay, (1.0 + step) / (10.0 + step)))
        step += 1
        value = float(loss.detach())
        result.losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.5f}")
        if cfg.log_every and step % cfg.log_every == 0:
            recent = result.losses[-cfg.log_every :]
            log.info(
                "%s step %d loss %.5f (mean of last %d)",
                name,
                step,
                sum(recent) / len(recent),
                len(recent),
            )
        if cfg.ckpt_every and step % cfg.ckpt_every == 0:
            save(step, elapsed_before + time.monotonic() - t0)
        if (
            validate is not None
            and cfg.val_every
            and step % cfg.val_every == 0
            and step < cfg.steps
        ):
            result.val.append({"step": step, **validate(ema, step)})
    bar.close()
    unet.eval()
    result.steps = step
    result.seconds = elapsed_before + time.monotonic() - t0
    save(step, result.seconds)
    if validate is not None:
        result.val.append({"step": step, **validate(ema, step)})
    return ema, result
