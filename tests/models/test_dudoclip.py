"""DuDoCLIP: structure, init identity, control order, freezing, loss, export, loaders."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mar_rt.errors import BadInputError
from mar_rt.models.dudoclip import (
    CLIP_MEAN,
    CLIP_STD,
    ONNX_INPUT_NAMES,
    ONNX_OUTPUT_NAMES,
    DuDoCLIP,
    DuDoCLIPConfig,
    clip_loss,
    info_nce,
)


@pytest.fixture(scope="module")
def cfg() -> DuDoCLIPConfig:
    return DuDoCLIPConfig.tiny()


@pytest.fixture(scope="module")
def model(cfg) -> DuDoCLIP:
    return DuDoCLIP(cfg, seed=0).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 1, 64, 72, generator=torch.Generator().manual_seed(1))


def _perturbed(model: DuDoCLIP, *, zero_modules: bool, blocks: bool, seed: int = 2) -> DuDoCLIP:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if zero_modules:
            for z in other.zero_modules:
                z.weight.copy_(0.05 * torch.randn(z.weight.shape, generator=gen))
                z.bias.copy_(0.05 * torch.randn(z.bias.shape, generator=gen))
        if blocks:
            for p in other.visual_control.transformer.resblocks.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return other


# ---- config ----------------------------------------------------------------------------------


def test_paper_config_is_open_clip_vit_b_32():
    import open_clip

    ref = json.loads(
        (Path(open_clip.__file__).parent / "model_configs" / "ViT-B-32.json").read_text()
    )
    cfg = DuDoCLIPConfig.paper()
    assert cfg.embed_dim == ref["embed_dim"]
    assert cfg.image_size == ref["vision_cfg"]["image_size"]
    for key, value in ref["vision_cfg"].items():
        assert cfg.vision_cfg[key] == value, key
    for key, value in ref["text_cfg"].items():
        assert cfg.text_cfg[key] == value, key


def test_config_round_trip_and_refusals(cfg):
    again = DuDoCLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and hash(again) == hash(cfg)
    d = cfg.to_dict()
    d["vision_cfg"]["width"] = 1  # the returned dict is a copy
    assert cfg.width == 192
    with pytest.raises(ValueError, match="image_size"):
        DuDoCLIPConfig(embed_dim=8, image_size=64, vision_cfg={"image_size": 32, "patch_size": 16})
    with pytest.raises(ValueError, match="patch_dropout"):
        DuDoCLIPConfig(embed_dim=8, image_size=64, vision_cfg={"patch_dropout": 0.5})
    with pytest.raises(ValueError, match="unknown keys"):
        DuDoCLIPConfig.from_dict({**cfg.to_dict(), "extra": 1})


def test_tiny_sizes(cfg, model):
    assert (cfg.embed_dim, cfg.image_size, cfg.width, cfg.layers) == (256, 112, 192, 6)
    assert len(model.zero_modules) == cfg.layers
    assert len(model.clip.visual.transformer.resblocks) == cfg.layers


# ---- preprocessing ---------------------------------------------------------------------------


def test_preprocess_closed_forms(model, cfg):
    s = cfg.image_size
    const = torch.full((2, 1, 50, 70), 0.3)
    out = model.preprocess(const)
    assert out.shape == (2, 3, s, s)
    expected = (0.3 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 5, 7], expected, atol=1e-6, rtol=0)

    # bilinear (align_corners=False) resampling of a linear ramp is the ramp at the new
    # pixel centres, away from the clamped border
    w_in = 224
    ramp = (torch.arange(w_in, dtype=torch.float32) / w_in).expand(1, 1, 40, w_in)
    out = model.preprocess(ramp)[0, 0] * CLIP_STD[0] + CLIP_MEAN[0]
    centres = (torch.arange(s) + 0.5) * (w_in / s) - 0.5
    interior = slice(2, s - 2)
    torch.testing.assert_close(out[7, interior], centres[interior] / w_in, atol=1e-5, rtol=0)


# ---- init identity, control, freezing --------------------------------------------------------


def test_content_equals_plain_open_clip_at_init(model, images):
    with torch.no_grad():
        content, artifact = model(images)
        plain = model.clip.encode_image(model.preprocess(images))
    assert content.shape == artifact.shape == (3, model.cfg.embed_dim)
    assert (content - plain).abs().max().item() <= 1e-5
    # the controller starts as an exact copy of the tower (DA-CLIP init)
    assert (artifact - plain).abs().max().item() <= 1e-5


def test_controller_changes_artifact_not_content_at_init(model, images):
    other = _perturbed(model, zero_modules=False, blocks=True)
    with torch.no_grad():
        c0, a0 = model(images)
        c1, a1 = other(images)
    assert (a1 - a0).abs().max() > 1e-3
    assert (c1 - c0).abs().max() == 0
    steered = _perturbed(model, zero_modules=True, blocks=False)
    with torch.no_grad():
        c2, a2 = steered(images)
    assert (c2 - c0).abs().max() > 1e-3
    assert (a2 - a0).abs().max() == 0


def test_deepest_hint_enters_first_frozen_block(model, images):
    other = copy.deepcopy(model)
    bias = torch.randn(model.cfg.width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        other.zero_modules[-1].bias.copy_(bias)
    blocks = other.clip.visual.transformer.resblocks
    seen = {}
    h0 = blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("out0", o))
    h1 = blocks[1].register_forward_pre_hook(lambda m, i: seen.__setitem__("in1", i[0]))
    try:
        with torch.no_grad():
            other(images)
    finally:
        h0.remove()
        h1.remove()
    torch.testing.assert_close(seen["in1"] - seen["out0"], bias.expand_as(seen["in1"]))


def test_only_controller_and_temperature_train(model, images):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(
        n == "logit_scale" or n.startswith(("visual_control.", "zero_modules.")) for n in trainable
    )
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }

    m = copy.deepcopy(model).train()
    tokens = m.tokenize(["CT slice of the pelvis"] * 3)
    with torch.no_grad():
        text = m.encode_text(tokens)
    content, artifact = m(images)
    loss = clip_loss(content, artifact, text, text.flip(0), m.logit_scale)
    loss.backward()
    assert all(p.grad is None for p in m.clip.parameters())
    assert m.logit_scale.grad is not None
    assert all(z.weight.grad.abs().sum() > 0 for z in m.zero_modules)
    assert sum(p.grad.abs().sum() for p in m.visual_control.parameters()) > 0


# ---- text -------------------------------------------------------------------------------------


def test_tokenize_is_open_clip_bpe(model):
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    text = "CT slice of the pelvis with two large titanium screws"
    ids = bpe.encode(text)
    tokens = model.tokenize([text, "x"])
    assert tokens.shape == (2, model.cfg.context_length) and tokens.dtype == torch.int64
    assert tokens[0, 0] == bpe.encoder["<start_of_text>"]
    assert tokens[0, 1 : 1 + len(ids)].tolist() == ids
    assert tokens[0, 1 + len(ids)] == bpe.encoder["<end_of_text>"]
    with torch.no_grad():
        emb = model.encode_text(tokens)
    assert emb.shape == (2, model.cfg.embed_dim)


# ---- loss closed forms ------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 5])
def test_loss_uniform_logits_is_log_b(batch):
    same = torch.randn(1, 16).expand(batch, 16)
    loss = clip_loss(same, same, same, same, torch.tensor(math.log(1 / 0.07)))
    assert loss.item() == pytest.approx(math.log(batch), abs=1e-5)


def test_loss_aligned_orthonormal_closed_form():
    batch, scale = 4, 3.0
    eye = torch.eye(batch, 8)
    expected = math.log(1 + (batch - 1) * math.exp(-scale))
    # features are normalised inside, so the lengths must not matter
    got = info_nce(2.5 * eye, 0.1 * eye, torch.tensor(math.log(scale)))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    clamped = info_nce(eye, eye, torch.tensor(10.0))  # exp(10) > 100: clamped to 100
    assert clamped.item() == pytest.approx(math.log(1 + (batch - 1) * math.exp(-100)), abs=1e-6)


# ---- export -----------------------------------------------------------------------------------


def _export_and_compare(model: DuDoCLIP, tmp_path: Path, *, dynamo: bool) -> None:
    import onnx
    import onnxruntime as ort

    path = tmp_path / "dudoclip.onnx"
    example = torch.rand(2, 1, 96, 80, generator=torch.Generator().manual_seed(4))
    kwargs = (
        {"dynamic_shapes": {"image01": {0: torch.export.Dim("batch")}}}
        if dynamo
        else {"dynamic_axes": {"image": {0: "batch", 2: "height", 3: "width"}}}
    )
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=list(ONNX_INPUT_NAMES),
        output_names=list(ONNX_OUTPUT_NAMES),
        opset_version=17,
        dynamo=dynamo,
        **kwargs,
    )
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["content_emb", "artifact_emb"]
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = [example, torch.rand(3, 1, 96, 80, generator=torch.Generator().manual_seed(5))]
    if not dynamo:
        feeds.append(torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(6)))
    for x in feeds:
        content, artifact = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            ref_c, ref_a = model(x)
        assert np.abs(content - ref_c.numpy()).max() <= 1e-4
        assert np.abs(artifact - ref_a.numpy()).max() <= 1e-4


def test_onnx_export_matches_torch(model, tmp_path):
    steered = _perturbed(model, zero_modules=True, blocks=True).eval()
    _export_and_compare(steered, tmp_path, dynamo=False)


@pytest.mark.slow
def test_onnx_dynamo_export_matches_torch(model, tmp_path):
    steered = _perturbed(model, zero_modules=True, blocks=True).eval()
    _export_and_compare(steered, tmp_path, dynamo=True)


# ---- checkpoints ------------------------------------------------------------------------------


def test_load_open_clip_checkpoint(cfg, model, images, tmp_path):
    donor = DuDoCLIP(cfg, seed=7).eval()
    wrapped = {"state_dict": {"module." + k: v for k, v in donor.clip.state_dict().items()}}
    torch.save(wrapped, tmp_path / "openclip.pt")
    from safetensors.torch import save_file

    save_file(donor.clip.state_dict(), str(tmp_path / "openclip.safetensors"))

    with torch.no_grad():
        expected = donor.clip.encode_image(donor.preprocess(images))
    for name in ("openclip.pt", "openclip.safetensors"):
        target = _perturbed(model, zero_modules=True, blocks=True)
        target.load_open_clip_checkpoint(tmp_path / name)
        with torch.no_grad():
            content, artifact = target(images)
        torch.testing.assert_close(content, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(artifact, expected, atol=1e-5, rtol=0)  # controller reset
        assert not any(p.requires_grad for p in target.clip.parameters())


def test_load_refuses_foreign_and_unsafe_files(model, tmp_path):
    state = dict(copy.deepcopy(model).clip.state_dict())
    state.pop("visual.proj")
    state["visual.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(BadInputError, match=r"wrong\.pt.*missing.*visual\.proj"):
        copy.deepcopy(model).load_open_clip_checkpoint(tmp_path / "wrong.pt")

    torch.save({"weights": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # needs unpickling code
    with pytest.raises(BadInputError, match="pickled.pt"):
        copy.deepcopy(model).load_open_clip_checkpoint(tmp_path / "pickled.pt")


class _DaCLIPLayout(nn.Module):
    """The module tree of DA-CLIP's ``DaCLIP`` (da-clip/src/open_clip/daclip_model.py): its
    ``state_dict()`` has DA-CLIP's released key layout, generated by torch, not by our mapping."""

    class _ControlTransformer(nn.Module):
        def __init__(self, transformer: nn.Module, width: int, layers: int):
            super().__init__()
            self.transformer = transformer
            self.zero_modules = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
            self.batch_first = transformer.batch_first

        def forward(self, x, attn_mask=None):  # plain blocks: the controller's own output
            for block in self.transformer.resblocks:
                x = block(x)
            return x

    def __init__(self, clip: nn.Module, width: int, layers: int):
        super().__init__()
        self.clip = clip
        self.visual = clip.visual
        self.visual_control = copy.deepcopy(clip.visual)
        self.visual_control.transformer = self._ControlTransformer(
            self.visual_control.transformer, width, layers
        )
        self.logit_scale = nn.Parameter(torch.tensor(2.0))


def test_load_daclip_layout(cfg, model, images, tmp_path):
    donor = DuDoCLIP(cfg, seed=11).eval()
    ref = _DaCLIPLayout(copy.deepcopy(donor.clip), cfg.width, cfg.layers).eval()
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for p in ref.visual_control.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    keys = set(ref.state_dict())
    assert "visual.proj" in keys and "clip.visual.proj" in keys
    assert "visual_control.transformer.zero_modules.0.weight" in keys
    assert "visual_control.transformer.transformer.resblocks.0.attn.in_proj_weight" in keys
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "daclip.pt")

    ours = copy.deepcopy(model)
    ours.load_daclip_checkpoint(tmp_path / "daclip.pt")
    for i, z in enumerate(ours.zero_modules):
        torch.testing.assert_close(z.weight, ref.visual_control.transformer.zero_modules[i].weight)
    assert ours.logit_scale.item() == 2.0
    assert not any(p.requires_grad for p in ours.clip.parameters())
    with torch.no_grad():
        _, artifact = ours(images)
        ref_artifact = ref.visual_control(ours.preprocess(images))  # open_clip's own forward
        plain = ours.clip.encode_image(ours.preprocess(images))
        expected_plain = donor.clip.encode_image(donor.preprocess(images))
    torch.testing.assert_close(artifact, ref_artifact, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, expected_plain, atol=1e-5, rtol=0)

    bad = ref.state_dict()
    bad["visual.proj"] = bad["visual.proj"] + 1  # alias disagrees with clip.visual.proj
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(BadInputError, match="alias"):
        copy.deepcopy(model).load_daclip_checkpoint(tmp_path / "bad.pt")


@pytest.mark.slow
def test_paper_config_builds_and_matches_plain_tower():
    m = DuDoCLIP(DuDoCLIPConfig.paper()).eval()
    x = torch.rand(1, 1, 416, 416, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        content, artifact = m(x)
        plain = m.encode_image_plain(x)
    assert content.shape == (1, 512)
    assert (content - plain).abs().max().item() <= 1e-5
