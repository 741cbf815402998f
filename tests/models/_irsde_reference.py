"""An independent description of the reference IR-SDE / DA-CLIP U-Net, for tests only.

``Algolzw/daclip-uir``, ``universal-image-restoration/config/daclip-sde/models/modules/``
``DenoisingUNet_arch.py`` (``ConditionalUNet`` with ``use_degra_context`` and
``use_image_context``), ``module_util.py`` (ResBlock, Block, LayerNorm with gain ``g``,
PreNorm, Residual, LinearAttention with 4 heads × 32, Downsample, Upsample, default_conv) and
``attention.py`` (SpatialTransformer, BasicTransformerBlock, CrossAttention, GEGLU FeedForward).

Read from that code as facts (names, shapes, order of operations); written here from scratch
and kept independent of ``mar_rt.models``: :func:`reference_state_dict` makes random tensors
under the reference's own key names, and :func:`reference_forward` evaluates the reference
network straight from them (full cross-attention, with the to_q/to_k/norm2 that mar-rt drops).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HEAD_CH = 32  # num_head_channels
LIN_HEADS, LIN_DIM_HEAD = 4, 32  # LinearAttention defaults
GROUPS = 32  # Normalize(): GroupNorm(32, C, eps=1e-6)


def _dims(nf: int, ch_mult: tuple[int, ...]) -> list[tuple[int, int]]:
    full = (1, *ch_mult)
    return [(nf * full[i], nf * full[i + 1]) for i in range(len(ch_mult))]


def reference_state_dict(
    *, in_nc: int = 1, out_nc: int = 1, nf: int = 8, ch_mult=(1, 2, 4, 4), context_dim: int = 16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Random tensors with the reference ConditionalUNet's keys and shapes (levels i ≥ 3 use
    the SpatialTransformer, as the reference's ``i < 3`` rule)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def w(key: str, *shape: int) -> None:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        sd[key] = torch.randn(*shape, generator=g) / math.sqrt(fan_in)

    def b(key: str, n: int) -> None:
        sd[key] = 0.1 * torch.randn(n, generator=g)

    def gain(key: str, shape) -> None:
        sd[key] = 1.0 + 0.2 * torch.randn(*shape, generator=g)

    def linear(key: str, n_out: int, n_in: int, bias: bool = True) -> None:
        w(f"{key}.weight", n_out, n_in)
        if bias:
            b(f"{key}.bias", n_out)

    def resblock(p: str, din: int, dout: int) -> None:
        linear(f"{p}.mlp.1", 2 * dout, td)
        w(f"{p}.block1.proj.weight", dout, din, 3, 3)
        w(f"{p}.block2.proj.weight", dout, dout, 3, 3)
        if din != dout:
            w(f"{p}.res_conv.weight", dout, din, 1, 1)

    def lin_attn(p: str, dim: int) -> None:
        hidden = LIN_HEADS * LIN_DIM_HEAD
        gain(f"{p}.fn.norm.g", (1, dim, 1, 1))
        w(f"{p}.fn.fn.to_qkv.weight", 3 * hidden, dim, 1, 1)
        w(f"{p}.fn.fn.to_out.0.weight", dim, hidden, 1, 1)
        b(f"{p}.fn.fn.to_out.0.bias", dim)
        gain(f"{p}.fn.fn.to_out.1.g", (1, dim, 1, 1))

    def transformer(p: str, dim: int) -> None:
        inner = (dim // HEAD_CH) * HEAD_CH
        gain(f"{p}.fn.norm.g", (1, dim, 1, 1))
        gain(f"{p}.fn.fn.norm.weight", (dim,))
        b(f"{p}.fn.fn.norm.bias", dim)
        w(f"{p}.fn.fn.proj_in.weight", inner, dim, 1, 1)
        b(f"{p}.fn.fn.proj_in.bias", inner)
        t = f"{p}.fn.fn.transformer_blocks.0"
        for n in "qkv":
            w(f"{t}.attn1.to_{n}.weight", inner, inner)
        linear(f"{t}.attn1.to_out.0", inner, inner)
        linear(f"{t}.ff.net.0.proj", 2 * 4 * inner, inner)
        linear(f"{t}.ff.net.2", inner, 4 * inner)
        w(f"{t}.attn2.to_q.weight", inner, inner)
        w(f"{t}.attn2.to_k.weight", inner, context_dim)
        w(f"{t}.attn2.to_v.weight", inner, context_dim)
        linear(f"{t}.attn2.to_out.0", inner, inner)
        for n in ("norm1", "norm2", "norm3"):
            gain(f"{t}.{n}.weight", (inner,))
            b(f"{t}.{n}.bias", inner)
        w(f"{p}.fn.fn.proj_out.weight", dim, inner, 1, 1)  # zero_module at init; random here
        b(f"{p}.fn.fn.proj_out.bias", dim)

    td = 4 * nf
    depth = len(ch_mult)
    w("init_conv.weight", nf, 2 * in_nc, 7, 7)
    linear("time_mlp.1", td, nf)
    linear("time_mlp.3", td, td)
    sd["prompt"] = torch.rand(1, td, generator=g)
    linear("text_mlp.0", td, context_dim)
    linear("text_mlp.2", td, td)
    linear("prompt_mlp", td, td)
    for i, (din, dout) in enumerate(_dims(nf, ch_mult)):
        k = depth - 1 - i  # ups are inserted at the front
        attn = transformer if i >= 3 else lin_attn
        resblock(f"downs.{i}.0", din, din)
        resblock(f"downs.{i}.1", din, din)
        attn(f"downs.{i}.2", din)
        if i != depth - 1:
            w(f"downs.{i}.3.weight", dout, din, 4, 4)
            b(f"downs.{i}.3.bias", dout)
        else:
            w(f"downs.{i}.3.weight", dout, din, 3, 3)
        resblock(f"ups.{k}.0", dout + din, dout)
        resblock(f"ups.{k}.1", dout + din, dout)
        attn(f"ups.{k}.2", dout)
        if i != 0:
            w(f"ups.{k}.3.1.weight", din, dout, 3, 3)
            b(f"ups.{k}.3.1.bias", din)
        else:
            w(f"ups.{k}.3.weight", din, dout, 3, 3)
    mid = nf * ch_mult[-1]
    resblock("mid_block1", mid, mid)
    transformer("mid_attn", mid)
    resblock("mid_block2", mid, mid)
    resblock("final_res_block", 2 * nf, nf)
    w("final_conv.weight", out_nc, nf, 3, 3)
    b("final_conv.bias", out_nc)
    return sd


# --------------------------------------------------------------------------- the forward pass


def _ln_g(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    return (x - mean) * (var + 1e-5).rsqrt() * g


def _lin(x, sd, p, bias=True):
    return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"] if bias else None)


def _heads_attention(q, k, v, heads):
    b, n, c = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    sim = q @ k.transpose(-1, -2) * (c // heads) ** -0.5
    return (sim.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)


def reference_forward(
    sd: dict[str, torch.Tensor], xt: torch.Tensor, mu: torch.Tensor, time: torch.Tensor,
    text_context: torch.Tensor, image_context: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """The reference ``ConditionalUNet.forward(xt, cond=mu, time, text_context, image_context)``
    evaluated from its state dict."""
    nf = sd["init_conv.weight"].shape[0]
    depth = len({k.split(".")[1] for k in sd if k.startswith("downs.")})

    def resblock(x, p, temb):
        scale, shift = _lin(F.silu(temb), sd, f"{p}.mlp.1")[:, :, None, None].chunk(2, dim=1)
        h = F.conv2d(x, sd[f"{p}.block1.proj.weight"], padding=1)
        h = F.silu(h * (scale + 1) + shift)
        h = F.silu(F.conv2d(h, sd[f"{p}.block2.proj.weight"], padding=1))
        res = sd.get(f"{p}.res_conv.weight")
        return h + (F.conv2d(x, res) if res is not None else x)

    def lin_attn(x, p):
        b, _, hh, ww = x.shape
        q, k, v = F.conv2d(x, sd[f"{p}.to_qkv.weight"]).chunk(3, dim=1)
        q, k, v = (t.reshape(b, LIN_HEADS, -1, hh * ww) for t in (q, k, v))
        q = q.softmax(dim=-2) * LIN_DIM_HEAD**-0.5
        k = k.softmax(dim=-1)
        v = v / (hh * ww)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, -1, hh, ww)
        out = F.conv2d(out, sd[f"{p}.to_out.0.weight"], sd[f"{p}.to_out.0.bias"])
        return _ln_g(out, sd[f"{p}.to_out.1.g"])

    def transformer(x, p, ctx):
        b, c, hh, ww = x.shape
        y = F.group_norm(x, GROUPS, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], eps=1e-6)
        y = F.conv2d(y, sd[f"{p}.proj_in.weight"], sd[f"{p}.proj_in.bias"])
        inner = y.shape[1]
        heads = inner // HEAD_CH
        tok = y.flatten(2).transpose(1, 2)
        t = f"{p}.transformer_blocks.0"

        def norm(z, n):
            return F.layer_norm(z, (inner,), sd[f"{t}.{n}.weight"], sd[f"{t}.{n}.bias"])

        z = norm(tok, "norm1")
        q, k, v = (_lin(z, sd, f"{t}.attn1.to_{n}", bias=False) for n in "qkv")
        tok = _lin(_heads_attention(q, k, v, heads), sd, f"{t}.attn1.to_out.0") + tok
        z = norm(tok, "norm2")
        q = _lin(z, sd, f"{t}.attn2.to_q", bias=False)
        k = _lin(ctx, sd, f"{t}.attn2.to_k", bias=False)
        v = _lin(ctx, sd, f"{t}.attn2.to_v", bias=False)
        tok = _lin(_heads_attention(q, k, v, heads), sd, f"{t}.attn2.to_out.0") + tok
        a, gate = _lin(norm(tok, "norm3"), sd, f"{t}.ff.net.0.proj").chunk(2, dim=-1)
        tok = _lin(a * F.gelu(gate), sd, f"{t}.ff.net.2") + tok
        y = tok.transpose(1, 2).reshape(b, inner, hh, ww)
        return F.conv2d(y, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"]) + x

    def attention(x, p, ctx):  # Residual(PreNorm(dim, fn))
        y = _ln_g(x, sd[f"{p}.fn.norm.g"])
        if f"{p}.fn.fn.proj_in.weight" in sd:
            return transformer(y, f"{p}.fn.fn", ctx) + x
        return lin_attn(y, f"{p}.fn.fn") + x

    x = torch.cat([xt - mu, mu], dim=1)
    H, W = x.shape[2:]
    s = 2**depth
    x = F.pad(x, (0, (s - W % s) % s, 0, (s - H % s) % s), mode="reflect")
    x = F.conv2d(x, sd["init_conv.weight"], padding=3)
    x_first = x

    half = nf // 2
    freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
    arg = time[:, None] * freqs[None]
    temb = torch.cat([arg.sin(), arg.cos()], dim=-1)
    temb = _lin(F.gelu(_lin(temb, sd, "time_mlp.1")), sd, "time_mlp.3")
    text = _lin(F.silu(_lin(text_context, sd, "text_mlp.0")), sd, "text_mlp.2")
    temb = temb + _lin(torch.softmax(text, dim=1) * sd["prompt"], sd, "prompt_mlp")
    ctx = image_context[:, None]

    skips = []
    for i in range(depth):
        x = resblock(x, f"downs.{i}.0", temb)
        skips.append(x)
        x = attention(resblock(x, f"downs.{i}.1", temb), f"downs.{i}.2", ctx)
        skips.append(x)
        bias = sd.get(f"downs.{i}.3.bias")
        x = F.conv2d(x, sd[f"downs.{i}.3.weight"], bias, stride=2 if i < depth - 1 else 1,
                     padding=1)  # fmt: skip
    x = resblock(x, "mid_block1", temb)
    x = attention(x, "mid_attn", ctx)
    x = resblock(x, "mid_block2", temb)
    for k in range(depth):
        x = resblock(torch.cat([x, skips.pop()], dim=1), f"ups.{k}.0", temb)
        x = resblock(torch.cat([x, skips.pop()], dim=1), f"ups.{k}.1", temb)
        x = attention(x, f"ups.{k}.2", ctx)
        if f"ups.{k}.3.1.weight" in sd:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = F.conv2d(x, sd[f"ups.{k}.3.1.weight"], sd[f"ups.{k}.3.1.bias"], padding=1)
        else:
            x = F.conv2d(x, sd[f"ups.{k}.3.weight"], padding=1)
    x = resblock(torch.cat([x, x_first], dim=1), "final_res_block", temb)
    x = F.conv2d(x, sd["final_conv.weight"], sd["final_conv.bias"], padding=1)
    return x[..., :H, :W]


def save_like_irsde(sd: dict[str, torch.Tensor], path) -> None:
    """As the IR-SDE trainer's ``save_network``: the plain state dict, tensors on the CPU."""
    torch.save({k: v.cpu() for k, v in sd.items()}, path)
