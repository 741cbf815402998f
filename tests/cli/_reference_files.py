"""Small, random checkpoints saved the way the reference trainers save them (for import tests).

* DA-CLIP (``da-clip/src/open_clip/daclip_model.py``, trained by open_clip's trainer): the
  ``DaCLIP`` module tree (``clip``, ``visual`` = ``clip.visual``, ``visual_control`` with its
  transformer wrapped as ``transformer.transformer`` + ``transformer.zero_modules``,
  ``logit_scale``), saved as ``{"epoch", "name", "state_dict" ("module." keys), "optimizer"}``.
* IR-SDE U-Net: ``tests/models/_irsde_reference.py`` (a plain state dict, ``save_network``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from tests.models._irsde_reference import reference_state_dict, save_like_irsde

# embed 16 (= the U-Nets' context_dim); 64 channels per head, open_clip's convention
MICRO_CLIP = dict(
    embed_dim=16,
    vision_cfg={"layers": 2, "width": 64, "head_width": 64, "patch_size": 16, "image_size": 32},
    text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
)
MICRO_UNET = dict(nf=8, ch_mult=(1, 2, 4, 8), context_dim=16)


class _ControlTransformer(nn.Module):
    def __init__(self, transformer: nn.Module, width: int, layers: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.zero_modules = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))


class _DaCLIP(nn.Module):
    def __init__(self, clip: nn.Module, width: int, layers: int) -> None:
        super().__init__()
        self.clip = clip
        self.visual = clip.visual
        self.visual_control = copy.deepcopy(clip.visual)
        self.visual_control.transformer = _ControlTransformer(
            self.visual_control.transformer, width, layers
        )
        self.logit_scale = nn.Parameter(torch.tensor(2.3))


def save_daclip_like_trainer(path: Path, *, seed: int) -> Path:
    """A micro DA-CLIP with random (non-zero) controller weights, saved as open_clip's trainer
    saves a DataParallel model after one AdamW step."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    clip = CLIP(MICRO_CLIP["embed_dim"], MICRO_CLIP["vision_cfg"], MICRO_CLIP["text_cfg"])
    model = _DaCLIP(clip, 64, 2)
    with torch.no_grad():
        for p in model.visual_control.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    params = [*model.visual_control.parameters(), model.logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sum(p.sum() for p in params).backward()
    opt.step()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"epoch": 1, "name": "daclip_micro", "state_dict": state, "optimizer": opt.state_dict()},
        path,
    )
    return path


def unet_state(seed: int) -> dict[str, torch.Tensor]:
    """Reference-layout tensors with the output conv scaled down, so that ε̂ has a trained
    network's size (|ε̂| of a few units) rather than a random deep network's."""
    state = reference_state_dict(**MICRO_UNET, seed=seed)
    state["final_conv.weight"] = 0.05 * state["final_conv.weight"]
    return state


def save_unet_like_irsde(path: Path, *, seed: int) -> Path:
    save_like_irsde(unet_state(seed), path)
    return path


DACLIP_OPTIONS = """\
name: dudocrop-image
model: denoising
sde:
  max_sigma: 10
  T: 100
  schedule: cosine
  eps: 0.005
network_G:
  which_model_G: ConditionalUNet
  setting: {in_nc: 1, out_nc: 1, nf: 8, ch_mult: [1, 2, 4, 8], context_dim: 16,
            use_degra_context: true, use_image_context: true}
"""
