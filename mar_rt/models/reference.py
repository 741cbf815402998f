"""Checkpoints of the reference code (DA-CLIP / IR-SDE, ``Algolzw/daclip-uir``) read as mar-rt
networks: the U-Net's key layout, config inference from tensor shapes, and the SDE options.

The reference U-Net (``config/daclip-sde/models/modules/DenoisingUNet_arch.py`` with
``module_util.py`` and ``attention.py``) is saved by the IR-SDE trainer's ``save_network`` as a
plain ``state_dict``.  Its module tree, with the names it gives (ours after the arrow):

    init_conv                              → init_conv
    time_mlp.{1,3}   (0 is the sinusoid)   → time_mlp.{0,2}
    prompt, text_mlp.{0,2}, prompt_mlp     → prompt, prompt_in.{0,2}, prompt_out
    downs.i.j        ResBlock j < 2        → downs.i.blocks.j
        mlp.1, block1.proj, block2.proj, res_conv → time_proj.1, conv1, conv2, skip
    downs.i.2        Residual(PreNorm(LinearAttention | SpatialTransformer))  → downs.i.attn
        fn.norm.g (1, C, 1, 1)             → norm.weight (C,)    linear attention
                                           → prenorm.weight (C,) transformer
        fn.fn.to_qkv, fn.fn.to_out.0, fn.fn.to_out.1.g → to_qkv, to_out, out_norm.weight
        fn.fn.norm, proj_in, proj_out      → norm, proj_in, proj_out
        fn.fn.transformer_blocks.0.
            attn1.to_{q,k,v} (concatenated)→ to_qkv
            attn1.to_out.0                 → attn_out
            attn2.to_v, attn2.to_out.0     → cross.to_v, cross.to_out
            norm1, norm3, ff.net.0.proj, ff.net.2 → norm1, norm3, ff_in, ff_out
            attn2.to_q, attn2.to_k, norm2  → (not used: one context token, see unet.py)
    downs.i.3                              → downs.i.resample
    mid_block1, mid_attn, mid_block2       → mid_block1, mid_attn, mid_block2
    ups.k.{0,1,2,3}  (k = 0 is the deepest) → ups.k.{blocks.0, blocks.1, attn, resample}
    final_res_block, final_conv            → final_block, final_conv

What cannot be read from shapes has the reference's fixed values as defaults: 32 channels per
attention head (``num_head_channels``), 4 linear-attention heads, 32 GroupNorm groups, and the
reference padding (``check_image_size``); override them by name.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from mar_rt.errors import BadInputError, BundleError

__all__ = [
    "IRSDE_IGNORED_SUFFIXES",
    "read_torch_state_dict",
    "infer_irsde_config",
    "irsde_to_mar_rt",
    "mar_rt_to_irsde",
    "load_irsde_unet",
    "read_reference_options",
    "sde_fields_from_options",
    "sample_steps_from_options",
]

log = logging.getLogger(__name__)

# transformer-block tensors the reference holds that cannot change its output with one context
# token (cross-attention softmax over one key is 1): accepted and dropped
IRSDE_IGNORED_SUFFIXES = ("attn2.to_q.weight", "attn2.to_k.weight", "norm2.weight", "norm2.bias")
# wrappers around a state dict in the checkpoints people pass around
_WRAPPER_KEYS = ("state_dict", "params_ema", "params", "model", "net", "network")

Convert = Callable[[list[torch.Tensor]], torch.Tensor]


def _same(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _gain(ts: list[torch.Tensor]) -> torch.Tensor:
    """Reference LayerNorm gain (1, C, 1, 1) → ours (C,)."""
    return ts[0].reshape(-1)


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    """to_q, to_k, to_v (C, C) each → fused to_qkv (3C, C) (q rows first, heads major)."""
    return torch.cat(ts, dim=0)


# --------------------------------------------------------------------------- reading


def read_torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a torch checkpoint, read with ``weights_only=True``.

    Accepts a plain state dict, or one under ``state_dict`` / ``params_ema`` / ``params`` /
    ``model`` / ``net`` / ``network``; a ``module.`` prefix (DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: checkpoint file not found")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled code, truncated file, not a torch file ...
        raise BundleError(f"{path}: cannot read the checkpoint safely ({exc})") from exc
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next((k for k in _WRAPPER_KEYS if k in obj), None)
        if inner is None:
            raise BundleError(
                f"{path}: not a state dict of tensors (top-level keys {sorted(obj)[:8]})"
            )
        obj = obj[inner]
    if not isinstance(obj, Mapping) or not obj:
        raise BundleError(f"{path}: not a state dict of tensors")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


# --------------------------------------------------------------------------- config inference


def _shape(state: Mapping[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in state:
        raise BundleError(f"{where}: missing tensor {key!r}; not a reference ConditionalUNet")
    return tuple(state[key].shape)


def _indices(state: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := rx.match(k))})


def infer_irsde_config(
    state: Mapping[str, torch.Tensor], *, where: str = "checkpoint", **overrides: Any
) -> Any:
    """The ``UNetConfig`` of a reference-layout state dict, read from tensor shapes and names.

    Inferred: in/out channels, nf, ch_mult, residual blocks per level, context dim, time
    sinusoid and MLP widths, prompt length, linear-attention width, transformer levels,
    feed-forward multiplier and the attention wrapping.  ``overrides`` (any ``UNetConfig``
    field) replace inferred or default values.
    """
    from mar_rt.models.unet import UNetConfig

    if "prompt" not in state:
        raise BundleError(
            f"{where}: no 'prompt' tensor: the network was built without the degradation "
            "context (use_degra_context=False), which mar-rt's U-Net needs"
        )
    if "mid_attn.fn.fn.to_qkv.weight" in state:
        raise BundleError(
            f"{where}: the middle block is linear attention (use_image_context=False); "
            "mar-rt's U-Net needs the image-context transformer there"
        )
    init = _shape(state, "init_conv.weight", where)
    nf = init[0]
    if init[1] % 2:
        raise BundleError(f"{where}: init_conv.weight has {init[1]} input channels, not 2·in_nc")
    levels = _indices(state, r"downs\.(\d+)\.")
    if levels != list(range(len(levels))) or not levels:
        raise BundleError(f"{where}: down levels {levels} are not 0..L−1")
    ch_mult = []
    for i in levels:
        out_ch = _shape(state, f"downs.{i}.{_resample_index(state, i)}.weight", where)[0]
        if out_ch % nf:
            raise BundleError(f"{where}: level {i} has {out_ch} channels, not a multiple of {nf}")
        ch_mult.append(out_ch // nf)
    blocks = _indices(state, r"downs\.0\.(\d+)\.block1\.proj\.weight")
    tf_levels = tuple(i for i in levels if f"downs.{i}.{len(blocks)}.fn.fn.proj_in.weight" in state)
    time_w = _shape(state, "time_mlp.1.weight", where)
    text_w = _shape(state, "text_mlp.0.weight", where)
    lin = next((k for k in state if k.endswith(".fn.fn.to_qkv.weight")), None)
    lin_hidden = _shape(state, lin, where)[0] // 3 if lin else 128
    heads = int(overrides.get("linear_attn_heads", 4))
    ff = _shape(state, "mid_attn.fn.fn.transformer_blocks.0.ff.net.2.weight", where)
    values: dict[str, Any] = {
        "in_channels": init[1] // 2,
        "out_channels": _shape(state, "final_conv.weight", where)[0],
        "nf": nf,
        "ch_mult": tuple(ch_mult),
        "num_res_blocks": len(blocks),
        "context_dim": text_w[1],
        "time_sin_dim": time_w[1],
        "time_dim": time_w[0],
        "prompt_len": _shape(state, "prompt", where)[-1],
        "attn_head_dim": 32,
        "linear_attn_heads": heads,
        "linear_attn_head_dim": lin_hidden // heads,
        "transformer_levels": tf_levels,
        "ff_mult": ff[1] // ff[0],
        "norm_groups": 32,
        "noise_skip": 0.0,
        "transformer_prenorm": "mid_attn.fn.norm.g" in state,
        "reference_padding": True,
    }
    values.update(overrides)
    try:
        return UNetConfig(**values)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: inferred U-Net config is invalid: {exc}") from exc


def _resample_index(state: Mapping[str, torch.Tensor], level: int) -> int:
    """Index of level ``level``'s downsampling conv in ``downs.i`` (num_res_blocks + 1)."""
    return len(_indices(state, rf"downs\.{level}\.(\d+)\.block1\.proj\.weight")) + 1


# --------------------------------------------------------------------------- key mapping


def _resblock(ours: str, ref: str) -> Iterator[tuple[str, tuple[str, ...], Convert]]:
    yield f"{ours}.time_proj.1.weight", (f"{ref}.mlp.1.weight",), _same
    yield f"{ours}.time_proj.1.bias", (f"{ref}.mlp.1.bias",), _same
    for a, b in (("conv1", "block1.proj"), ("conv2", "block2.proj"), ("skip", "res_conv")):
        yield f"{ours}.{a}.weight", (f"{ref}.{b}.weight",), _same


def _linear_attention(ours: str, ref: str) -> Iterator[tuple[str, tuple[str, ...], Convert]]:
    yield f"{ours}.norm.weight", (f"{ref}.fn.norm.g",), _gain
    yield f"{ours}.to_qkv.weight", (f"{ref}.fn.fn.to_qkv.weight",), _same
    for p in ("weight", "bias"):
        yield f"{ours}.to_out.{p}", (f"{ref}.fn.fn.to_out.0.{p}",), _same
    yield f"{ours}.out_norm.weight", (f"{ref}.fn.fn.to_out.1.g",), _gain


def _transformer(
    ours: str, ref: str, prenorm: bool
) -> Iterator[tuple[str, tuple[str, ...], Convert]]:
    if prenorm:
        yield f"{ours}.prenorm.weight", (f"{ref}.fn.norm.g",), _gain
        ref = f"{ref}.fn.fn"
    blk = f"{ref}.transformer_blocks.0"
    yield f"{ours}.to_qkv.weight", tuple(f"{blk}.attn1.to_{n}.weight" for n in "qkv"), _cat
    yield f"{ours}.cross.to_v.weight", (f"{blk}.attn2.to_v.weight",), _same
    pairs = (
        ("norm", f"{ref}.norm"), ("proj_in", f"{ref}.proj_in"), ("proj_out", f"{ref}.proj_out"),
        ("norm1", f"{blk}.norm1"), ("attn_out", f"{blk}.attn1.to_out.0"),
        ("cross.to_out", f"{blk}.attn2.to_out.0"), ("norm3", f"{blk}.norm3"),
        ("ff_in", f"{blk}.ff.net.0.proj"), ("ff_out", f"{blk}.ff.net.2"),
    )  # fmt: skip
    for a, b in pairs:
        for p in ("weight", "bias"):
            yield f"{ours}.{a}.{p}", (f"{b}.{p}",), _same


def _key_plan(cfg: Any) -> list[tuple[str, tuple[str, ...], Convert]]:
    """(our key, reference key(s), conversion) for every tensor ``ConditionalUNet(cfg)`` may
    have (1×1 skip convs are listed for every ResBlock; only those with a width change exist)."""
    plan: list[tuple[str, tuple[str, ...], Convert]] = [
        ("init_conv.weight", ("init_conv.weight",), _same),
        ("prompt", ("prompt",), _same),
    ]
    for a, b in (
        ("time_mlp.0", "time_mlp.1"), ("time_mlp.2", "time_mlp.3"),
        ("prompt_in.0", "text_mlp.0"), ("prompt_in.2", "text_mlp.2"),
        ("prompt_out", "prompt_mlp"), ("final_conv", "final_conv"),
    ):  # fmt: skip
        plan += [(f"{a}.{p}", (f"{b}.{p}",), _same) for p in ("weight", "bias")]
    n = cfg.num_res_blocks
    last = cfg.levels - 1

    def attention(ours: str, ref: str, level: int) -> None:
        if level in cfg.transformer_levels:
            plan.extend(_transformer(ours, ref, cfg.transformer_prenorm))
        else:
            plan.extend(_linear_attention(ours, ref))

    for i in range(cfg.levels):
        for j in range(n):
            plan.extend(_resblock(f"downs.{i}.blocks.{j}", f"downs.{i}.{j}"))
        attention(f"downs.{i}.attn", f"downs.{i}.{n}", i)
        plan.append((f"downs.{i}.resample.weight", (f"downs.{i}.{n + 1}.weight",), _same))
        if i < last:
            plan.append((f"downs.{i}.resample.bias", (f"downs.{i}.{n + 1}.bias",), _same))
    plan.extend(_resblock("mid_block1", "mid_block1"))
    plan.extend(_transformer("mid_attn", "mid_attn", cfg.transformer_prenorm))
    plan.extend(_resblock("mid_block2", "mid_block2"))
    for k in range(cfg.levels):
        i = last - k
        for j in range(n):
            plan.extend(_resblock(f"ups.{k}.blocks.{j}", f"ups.{k}.{j}"))
        attention(f"ups.{k}.attn", f"ups.{k}.{n}", i)
        if i > 0:
            plan += [
                (f"ups.{k}.resample.1.{p}", (f"ups.{k}.{n + 1}.1.{p}",), _same)
                for p in ("weight", "bias")
            ]
        else:
            plan.append((f"ups.{k}.resample.weight", (f"ups.{k}.{n + 1}.weight",), _same))
    plan.extend(_resblock("final_block", "final_res_block"))
    return plan


def irsde_to_mar_rt(
    state: Mapping[str, torch.Tensor], cfg: Any, *, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Reference-layout tensors → ``ConditionalUNet(cfg).state_dict()`` layout.

    Refuses (``BundleError`` naming the first offending key, in the network's order) a missing
    reference tensor, a tensor of the wrong shape, or a reference tensor that has no place here
    (other than the unused ``IRSDE_IGNORED_SUFFIXES``).
    """
    from mar_rt.models.unet import ConditionalUNet

    with torch.device("meta"):
        own = ConditionalUNet(cfg).state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, refs, convert in _key_plan(cfg):
        if ours not in own:  # a 1×1 skip conv where the widths agree: neither side has it
            continue
        for r in refs:
            if r not in state:
                raise BundleError(f"{where}: missing tensor {r!r} (for {ours}); {len(state)} given")
        value = convert([state[r] for r in refs])
        if tuple(value.shape) != tuple(own[ours].shape):
            got = [tuple(state[r].shape) for r in refs]
            want = tuple(own[ours].shape)
            raise BundleError(
                f"{where}: tensor {refs[0]!r} has shape {got[0] if len(got) == 1 else got}; "
                f"the inferred network needs {want} for {ours}"
            )
        out[ours] = value
        used.update(refs)
    missing = [k for k in own if k not in out]
    if missing:  # a gap in the plan itself: a bug here, not in the file
        raise BundleError(f"{where}: no reference tensor maps to {missing[0]!r}")
    extra = [k for k in state if k not in used and not k.endswith(IRSDE_IGNORED_SUFFIXES)]
    if extra:
        raise BundleError(
            f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected); the file does "
            "not match the network inferred from it"
        )
    return out


def mar_rt_to_irsde(
    state: Mapping[str, torch.Tensor], cfg: Any, *, context_dim: int | None = None
) -> dict[str, torch.Tensor]:
    """Our ``ConditionalUNet`` tensors → the reference layout (the inverse of
    :func:`irsde_to_mar_rt`), with the unused cross-attention to_q/to_k and norm2 filled
    (random to_q/to_k, unit/zero norm2: they cannot change the output).  For tests and export
    to the reference code."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for ours, refs, convert in _key_plan(cfg):
        if ours not in state:
            continue
        value = state[ours]
        if convert is _cat:
            for r, part in zip(refs, value.chunk(3, dim=0), strict=True):
                out[r] = part.clone()
        elif convert is _gain:
            out[refs[0]] = value.reshape(1, -1, 1, 1).clone()
        else:
            out[refs[0]] = value.clone()
        if convert is _cat:
            blk = refs[0].rsplit(".attn1.", 1)[0]
            ch = value.shape[1]
            ctx = context_dim or cfg.context_dim
            out[f"{blk}.attn2.to_q.weight"] = torch.randn(ch, ch, generator=gen) * ch**-0.5
            out[f"{blk}.attn2.to_k.weight"] = torch.randn(ch, ctx, generator=gen) * ctx**-0.5
            out[f"{blk}.norm2.weight"] = torch.ones(ch)
            out[f"{blk}.norm2.bias"] = torch.zeros(ch)
    return out


def load_irsde_unet(path: str | Path, **overrides: Any) -> Any:
    """``ConditionalUNet`` from a reference U-Net checkpoint alone (see the module docstring)."""
    from mar_rt.models.unet import ConditionalUNet

    state = read_torch_state_dict(path)
    where = str(path)
    cfg = infer_irsde_config(state, where=where, **overrides)
    mapped = irsde_to_mar_rt(state, cfg, where=where)
    net = ConditionalUNet(cfg)
    net.load_state_dict({k: v.to(torch.float32) for k, v in mapped.items()}, strict=True)
    log.debug("loaded reference U-Net %s: %s", path, cfg)
    return net.eval()


# --------------------------------------------------------------------------- SDE options


def read_reference_options(path: str | Path) -> dict[str, Any]:
    """The parsed option YAML of the reference code (``options/train.yml``, ``test.yml``)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BadInputError(f"{path}: cannot read the option file: {exc}") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: the option file is not a YAML mapping")
    return data


def _finite(value: Any, name: str, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BadInputError(f"{where}: sde.{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise BadInputError(f"{where}: sde.{name} must be finite, got {value!r}")
    return v


def sde_fields_from_options(options: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """``SDEConfig`` fields from an option mapping's ``sde:`` block (max_sigma, T, schedule,
    eps; the reference's defaults T 100, cosine, eps 0.01 where a key is absent).  Other keys
    of the block (``sample_T``) are read by :func:`sample_steps_from_options`."""
    sde = options.get("sde")
    if not isinstance(sde, Mapping) or "max_sigma" not in sde:
        raise BadInputError(f"{where}: no 'sde:' block with max_sigma")
    t = sde.get("T", 100)
    if isinstance(t, bool) or not isinstance(t, int):
        raise BadInputError(f"{where}: sde.T must be an integer, got {t!r}")
    return {
        "T": t,
        "max_sigma": _finite(sde["max_sigma"], "max_sigma", where),
        "schedule": str(sde.get("schedule", "cosine")),
        "eps": _finite(sde.get("eps", 0.01), "eps", where),
    }


def sample_steps_from_options(options: Mapping[str, Any]) -> int | None:
    """``sde.sample_T`` when the option file sets it (> 0), else None."""
    sde = options.get("sde")
    value = sde.get("sample_T") if isinstance(sde, Mapping) else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None
