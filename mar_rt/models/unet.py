"""Conditional U-Net: the IR-SDE noise network of DESIGN §7.2 (DA-CLIP's ``ConditionalUNet``).

Shapes (B batch, H×W image, D = ``context_dim``, L = ``len(ch_mult)`` levels):

    x_t, mu       (B, 1, H, W)     state and the image the SDE reverts to
    t             (B,) float32     network time (1..T, or t·T/S for reduced schedules)
    content_emb   (B, D)           DuDoCLIP content embedding  → cross-attention
    artifact_emb  (B, D)           DuDoCLIP artifact embedding → prompt module → time embedding
    cond          (B, cond_dim)    everything the embeddings contribute, computed once per image
    eps           (B, 1, H, W)     predicted noise ε̂

Layout (the reference network at ``paper()``: nf 64, ch_mult (1, 2, 4, 8), context 512):

    [x_t − μ, μ] → reflect-pad (bottom/right) to a multiple of ``size_multiple`` → conv7
    down level i (channels nf·m_i, m = (1,) + ch_mult): num_res_blocks ResBlocks, attention,
        then a stride-2 conv to nf·m_{i+1} (the deepest level keeps its resolution, conv3)
    middle: ResBlock, self+cross transformer, ResBlock (nf·ch_mult[−1] channels)
    up level i: ResBlocks on [x, skip], attention, nearest ×2 + conv3 (level 0: conv3)
    [x, conv7 output] → ResBlock → conv3 → crop to H×W

Attention: linear attention (Residual(PreNorm(·))) at every level not in
``transformer_levels``; a transformer block (self-attention, cross-attention, GEGLU
feed-forward) at the levels in ``transformer_levels`` (default: the deepest) and in the middle.

Reference structure (DESIGN §7.2, ``Algolzw/daclip-uir`` ``DenoisingUNet_arch.py``): the
reference wraps every attention block, the transformers included, as Residual(PreNorm(·)),
i.e. x + T(LN_g(x)) with a gain-only channel LayerNorm, on top of the transformer's own
residual; and it pads to a multiple of 2^L (its ``check_image_size``), not 2^(L−1).
``UNetConfig.transformer_prenorm`` and ``UNetConfig.reference_padding`` switch these on
(``paper()`` and networks loaded by ``ConditionalUNet.from_irsde_checkpoint``); both default to
off, which is the structure of the tiny presets and of every bundle written before they
existed (a bundle.json without the keys loads as before).

Conditioning (why ``cond`` exists): cross-attention to a single context token c has one key, so
its softmax weight is 1 for every query and the output is to_out(to_v(c)) at every position,
independent of x — a per-image bias.  It is computed so (no to_q/to_k, which could not change the
output), together with the prompt module's time-embedding bias
softmax(MLP(artifact_emb)) ⊙ prompt → Linear, once per image in :meth:`condition`.

Export hygiene: plain nn ops only (no custom autograd Functions); LayerNorm/GroupNorm/softmax
are single ops at opset 17; the time sinusoid is computed in fp32; padding amounts come from
the input shape only (no branching on tensor values).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNetConfig", "ConditionalUNet", "UNetConditioner", "UNetPredictor"]


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Hyper-parameters of :class:`ConditionalUNet` (saved in ``bundle.json``).

    ``transformer_levels`` lists the levels (0 = full resolution) that use the self+cross
    transformer; the other levels use linear attention.  ``context_dim`` must equal the
    DuDoCLIP embedding dimension of the same bundle.  ``noise_skip`` s adds s·(x_t − μ) to
    the output (0: off): with s = 1/λ the network only learns ε̂ − (x_t − μ)/λ, so the
    noise in x_t cancels exactly in x̂₀ = μ + (x_t − μ − σ̄_tε̂)e^{θ̄_tΔ} instead of through
    learned weights (where e^{θ̄_tΔ} = 1/eps amplifies every error in them).

    ``transformer_prenorm`` wraps each transformer block T as x + T(LN_g(x)) (a gain-only
    LayerNorm over channels), as the reference's ``Residual(PreNorm(dim, T))``.
    ``reference_padding`` pads inputs to a multiple of 2^L as the reference's
    ``check_image_size`` does; off, to 2^(L−1), the least the L−1 downsamplings need.  Both
    default to off (the structure of bundles written before they existed); ``paper()`` turns
    them on.
    """

    in_channels: int = 1
    out_channels: int = 1
    nf: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    context_dim: int = 512
    time_sin_dim: int = 64
    time_dim: int = 256
    prompt_len: int = 256
    attn_head_dim: int = 32
    linear_attn_heads: int = 4
    linear_attn_head_dim: int = 32
    transformer_levels: tuple[int, ...] = (3,)
    ff_mult: int = 4
    norm_groups: int = 32
    noise_skip: float = 0.0
    transformer_prenorm: bool = False
    reference_padding: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(
            self, "transformer_levels", tuple(int(v) for v in self.transformer_levels)
        )
        for name in (
            "in_channels", "out_channels", "nf", "num_res_blocks", "context_dim", "time_dim",
            "prompt_len", "attn_head_dim", "linear_attn_heads", "linear_attn_head_dim",
            "ff_mult", "norm_groups",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetConfig: {name} must be a positive integer, got {value!r}")
        for name in ("transformer_prenorm", "reference_padding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"UNetConfig: {name} must be a bool, got {getattr(self, name)!r}")
        if self.time_sin_dim < 4 or self.time_sin_dim % 2:
            raise ValueError(
                f"UNetConfig: time_sin_dim must be even and ≥ 4, got {self.time_sin_dim}"
            )
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"UNetConfig: ch_mult must be positive integers, got {self.ch_mult}")
        bad = [v for v in self.transformer_levels if not 0 <= v < self.levels]
        if bad:
            raise ValueError(f"UNetConfig: transformer_levels {bad} outside 0..{self.levels - 1}")
        for i in self.transformer_levels:
            for ch in (self.level_channels(i), self.level_channels(i + 1)):
                self._check_transformer_width(ch)
        self._check_transformer_width(self.level_channels(self.levels))

    def _check_transformer_width(self, ch: int) -> None:
        if ch % self.attn_head_dim or ch % min(self.norm_groups, ch):
            raise ValueError(
                f"UNetConfig: transformer width {ch} must be divisible by attn_head_dim "
                f"{self.attn_head_dim} and by the GroupNorm group count"
            )

    @property
    def levels(self) -> int:
        return len(self.ch_mult)

    @property
    def size_multiple(self) -> int:
        """Inputs are reflect-padded (bottom/right) to a multiple of this: 2^L with
        ``reference_padding`` (the reference's ``check_image_size``), else 2^(L−1), the total
        downsampling factor."""
        return 2 ** (self.levels if self.reference_padding else self.levels - 1)

    def level_channels(self, i: int) -> int:
        """Channels entering level i (i = L gives the middle): nf·((1,) + ch_mult)[i]."""
        return self.nf * ((1,) + self.ch_mult)[i]

    @property
    def cond_layout(self) -> list[tuple[str, int]]:
        """(name, width) of each part of ``cond``, in order: the prompt time-bias, then one
        cross-attention bias per transformer in forward order (down levels, middle, up levels).
        """
        parts = [("time", self.time_dim)]
        parts += [(f"down{i}", self.level_channels(i)) for i in sorted(self.transformer_levels)]
        parts.append(("mid", self.level_channels(self.levels)))
        up = sorted(self.transformer_levels, reverse=True)
        parts += [(f"up{i}", self.level_channels(i + 1)) for i in up]
        return parts

    @property
    def cond_dim(self) -> int:
        return sum(width for _, width in self.cond_layout)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["transformer_levels"] = list(self.transformer_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Rebuild from ``to_dict``; keys added later (``transformer_prenorm``,
        ``reference_padding``) take their defaults, the structure older bundles were written
        with."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"UNetConfig.from_dict: unknown keys {sorted(unknown)}")
        d = dict(d)
        for key in ("ch_mult", "transformer_levels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def tiny(cls, context_dim: int = 256) -> UNetConfig:
        """CPU-trainable network for the demo bundle (1.0 M parameters).

        ``context_dim`` must equal the tiny DuDoCLIP embedding dimension.
        """
        return cls(
            nf=16,
            ch_mult=(1, 2, 2, 4),
            context_dim=context_dim,
            time_sin_dim=32,
            time_dim=64,
            prompt_len=64,
            attn_head_dim=16,
            linear_attn_heads=2,
            linear_attn_head_dim=16,
            norm_groups=8,
        )

    @classmethod
    def paper(cls, context_dim: int = 512) -> UNetConfig:
        """The reference network (DA-CLIP / DuDoCROP): nf 64, ch_mult (1, 2, 4, 8), context 512,
        with the reference's attention wrapping and padding (DESIGN §7.2)."""
        return cls(context_dim=context_dim, transformer_prenorm=True, reference_padding=True)


# --------------------------------------------------------------------------- building blocks


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W), gain only (one LayerNormalization op)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.channels = channels
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (self.channels,), self.weight, None, self.eps)
        return y.permute(0, 3, 1, 2)


class SinusoidalTimeEmbedding(nn.Module):
    """[sin(t·f_k), cos(t·f_k)], f_k = 10000^(−k/(half−1)), computed in fp32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(
            torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1))
        )
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.float().reshape(-1, 1) * self.freqs.float().reshape(1, -1)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class ResBlock(nn.Module):
    """conv3 → scale/shift from the time embedding → SiLU → conv3 → SiLU, plus a 1×1 skip."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * dim_out))
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1, bias=False)
        self.skip = (
            nn.Conv2d(dim_in, dim_out, 1, bias=False) if dim_in != dim_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time_proj(t_emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.conv1(x) * (scale + 1) + shift)
        h = F.silu(self.conv2(h))
        return h + self.skip(x)


class LinearAttention(nn.Module):
    """x + LinearAttention(LN(x)): softmax over channels for q, over positions for k."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        self.norm = ChannelLayerNorm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * hidden, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)
        self.out_norm = ChannelLayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 3, self.heads, -1, h * w)
        q, k, v = qkv.unbind(dim=1)  # (b, heads, d, n)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / (h * w)
        context = torch.matmul(k, v.transpose(-1, -2))  # (b, heads, d, e)
        out = torch.matmul(context.transpose(-1, -2), q)  # (b, heads, e, n)
        return x + self.out_norm(self.to_out(out.reshape(b, -1, h, w)))


class CrossAttentionBias(nn.Module):
    """Cross-attention to one context token: to_out(to_v(c)), the same for every query."""

    def __init__(self, context_dim: int, inner: int) -> None:
        super().__init__()
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, inner)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.to_v(context))


class SpatialTransformer(nn.Module):
    """GroupNorm → 1×1 → [self-attention, + cross-attention bias, GEGLU FF] → 1×1 (zero) → + x.

    With ``cfg.transformer_prenorm`` the block is the reference's Residual(PreNorm(·)) around
    that: y = LN_g(x) (``prenorm``), out = x + (y + proj_out(…(y))).
    ``cond_slice`` is the (start, stop) of this block's cross-attention bias inside ``cond``.
    """

    def __init__(self, cfg: UNetConfig, channels: int, cond_slice: tuple[int, int]) -> None:
        super().__init__()
        self.heads = channels // cfg.attn_head_dim
        self.cond_slice = cond_slice
        self.prenorm = ChannelLayerNorm(channels) if cfg.transformer_prenorm else None
        self.norm = nn.GroupNorm(min(cfg.norm_groups, channels), channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.norm1 = nn.LayerNorm(channels)
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.attn_out = nn.Linear(channels, channels)
        self.cross = CrossAttentionBias(cfg.context_dim, channels)
        self.norm3 = nn.LayerNorm(channels)
        inner_ff = cfg.ff_mult * channels
        self.ff_in = nn.Linear(channels, 2 * inner_ff)
        self.ff_out = nn.Linear(inner_ff, channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.prenorm is None:
            return self._block(x, cond)
        return x + self._block(self.prenorm(x), cond)

    def _block(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (b, n, c)
        qkv = self.to_qkv(self.norm1(tokens)).reshape(b, h * w, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (b, heads, n, d)
        attn = F.scaled_dot_product_attention(q, k, v)
        tokens = tokens + self.attn_out(attn.transpose(1, 2).reshape(b, h * w, c))
        start, stop = self.cond_slice
        tokens = tokens + cond[:, None, start:stop]
        value, gate = self.ff_in(self.norm3(tokens)).chunk(2, dim=-1)
        tokens = tokens + self.ff_out(value * F.gelu(gate))
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))


class _Level(nn.Module):
    def __init__(self, blocks: list[ResBlock], attn: nn.Module, resample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn
        self.resample = resample


# --------------------------------------------------------------------------- the network


class ConditionalUNet(nn.Module):
    """IR-SDE noise network ε̂(x_t, μ, t, cond) of DESIGN §7.2; see the module docstring."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        offsets = {}
        start = 0
        for name, width in cfg.cond_layout:
            offsets[name] = (start, start + width)
            start += width

        nf, td = cfg.nf, cfg.time_dim
        self.init_conv = nn.Conv2d(2 * cfg.in_channels, nf, 7, padding=3, bias=False)
        self.time_embed = SinusoidalTimeEmbedding(cfg.time_sin_dim)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_sin_dim, td), nn.GELU(), nn.Linear(td, td))
        self.prompt = nn.Parameter(torch.rand(1, cfg.prompt_len))
        self.prompt_in = nn.Sequential(
            nn.Linear(cfg.context_dim, cfg.prompt_len),
            nn.SiLU(),
            nn.Linear(cfg.prompt_len, cfg.prompt_len),
        )
        self.prompt_out = nn.Linear(cfg.prompt_len, td)

        def attention(level: int, ch: int, tag: str) -> nn.Module:
            if level in cfg.transformer_levels:
                return SpatialTransformer(cfg, ch, offsets[f"{tag}{level}"])
            return LinearAttention(ch, cfg.linear_attn_heads, cfg.linear_attn_head_dim)

        last = cfg.levels - 1
        downs = []
        for i in range(cfg.levels):
            ch, ch_next = cfg.level_channels(i), cfg.level_channels(i + 1)
            resample = (
                nn.Conv2d(ch, ch_next, 4, stride=2, padding=1)
                if i < last
                else nn.Conv2d(ch, ch_next, 3, padding=1, bias=False)
            )
            blocks = [ResBlock(ch, ch, td) for _ in range(cfg.num_res_blocks)]
            downs.append(_Level(blocks, attention(i, ch, "down"), resample))
        self.downs = nn.ModuleList(downs)

        mid = cfg.level_channels(cfg.levels)
        self.mid_block1 = ResBlock(mid, mid, td)
        self.mid_attn = SpatialTransformer(cfg, mid, offsets["mid"])
        self.mid_block2 = ResBlock(mid, mid, td)

        ups = []
        for i in reversed(range(cfg.levels)):
            ch, ch_next = cfg.level_channels(i), cfg.level_channels(i + 1)
            resample = (
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(ch_next, ch, 3, padding=1),
                )
                if i > 0
                else nn.Conv2d(ch_next, ch, 3, padding=1, bias=False)
            )
            blocks = [ResBlock(ch_next + ch, ch_next, td) for _ in range(cfg.num_res_blocks)]
            ups.append(_Level(blocks, attention(i, ch_next, "up"), resample))
        self.ups = nn.ModuleList(ups)

        self.final_block = ResBlock(2 * nf, nf, td)
        self.final_conv = nn.Conv2d(nf, cfg.out_channels, 3, padding=1)

    @classmethod
    def from_irsde_checkpoint(
        cls, path: str | os.PathLike[str], **overrides: Any
    ) -> ConditionalUNet:
        """The reference IR-SDE / DA-CLIP U-Net saved at ``path``, built from the file alone.

        ``path`` is a torch checkpoint (read with ``weights_only=True``; a plain state dict as
        the IR-SDE trainer's ``save_network`` writes, or one under ``state_dict`` / ``params``,
        with or without ``module.`` prefixes).  The config (nf, ch_mult, context dim, in/out
        channels, prompt and time widths, transformer levels, attention wrapping) is read from
        tensor shapes and names; ``overrides`` set any ``UNetConfig`` field (for what shapes
        cannot tell: ``attn_head_dim`` 32, ``linear_attn_heads`` 4, ``norm_groups`` 32,
        ``reference_padding`` True by default).  A file that does not fit raises
        ``BundleError`` naming the first offending tensor.  Key mapping:
        ``mar_rt.models.reference``.
        """
        from mar_rt.models.reference import load_irsde_unet

        return load_irsde_unet(path, **overrides)

    # ---------------------------------------------------------------- conditioning

    def condition(self, content_emb: torch.Tensor, artifact_emb: torch.Tensor) -> torch.Tensor:
        """All embedding-dependent terms, once per image: (B, D), (B, D) → (B, cond_dim).

        Layout: ``cfg.cond_layout`` — the prompt module's time-embedding bias, then each
        transformer's cross-attention bias to_out(to_v(content_emb)).
        """
        weights = torch.softmax(self.prompt_in(artifact_emb), dim=1) * self.prompt
        parts = [self.prompt_out(weights)]
        parts += [m.cross(content_emb) for m in self._transformers()]
        return torch.cat(parts, dim=1)

    def _transformers(self) -> list[SpatialTransformer]:
        blocks = [m for m in self.modules() if isinstance(m, SpatialTransformer)]
        return sorted(blocks, key=lambda m: m.cond_slice[0])

    # ---------------------------------------------------------------- network call

    def forward(
        self, x_t: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """ε̂ for x_t, μ (B, C, H, W), t (B,) or scalar, cond (B, cond_dim) → (B, C, H, W)."""
        height, width = x_t.shape[-2], x_t.shape[-1]
        s = self.cfg.size_multiple
        residual = x_t - mu
        x = torch.cat([residual, mu], dim=1)
        x = F.pad(x, (0, (-width) % s, 0, (-height) % s), mode="reflect")

        time_dim = self.cfg.time_dim
        t_emb = self.time_mlp(self.time_embed(t).to(x.dtype)) + cond[:, :time_dim]

        x = self.init_conv(x)
        x_first = x
        skips = []
        for level in self.downs:
            for j, block in enumerate(level.blocks):
                x = block(x, t_emb)
                if j == len(level.blocks) - 1:
                    x = self._attend(level.attn, x, cond)
                skips.append(x)
            x = level.resample(x)

        x = self.mid_block1(x, t_emb)
        x = self.mid_attn(x, cond)
        x = self.mid_block2(x, t_emb)

        for level in self.ups:
            for block in level.blocks:
                x = block(torch.cat([x, skips.pop()], dim=1), t_emb)
            x = self._attend(level.attn, x, cond)
            x = level.resample(x)

        x = self.final_block(torch.cat([x, x_first], dim=1), t_emb)
        x = self.final_conv(x)[:, :, :height, :width]
        if self.cfg.noise_skip:
            x = x + self.cfg.noise_skip * residual
        return x

    @staticmethod
    def _attend(attn: nn.Module, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return attn(x, cond) if isinstance(attn, SpatialTransformer) else attn(x)

    def predict(
        self,
        x_t: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        content_emb: torch.Tensor,
        artifact_emb: torch.Tensor,
    ) -> torch.Tensor:
        """``forward`` with the conditioning recomputed from the embeddings (training, tests)."""
        return self(x_t, mu, t, self.condition(content_emb, artifact_emb))


class UNetConditioner(nn.Module):
    """Export wrapper: (content_emb, artifact_emb) → cond."""

    def __init__(self, unet: ConditionalUNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, content_emb: torch.Tensor, artifact_emb: torch.Tensor) -> torch.Tensor:
        return self.unet.condition(content_emb, artifact_emb)


class UNetPredictor(nn.Module):
    """Export wrapper with DESIGN §10's IO names: (x_t, mu, t, content_emb, artifact_emb) → eps."""

    def __init__(self, unet: ConditionalUNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        x_t: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        content_emb: torch.Tensor,
        artifact_emb: torch.Tensor,
    ) -> torch.Tensor:
        return self.unet.predict(x_t, mu, t, content_emb, artifact_emb)
