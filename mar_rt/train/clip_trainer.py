"""DuDoCLIP contrastive fine-tuning (DESIGN.md §7.1) and its zero-shot check (PI_s, §9).

Notation:

    v = DuDoCLIP(x)         (content_emb c, artifact_emb a), (B, D), x the domain image in [0, 1]
    h(text)                 pooled output of the frozen text tower before its projection (W)
    P                       the text projection (W, D); e(text) = h(text)·P
    s = exp(logit_scale)    inverse temperature, shared by both terms, clamped at 100
    L                       ½ [InfoNCE(c, e(content text)) + InfoNCE(a, e(artifact text))]

InfoNCE here is the symmetric, multi-positive form: the logits are taken against the batch's
*distinct* texts (pairs often share a text), image→text is a cross-entropy to the image's
text, and text→image spreads the target uniformly over the images that carry that text. With
all texts distinct it is exactly CLIP's symmetric loss (``mar_rt.models.dudoclip.info_nce``).

What trains: the controller (``DuDoCLIP.trainable_parameters``: the copied image tower, the
zero Linears and ``logit_scale``). The frozen towers are randomly initialised here (no
pretrained CLIP weights offline), so the frozen text tower's features h are arbitrary but
fixed; with ``train_text_projection`` the projection P (part of ``clip``, saved with it)
trains too, so the text side can re-arrange its random features. h is computed once per
distinct text.

Zero-shot accuracy: argmax over ``prompts.zero_shot_labels()`` of cos(a, e(label)) against
``zero_shot_target`` (21 classes: no metal, size class × severity).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mar_rt.models import prompts
from mar_rt.models.dudoclip import DuDoCLIP, resize_to_tower
from mar_rt.train.augment import rot_flip
from mar_rt.train.pair_meta import PairMeta

log = logging.getLogger(__name__)

_MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True, kw_only=True)
class ClipTrainConfig:
    """Controller fine-tuning. ``max_minutes`` stops early (and sets the cosine horizon);
    ``zero_shot_text_prob``: chance that a sample's artifact text is its zero-shot label text
    (the same facts in the label phrasing) instead of one of its ``artifact_text`` phrasings;
    ``own_set``: in a recipe, train on DuDoCLIP's own pair set (``DataConfig.clip_*``) when the
    data stage builds one, else on the U-Net pairs."""

    steps: int = 300
    batch: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: int = 20
    grad_clip: float = 1.0
    train_text_projection: bool = True
    zero_shot_text_prob: float = 0.3
    max_minutes: float | None = None
    seed: int = 0
    log_every: int = 20
    own_set: bool = True


@dataclass
class ClipTrainResult:
    """Loss per step, steps run, seconds, and the zero-shot report (if validation was given)."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    zero_shot: dict[str, Any] = field(default_factory=dict)


# --- text side ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _without_text_projection(model: DuDoCLIP) -> Iterator[None]:
    clip = model.clip
    proj = clip.text_projection
    clip.text_projection = None
    try:
        yield
    finally:
        clip.text_projection = proj


@torch.no_grad()
def text_features(model: DuDoCLIP, texts: Sequence[str], *, chunk: int = 64) -> torch.Tensor:
    """h(text): the frozen text tower's pooled output before the projection, (T, W)."""
    device = model.logit_scale.device
    out = []
    with _without_text_projection(model):
        for i in range(0, len(texts), chunk):
            tokens = model.tokenize(list(texts[i : i + chunk])).to(device)
            out.append(model.encode_text(tokens).float())
    return torch.cat(out)


def project_text(model: DuDoCLIP, h: torch.Tensor) -> torch.Tensor:
    """e = h·P with the model's (possibly trainable) text projection, (T, D)."""
    proj = model.clip.text_projection
    if proj is None:
        return h
    if isinstance(proj, torch.nn.Linear):
        return proj(h)
    return h @ proj


class TextBank:
    """Every distinct text the trainer uses, with h computed once (on the model's device)."""

    def __init__(self, model: DuDoCLIP, texts: Sequence[str]) -> None:
        self.texts = sorted(set(texts))
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.h = text_features(model, self.texts)

    def ids(self, texts: Sequence[str]) -> list[int]:
        return [self.index[t] for t in texts]


def pair_texts(meta: PairMeta) -> tuple[list[str], list[str], str]:
    """(content phrasings, artifact phrasings, zero-shot label text) of one pair."""
    return (
        meta.content_texts(),
        meta.artifact_texts(),
        prompts.zero_shot_labels()[meta.zero_shot_target()],
    )


# --- loss --------------------------------------------------------------------------------------
def multi_positive_info_nce(
    image_emb: torch.Tensor,
    text_ids: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE against distinct texts (module docstring).

    image_emb (B, D); text_ids (B,) long, index into ``text_emb`` (T, D) (only the ids present
    are used as classes); logit_scale: log inverse temperature (clamped at log 100).
    """
    present, label = torch.unique(text_ids, return_inverse=True)
    scale = logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp()
    logits = scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb[present], dim=-1).T
    i2t = F.cross_entropy(logits, label)
    onehot = F.one_hot(label, num_classes=len(present)).to(logits.dtype)  # (B, U)
    target = onehot / onehot.sum(dim=0, keepdim=True)
    t2i = -(target * F.log_softmax(logits, dim=0)).sum(dim=0).mean()
    return 0.5 * (i2t + t2i)


# --- training ---------------------------------------------------------------------------------
def resize_inputs(model: DuDoCLIP, images: torch.Tensor, *, chunk: int = 64) -> torch.Tensor:
    """(N, 1, H, W) → (N, 1, S, S) with the model's own resize (what it does anyway), so
    augmentation and batching run at the tower size."""
    s, n = model.cfg.image_size, len(images)
    return torch.cat([resize_to_tower(images[i : i + chunk], s) for i in range(0, n, chunk)])


def _augment(x: torch.Tensor, domain: str, gen: torch.Generator) -> torch.Tensor:
    """Per-sample rot90/flip (image) or view roll + mirror (sinogram) of (B, 1, S, S)."""
    out = []
    for xi in x:
        if domain == "image":
            k = int(torch.randint(4, (1,), generator=gen))
            out.append(rot_flip(xi, k, bool(torch.rand(1, generator=gen) < 0.5)))
        else:
            shift = int(torch.randint(xi.shape[-2], (1,), generator=gen))
            xi = torch.roll(xi, shift, dims=-2)
            out.append(torch.flip(xi, dims=(-2, -1)) if torch.rand(1, generator=gen) < 0.5 else xi)
    return torch.stack(out)


def _lr_factor(step: int, frac: float, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def train_clip(
    model: DuDoCLIP,
    inputs: torch.Tensor,
    metas: Sequence[PairMeta],
    cfg: ClipTrainConfig,
    *,
    domain: str,
    val_inputs: torch.Tensor | None = None,
    val_metas: Sequence[PairMeta] | None = None,
    progress: bool = True,
) -> ClipTrainResult:
    """Fine-tune ``model``'s controller on ``inputs`` (N, 1, H, W) in [0, 1] (x(X_ma) or
    y(Y_ma), on the model's device) against the pairs' texts; returns the loss curve and,
    with validation data, the zero-shot report before and after.

    Deterministic for a seed when ``max_minutes`` is None (all sampling from CPU generators).
    """
    from tqdm.auto import tqdm

    device = model.logit_scale.device
    content, artifact, label = zip(*(pair_texts(m) for m in metas), strict=True)
    all_texts = [t for group in content + artifact for t in group] + list(label)
    all_texts += prompts.zero_shot_labels()
    bank = TextBank(model, all_texts)
    content_ids = [bank.ids(c) for c in content]
    artifact_ids = [bank.ids(a) for a in artifact]
    label_ids = bank.ids(label)
    small = resize_inputs(model, inputs)

    result = ClipTrainResult()
    if val_inputs is not None and val_metas:
        result.zero_shot["before"] = zero_shot_report(model, val_inputs, val_metas)
    params = list(model.trainable_parameters())
    text_proj = model.clip.text_projection
    if cfg.train_text_projection and isinstance(text_proj, torch.nn.Parameter):
        text_proj.requires_grad_(True)
        params.append(text_proj)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
    t0 = time.monotonic()
    model.train()
    bar = tqdm(total=cfg.steps, desc=f"clip_{domain}", disable=not progress, leave=False)
    step = 0
    for step in range(cfg.steps):
        elapsed = time.monotonic() - t0
        frac = step / cfg.steps if budget is None else max(step / cfg.steps, elapsed / budget)
        if frac >= 1.0 and step > 0:  # at least one step, even on an exhausted budget
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, frac, cfg.warmup)
        idx = torch.randint(len(small), (min(cfg.batch, len(small)),), generator=gen).tolist()
        x = _augment(small[torch.as_tensor(idx, device=small.device)], domain, gen)
        c_ids = [
            content_ids[i][int(torch.randint(len(content_ids[i]), (1,), generator=gen))]
            for i in idx
        ]
        a_ids = []
        for i in idx:
            if float(torch.rand(1, generator=gen)) < cfg.zero_shot_text_prob:
                a_ids.append(label_ids[i])
            else:
                a_ids.append(
                    artifact_ids[i][int(torch.randint(len(artifact_ids[i]), (1,), generator=gen))]
                )
        text_emb = project_text(model, bank.h)
        c_emb, a_emb = model(x.to(device))
        loss = 0.5 * (
            multi_positive_info_nce(
                c_emb, torch.tensor(c_ids, device=device), text_emb, model.logit_scale
            )
            + multi_positive_info_nce(
                a_emb, torch.tensor(a_ids, device=device), text_emb, model.logit_scale
            )
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        value = float(loss.detach())
        result.losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            log.info("clip_%s step %d loss %.4f", domain, step + 1, value)
    bar.close()
    model.eval()
    if isinstance(text_proj, torch.nn.Parameter):
        text_proj.requires_grad_(False)
    result.steps = len(result.losses)
    result.seconds = time.monotonic() - t0
    if val_inputs is not None and val_metas:
        result.zero_shot["after"] = zero_shot_report(model, val_inputs, val_metas)
        result.zero_shot["train"] = zero_shot_report(model, inputs, metas)
    return result


@torch.no_grad()
def embed(
    model: DuDoCLIP, inputs: torch.Tensor, *, chunk: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(content_emb, artifact_emb) (N, D) of full-size inputs, exactly as the pipeline embeds."""
    model.eval()
    device = model.logit_scale.device
    cs, as_ = [], []
    for i in range(0, len(inputs), chunk):
        c, a = model(inputs[i : i + chunk].to(device))
        cs.append(c)
        as_.append(a)
    return torch.cat(cs), torch.cat(as_)


@torch.no_grad()
def zero_shot_report(
    model: DuDoCLIP, inputs: torch.Tensor, metas: Sequence[PairMeta]
) -> dict[str, Any]:
    """PI_s: zero-shot accuracy of artifact_emb over ``zero_shot_labels`` on ``inputs``, with
    uniform chance (1/21) and the majority-class rate for reference; ``size_accuracy`` and
    ``severity_accuracy``: how often the predicted label's size class / severity is right."""
    labels = prompts.zero_shot_labels()
    label_emb = project_text(model, text_features(model, labels))
    _, artifact = embed(model, inputs)
    logits = F.normalize(artifact, dim=-1) @ F.normalize(label_emb, dim=-1).T
    pred = logits.argmax(dim=-1).tolist()
    target = [m.zero_shot_target() for m in metas]
    counts = torch.bincount(torch.tensor(target), minlength=len(labels))
    n = len(metas)
    classes = [
        (prompts.zero_shot_class(p), prompts.zero_shot_class(t))
        for p, t in zip(pred, target, strict=True)
    ]
    return {
        "accuracy": sum(p == t for p, t in zip(pred, target, strict=True)) / n,
        "size_accuracy": sum(p[0] == t[0] for p, t in classes) / n,
        "severity_accuracy": sum(p[1] == t[1] for p, t in classes) / n,
        "chance_uniform": 1.0 / len(labels),
        "majority_rate": float(counts.max()) / n,
        "n": n,
        "classes_present": int((counts > 0).sum()),
    }
