"""The U-Net against the reference IR-SDE / DA-CLIP network (DESIGN §7.2, issue 16).

The oracle is ``tests/models/_irsde_reference.py``: the reference's key layout and forward pass
written from its source, independent of ``mar_rt.models``.  The legacy oracle is a file of ε̂
values computed with the code before the reference options existed (commit d5cc32a).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mar_rt.errors import BundleError
from mar_rt.models.bundle import load_bundle
from mar_rt.models.unet import ConditionalUNet, UNetConfig
from tests.models._irsde_reference import (
    reference_forward,
    reference_state_dict,
    save_like_irsde,
)

DEMO = Path(__file__).resolve().parents[2] / "mar_rt" / "assets" / "demo_bundle"
LEGACY = Path(__file__).resolve().parent / "data" / "demo_unet_eps_legacy.npz"

SMALL = dict(nf=8, ch_mult=(1, 2, 4, 8), context_dim=16)
SMALL_CFG = UNetConfig(
    nf=8,
    ch_mult=(1, 2, 4, 8),
    context_dim=16,
    time_sin_dim=8,
    time_dim=32,
    prompt_len=32,
    transformer_prenorm=True,
    reference_padding=True,
)  # fmt: skip  (every other field at the reference's fixed value: the defaults)


@pytest.fixture(scope="module")
def ref_sd() -> dict[str, torch.Tensor]:
    return reference_state_dict(**SMALL, seed=3)


@pytest.fixture(scope="module")
def ckpt(ref_sd, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("irsde") / "lastest_G.pth"
    save_like_irsde(ref_sd, path)
    return path


@pytest.fixture(scope="module")
def net(ckpt) -> ConditionalUNet:
    return ConditionalUNet.from_irsde_checkpoint(ckpt)


def _inputs(h: int, w: int, ctx: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, h, w, generator=g)
    mu = torch.rand(2, 1, h, w, generator=g)
    t = torch.tensor([3.0, 71.0])
    return x, mu, t, torch.randn(2, ctx, generator=g), torch.randn(2, ctx, generator=g)


# --------------------------------------------------------------------------- loading


def test_inferred_config_is_the_one_used(net):
    assert net.cfg == SMALL_CFG
    assert net.cfg.size_multiple == 16


@torch.no_grad()
@pytest.mark.parametrize("hw", [(24, 24), (40, 41)])
def test_eps_equals_the_reference_forward(net, ref_sd, hw):
    x, mu, t, content, artifact = _inputs(*hw)
    ref = reference_forward(ref_sd, x, mu, t, text_context=artifact, image_context=content)
    ours = net.predict(x, mu, t, content, artifact)
    assert ref.abs().max() > 0.5  # the oracle is not trivially small
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)


@torch.no_grad()
def test_without_the_reference_padding_eps_differs(ckpt, ref_sd):
    """The switch matters (so the exactness above is not an accident of the input size)."""
    x, mu, t, content, artifact = _inputs(24, 24)
    ref = reference_forward(ref_sd, x, mu, t, text_context=artifact, image_context=content)
    minimal = ConditionalUNet.from_irsde_checkpoint(ckpt, reference_padding=False)
    assert minimal.cfg.size_multiple == 8
    assert (minimal.predict(x, mu, t, content, artifact) - ref).abs().max() > 1e-2


@torch.no_grad()
@pytest.mark.parametrize(("hw", "padded"), [((24, 24), (32, 32)), ((40, 41), (48, 48))])
def test_eps_unchanged_by_padding_round_trip(net, hw, padded):
    """ε̂ of an H×W input = the H×W crop of ε̂ of its own reflect padding (bottom/right) to a
    multiple of 16, as the reference's check_image_size pads."""
    x, mu, t, content, artifact = _inputs(*hw)
    pad = (0, padded[1] - hw[1], 0, padded[0] - hw[0])
    small = net.predict(x, mu, t, content, artifact)
    big = net.predict(
        F.pad(x, pad, mode="reflect"), F.pad(mu, pad, mode="reflect"), t, content, artifact
    )
    torch.testing.assert_close(small, big[..., : hw[0], : hw[1]], rtol=0, atol=0)


@torch.no_grad()
def test_wrapped_checkpoints_load_the_same_weights(net, ref_sd, tmp_path):
    module = {f"module.{k}": v for k, v in ref_sd.items()}
    for i, obj in enumerate(
        ({"state_dict": module, "epoch": 3}, {"params": ref_sd}, {"params_ema": module})
    ):
        path = tmp_path / f"wrapped{i}.pth"
        torch.save(obj, path)
        other = ConditionalUNet.from_irsde_checkpoint(path)
        assert other.cfg == net.cfg
        for k, v in net.state_dict().items():
            assert torch.equal(v, other.state_dict()[k]), k


def test_overrides_replace_inferred_fields(ckpt):
    other = ConditionalUNet.from_irsde_checkpoint(ckpt, noise_skip=2.0)
    assert other.cfg.noise_skip == 2.0


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("drop", "downs.1.2.fn.fn.to_qkv.weight"),
        ("shape", "mid_attn.fn.fn.transformer_blocks.0.ff.net.2.bias"),
        ("extra", "downs.0.2.fn.fn.extra.weight"),
    ],
)
def test_mismatch_is_refused_naming_the_key(ref_sd, tmp_path, edit, named):
    sd = dict(ref_sd)
    if edit == "drop":
        del sd[named]
    elif edit == "shape":
        sd[named] = torch.zeros(sd[named].numel() + 1)
    else:
        sd[named] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(BundleError, match=named.replace(".", r"\.")):
        ConditionalUNet.from_irsde_checkpoint(path)


def test_an_override_that_contradicts_the_file_is_refused(ckpt):
    """Without the wrapping the transformer's tensors would sit one level up: refused."""
    with pytest.raises(BundleError, match=r"missing tensor 'downs\.3\.2\.transformer_blocks"):
        ConditionalUNet.from_irsde_checkpoint(ckpt, transformer_prenorm=False)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_pickled_code_is_not_run(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    with pytest.raises(BundleError, match="cannot read the checkpoint safely"):
        ConditionalUNet.from_irsde_checkpoint(path)


def test_use_image_context_false_is_refused(ref_sd, tmp_path):
    sd = {k: v for k, v in ref_sd.items() if not k.startswith("mid_attn.")}
    sd["mid_attn.fn.norm.g"] = torch.ones(1, 64, 1, 1)
    sd["mid_attn.fn.fn.to_qkv.weight"] = torch.zeros(384, 64, 1, 1)
    path = tmp_path / "noctx.pth"
    torch.save(sd, path)
    with pytest.raises(BundleError, match="use_image_context=False"):
        ConditionalUNet.from_irsde_checkpoint(path)


def test_round_trip_through_the_reference_layout(net):
    from mar_rt.models.reference import irsde_to_mar_rt, mar_rt_to_irsde

    back = irsde_to_mar_rt(mar_rt_to_irsde(net.state_dict(), net.cfg), net.cfg)
    for k, v in net.state_dict().items():
        assert torch.equal(v, back[k]), k


# --------------------------------------------------------------------------- old bundles


def test_demo_bundle_configs_keep_the_old_structure():
    bundle = load_bundle(DEMO)
    for name in ("unet_image", "unet_sinogram", "unet_residual"):
        assert "transformer_prenorm" not in bundle.config["networks"][name]["config"]
        cfg = bundle.network_config(name)
        assert not cfg.transformer_prenorm and not cfg.reference_padding
        assert cfg.size_multiple == 8
    assert not UNetConfig.tiny().transformer_prenorm and not UNetConfig.tiny().reference_padding


ROUND10_RESIDUAL_SHA256 = "b201e5fac86b0347e222c707f97e8032831727a9024291be86d2eb4742b90fd3"
"""The residual U-Net the demo bundle ships since round 10. Its ``unet_residual_r10_*_eps`` values
were recorded by the code before the reference options (commit dd3590d's parent), which
reproduces the round-3 values recorded at the time (``unet_residual_*_eps``) to 7.6e-6."""


@torch.no_grad()
def test_demo_bundle_gives_the_same_eps_as_before():
    """ε̂ of the shipped residual U-Net equals the values the code before the reference options
    gives with the same weights and inputs (40×41 and 24×24); with the reference padding it would
    not. The image and sinogram U-Nets have other weights since round 4, so their recorded values
    no longer apply."""
    bundle = load_bundle(DEMO)
    legacy = np.load(LEGACY)
    assert bundle.config["networks"]["unet_residual"]["sha256"] == ROUND10_RESIDUAL_SHA256
    net = bundle.build("unet_residual")
    for hw in ("40x41", "24x24"):
        key = f"unet_residual_{hw}"
        args = [torch.from_numpy(legacy[f"{key}_{k}"]) for k in ("x", "mu", "t", "c", "a")]
        want = torch.from_numpy(legacy[f"unet_residual_r10_{hw}_eps"])
        torch.testing.assert_close(net.predict(*args), want, rtol=1e-5, atol=2e-5)
    net.cfg = UNetConfig.from_dict({**net.cfg.to_dict(), "reference_padding": True})
    moved = net.predict(*args) - want
    assert moved.abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@torch.no_grad()
def test_reference_structure_exports_to_onnx(net, tmp_path):
    """Step graph of a loaded reference network at 40×41 (padded to 48×48 inside): ORT = torch."""
    ort = pytest.importorskip("onnxruntime")
    x, mu, t, content, artifact = _inputs(40, 41)
    cond = net.condition(content, artifact)
    want = net(x, mu, t, cond).numpy()
    path = tmp_path / "step.onnx"
    names = ["x_t", "mu", "t", "cond"]
    torch.onnx.export(
        net, (x, mu, t, cond), str(path), input_names=names, output_names=["eps"],
        opset_version=17, dynamo=False,
    )  # fmt: skip
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {n: a.numpy() for n, a in zip(names, (x, mu, t, cond), strict=True)})
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
