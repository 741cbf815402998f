"""Conditional U-Net: shapes, conditioning algebra, padding and ONNX parity (DESIGN §7.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mar_rt.models.unet import (
    ConditionalUNet,
    SpatialTransformer,
    UNetConditioner,
    UNetConfig,
    UNetPredictor,
)


def _net(cfg: UNetConfig, seed: int = 0) -> ConditionalUNet:
    """A network whose zero-initialised output projections are randomised, so that every
    conditioning path reaches the output."""
    torch.manual_seed(seed)
    net = ConditionalUNet(cfg).eval()
    for m in net.modules():
        if isinstance(m, SpatialTransformer):
            torch.nn.init.normal_(m.proj_out.weight, std=0.05)
    return net


@pytest.fixture(scope="module")
def tiny() -> ConditionalUNet:
    return _net(UNetConfig.tiny())


def _inputs(cfg, b, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, h, w, generator=g)
    mu = torch.rand(b, 1, h, w, generator=g)
    t = torch.linspace(1.0, 100.0, b)
    c = torch.randn(b, cfg.context_dim, generator=g)
    a = torch.randn(b, cfg.context_dim, generator=g)
    return x, mu, t, c, a


@torch.no_grad()
@pytest.mark.parametrize("hw", [(101, 77), (416, 416), (640, 641)])
def test_tiny_output_shape_any_size(tiny, hw):
    x, mu, t, c, a = _inputs(tiny.cfg, 1, *hw)
    eps = tiny.predict(x, mu, t, c, a)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


@torch.no_grad()
def test_paper_output_shape_odd_size():
    net = ConditionalUNet(UNetConfig.paper()).eval()
    x, mu, t, c, a = _inputs(net.cfg, 1, 101, 77)
    assert net.predict(x, mu, t, c, a).shape == (1, 1, 101, 77)


@torch.no_grad()
def test_internal_padding_is_reflect(tiny):
    """A 61×59 input gives the crop of the output for its own reflect-padding to 64×64."""
    x, mu, t, c, a = _inputs(tiny.cfg, 1, 61, 59)
    cond = tiny.condition(c, a)
    small = tiny(x, mu, t, cond)
    pad = (0, 64 - 59, 0, 64 - 61)
    big = tiny(F.pad(x, pad, mode="reflect"), F.pad(mu, pad, mode="reflect"), t, cond)
    torch.testing.assert_close(small, big[..., :61, :59], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_condition_once_equals_recomputed(tiny):
    x, mu, t, c, a = _inputs(tiny.cfg, 2, 40, 48)
    cond = tiny.condition(c, a)
    assert cond.shape == (2, tiny.cfg.cond_dim)
    once = tiny(x, mu, t, cond)
    torch.testing.assert_close(once, tiny.predict(x, mu, t, c, a), rtol=0, atol=0)
    # per-image: conditioning a batch equals conditioning each image alone
    torch.testing.assert_close(cond[1:], tiny.condition(c[1:], a[1:]))
    # a 0-d time broadcasts like a per-sample time
    t0 = torch.tensor(7.0)
    torch.testing.assert_close(tiny(x, mu, t0, cond), tiny(x, mu, t0.expand(2), cond))


@torch.no_grad()
def test_embeddings_reach_the_output(tiny):
    x, mu, t, c, a = _inputs(tiny.cfg, 1, 32, 32)
    base = tiny.predict(x, mu, t, c, a)
    assert not torch.allclose(base, tiny.predict(x, mu, t, c + 1.0, a), atol=1e-6)
    assert not torch.allclose(base, tiny.predict(x, mu, t, c, a * 3.0), atol=1e-6)
    assert not torch.allclose(base, tiny.predict(x, mu, t + 10.0, c, a), atol=1e-6)


@torch.no_grad()
def test_zero_embeddings_are_valid(tiny):
    x, mu, t, _, _ = _inputs(tiny.cfg, 2, 24, 40)
    zero = torch.zeros(2, tiny.cfg.context_dim)
    cond = tiny.condition(zero, zero)
    assert torch.isfinite(cond).all()
    eps = tiny(x, mu, t, cond)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


@torch.no_grad()
def test_cross_attention_with_one_token_is_a_bias():
    """Full multi-head cross-attention (random to_q/to_k) over one context token equals the
    module's to_out(to_v(c)) at every query position."""
    cfg = UNetConfig.tiny()
    net = _net(cfg)
    block = net.mid_attn
    g = torch.Generator().manual_seed(3)
    n, ch, heads = 37, block.cross.to_out.out_features, block.heads
    queries = torch.randn(2, n, ch, generator=g)
    context = torch.randn(2, 1, cfg.context_dim, generator=g)
    w_q = torch.randn(ch, ch, generator=g)
    w_k = torch.randn(ch, cfg.context_dim, generator=g)
    q = (queries @ w_q.T).reshape(2, n, heads, -1).transpose(1, 2)
    k = (context @ w_k.T).reshape(2, 1, heads, -1).transpose(1, 2)
    v = block.cross.to_v(context).reshape(2, 1, heads, -1).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(ch // heads), dim=-1)
    full = block.cross.to_out((weights @ v).transpose(1, 2).reshape(2, n, ch))
    bias = block.cross(context[:, 0])
    torch.testing.assert_close(full, bias[:, None, :].expand(2, n, ch))


def test_config_dict_round_trip_and_validation():
    for cfg in (UNetConfig.tiny(), UNetConfig.paper(), UNetConfig.tiny(context_dim=128)):
        assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert UNetConfig.tiny(context_dim=128).context_dim == 128
    with pytest.raises(ValueError, match="transformer_levels"):
        UNetConfig(transformer_levels=(4,))
    with pytest.raises(ValueError, match="unknown keys"):
        UNetConfig.from_dict({"nf": 8, "depth": 3})
    assert UNetConfig.paper().size_multiple == 16  # the reference's check_image_size: 2^L
    assert UNetConfig.tiny().size_multiple == 8  # 2^(L−1), as bundles before the option


def test_paper_parameter_count_matches_reference():
    """DESIGN §7.2: the reference 3-channel network has 49 M parameters.  Ours differs only by
    the 3→1 channel input/output convs and the cross-attention to_q/to_k/LayerNorm (which cannot
    change the output with one context token)."""
    cfg = UNetConfig.paper()
    ours = sum(p.numel() for p in ConditionalUNet(cfg).parameters())
    widths = [w for name, w in cfg.cond_layout if name != "time"]
    dead = sum(w * w + cfg.context_dim * w + 2 * w for w in widths)
    io = (6 - 2) * cfg.nf * 49 + (3 - 1) * (cfg.nf * 9 + 1)
    assert (ours + dead + io) / 49e6 == pytest.approx(1.0, abs=0.005)


def _export_and_run(module, args, names, out_names, path):
    ort = pytest.importorskip("onnxruntime")
    with torch.no_grad():
        ref = module(*args)
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=names,
        output_names=out_names,
        opset_version=17,
        dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
    ref = ref.numpy()
    assert out.shape == ref.shape
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= 1e-4, f"onnxruntime differs from torch by {err:.2e} (relative to max |ref|)"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@torch.no_grad()
def test_noise_skip_adds_scaled_x_minus_mu_and_exports(tiny, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(tiny.cfg, noise_skip=127.5)
    skip = ConditionalUNet(cfg).eval()
    skip.load_state_dict(tiny.state_dict())
    x, mu, t, c, a = _inputs(cfg, 2, 40, 37)
    want = tiny(x, mu, t, tiny.condition(c, a)) + 127.5 * (x - mu)
    torch.testing.assert_close(skip(x, mu, t, skip.condition(c, a)), want)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert "noise_skip" in tiny.cfg.to_dict() and tiny.cfg.noise_skip == 0.0
    _export_and_run(
        UNetPredictor(skip).eval(),
        (x, mu, t, c, a),
        ["x_t", "mu", "t", "content_emb", "artifact_emb"],
        ["eps"],
        tmp_path / "unet_skip.onnx",
    )


def test_tiny_exports_to_onnx(tiny, tmp_path):
    x, mu, t, c, a = _inputs(tiny.cfg, 2, 48, 45)
    _export_and_run(
        UNetPredictor(tiny).eval(),
        (x, mu, t, c, a),
        ["x_t", "mu", "t", "content_emb", "artifact_emb"],
        ["eps"],
        tmp_path / "unet.onnx",
    )
    _export_and_run(
        UNetConditioner(tiny).eval(),
        (c, a),
        ["content_emb", "artifact_emb"],
        ["cond"],
        tmp_path / "cond.onnx",
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_paper_exports_to_onnx(tmp_path):
    net = _net(UNetConfig.paper())
    x, mu, t, c, a = _inputs(net.cfg, 1, 64, 64)
    with torch.no_grad():
        cond = net.condition(c, a)
    _export_and_run(
        net, (x, mu, t, cond), ["x_t", "mu", "t", "cond"], ["eps"], tmp_path / "unet.onnx"
    )
