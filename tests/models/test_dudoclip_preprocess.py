"""DuDoCLIP's "daclip" preprocessing against torchvision's transform on PIL images (the
reference DA-CLIP ``clip_transform``: uint8 → Resize(S, BICUBIC) → CenterCrop(S) → ToTensor →
Normalize), and the unchanged default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mar_rt.errors import BadInputError
from mar_rt.models.dudoclip import (
    CLIP_MEAN,
    CLIP_STD,
    DuDoCLIP,
    DuDoCLIPConfig,
    daclip_pixels,
)

MICRO = dict(
    embed_dim=16,
    image_size=32,
    vision_cfg={"layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    text_cfg={"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
)


def _images(h: int, w: int, b: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(h * 1000 + w)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = 0.5 + 0.4 * torch.sin(6 * xx) * torch.cos(4 * yy)
    return (smooth + 0.1 * torch.rand(b, 1, h, w, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("hw", [(416, 416), (640, 641), (300, 200), (224, 224)])
def test_daclip_pixels_equal_torchvision_on_pil(hw):
    tv = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    size = 224
    images = _images(*hw)
    transform = tv.Compose(
        [
            tv.Resize(size, interpolation=tv.InterpolationMode.BICUBIC),
            tv.CenterCrop(size),
            tv.ToTensor(),
            tv.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    want = []
    for img in images[:, 0].double().numpy():
        rgb = np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2)  # as DA-CLIP's app
        want.append(transform(Image.fromarray(rgb)))
    want = torch.stack(want)
    pixels = daclip_pixels(images, size)
    assert pixels.shape == (2, 1, size, size)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    got = (pixels.expand(-1, 3, -1, -1) - mean) / std
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@torch.no_grad()
def test_daclip_mode_runs_the_host_step_and_tensor_mode_is_unchanged():
    tensor_model = DuDoCLIP(DuDoCLIPConfig(**MICRO), seed=1).eval()
    daclip_model = DuDoCLIP(DuDoCLIPConfig(**MICRO, preprocess="daclip"), seed=1).eval()
    images = _images(70, 64)
    pixels = daclip_pixels(images, 32)
    for a, b in zip(daclip_model(images), daclip_model(pixels), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # same weights; the tensor path resizes bilinearly, so the embeddings differ
    content_t, _ = tensor_model(images)
    content_d, _ = daclip_model(images)
    assert (content_t - content_d).abs().max() > 1e-4
    torch.testing.assert_close(tensor_model.host_preprocess(images), images)
    # the default and a config dict written before the option
    cfg = DuDoCLIPConfig(**MICRO)
    assert cfg.preprocess == "tensor"
    old = {k: v for k, v in cfg.to_dict().items() if k != "preprocess"}
    assert DuDoCLIPConfig.from_dict(old) == cfg
    with pytest.raises(ValueError, match="preprocess"):
        DuDoCLIPConfig(**MICRO, preprocess="pil")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_daclip_mode_refuses_to_trace_the_pil_step():
    model = DuDoCLIP(DuDoCLIPConfig(**MICRO, preprocess="daclip"), seed=1).eval()
    with pytest.raises(BadInputError, match="host-processed 32×32"):
        torch.jit.trace(model, (_images(40, 40, b=1),))
